"""Stage completion markers and fingerprints: what makes every stage resumable.

A stage (or one language/chunk of it) is complete when its marker exists, and the marker is
written last, atomically, after the outputs it lists. The marker's fingerprint hashes every
input that determines the output (config section, input files' sizes and mtimes, upstream
hashes): a rerun skips work whose fingerprint matches, and refuses to silently overwrite
complete work that was made with different inputs unless the user forces that stage.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from .atomic import read_json, write_json
from .config import STAGES
from .errors import PrepError


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def file_identity(path: Path) -> Dict[str, Any]:
    st = path.stat()
    return {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Layout:
    """Where everything lives under output_dir (documented in the README)."""

    root: Path

    @property
    def state(self) -> Path:
        return self.root / "state"

    def marker(self, stage: str, name: str = "") -> Path:
        return self.state / stage / f"{name}.json" if name else self.state / f"{stage}.json"

    @property
    def routed(self) -> Path:
        return self.root / "routed"

    @property
    def filtered(self) -> Path:
        return self.root / "filtered"

    @property
    def dedup(self) -> Path:
        return self.root / "dedup"

    @property
    def clean(self) -> Path:
        return self.root / "clean"

    @property
    def vocab(self) -> Path:
        return self.root / "vocab"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def report(self) -> Path:
        return self.root / "report"

    def is_done(self, stage: str, name: str, fp: str) -> bool:
        """True if the marker exists with this fingerprint and its outputs exist.

        A marker with another fingerprint is complete work made from other inputs or settings:
        PrepError, so that nothing is overwritten behind the user's back.
        """
        marker = load_marker(self.marker(stage, name))
        if marker is None:
            return False
        if marker.get("fingerprint") != fp:
            raise PrepError(
                f"{self.root} already holds complete '{stage}' output{f' for {name}' if name else ''} made "
                f"from other inputs or settings. Use a new output_dir, or pass force={stage} to rebuild "
                "it and every later stage."
            )
        return all((self.root / o).exists() for o in marker.get("outputs", []))

    def write_marker(self, stage: str, name: str, fp: str, outputs: list, **payload) -> None:
        rel = [str(Path(o).relative_to(self.root)) for o in outputs]
        write_json(self.marker(stage, name), {"fingerprint": fp, "outputs": rel, **payload})

    def outputs_of(self, stage: str) -> list:
        """Everything a stage produces, removed when the stage is forced."""
        return {
            "clean": [self.routed, self.filtered, self.state / "route", self.state / "clean"],
            "dedup": [self.dedup, self.clean, self.state / "dedup"],
            "vocab": [self.vocab, self.marker("vocab"), self.state / "vocab"],
            "encode": [self.shards, self.state / "encode"],
            "manifest": [self.manifest],
            "report": [self.report],
        }[stage]


def load_marker(path: Path) -> Optional[Dict[str, Any]]:
    if not path.exists():
        return None
    try:
        return read_json(path)
    except (ValueError, OSError) as exc:  # the work is simply redone (its outputs are written atomically)
        logging.getLogger("xlmr-prep").warning("%s is damaged (%s): redoing the work it marks", path, exc)
        return None


def require_allowed(stage: str, pending: int, allowed: bool) -> None:
    """A stage left out of `stages=` must already be complete."""
    if pending and not allowed:
        raise PrepError(
            f"stage '{stage}' is not complete ({pending} unit(s) of work left) and is not among the stages "
            f"to run: run it first (stages=[{stage}] or the default, all stages)"
        )


def apply_force(layout: Layout, force: Optional[str]) -> None:
    """Delete the outputs of the forced stage and every later stage."""
    if force is None:
        return
    if force not in STAGES:
        raise PrepError(f"force={force} is not a stage; stages are {', '.join(STAGES)}")
    for stage in STAGES[STAGES.index(force):]:
        for out in layout.outputs_of(stage):
            if out.is_dir():
                shutil.rmtree(out)
            elif out.exists():
                out.unlink()
