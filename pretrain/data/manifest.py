"""The prepared data as the loaders see it: the manifest, the language list, the mixing
probabilities, the shards per (language, split), and whether a shard file is usable.

The on-disk format (manifest.json, shard layout) is written by ``xlmr-prep`` and documented
in the README; this module only reads it.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.sampling import temperature_probs

FORMAT = "xlmr-shards"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Shard:
    """One shard file as the manifest describes it."""

    root: Path  # the data dir
    name: str  # the manifest's path, relative to the data dir
    lang: str
    split: str
    samples: int
    bytes: int
    sha256: str | None = None  # of the whole file, as xlmr-prep wrote it

    @property
    def path(self) -> Path:
        """Made when needed: building 100k Paths up front costs seconds (pathlib parsing)."""
        return self.root / self.name


def load_manifest(data_dir: str | Path) -> dict[str, Any]:
    """Read and check ``DATA_DIR/manifest.json``.

    The prep writes the manifest last, so a data dir without one is unfinished: this fails
    with a message that says to run ``xlmr-prep`` rather than a bare ``FileNotFoundError``.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data dir {data_dir} does not exist: run xlmr-prep first")
    path = data_dir / "manifest.json"
    if not path.is_file():
        state = "is empty" if not any(data_dir.iterdir()) else "has no manifest.json (the prep writes it last, so it did not finish)"
        raise FileNotFoundError(f"data dir {data_dir} {state}: run xlmr-prep first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is damaged ({exc}): restore it from a copy, or rebuild it with "
                         f"xlmr-prep output_dir={data_dir} force=manifest") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} is not a manifest (a JSON object): rebuild it with "
                         f"xlmr-prep output_dir={data_dir} force=manifest")
    found = (manifest.get("format"), manifest.get("format_version"))
    if found != (FORMAT, FORMAT_VERSION):
        raise ValueError(
            f"{path}: format {found[0]!r} version {found[1]!r}, but this loader reads "
            f"{FORMAT!r} version {FORMAT_VERSION}: re-run xlmr-prep with this version of the code"
        )
    return manifest


def languages(manifest: dict[str, Any]) -> list[str]:
    """All languages of the data, sorted: batch["lang"] indexes this list."""
    return sorted(manifest["languages"])


def train_token_counts(manifest: dict[str, Any]) -> dict[str, int]:
    """n_i of the mixing formula: each language's train token count (languages with none left out)."""
    counts = {lang: stats.get("train", {}).get("tokens", 0) for lang, stats in manifest["languages"].items()}
    return {lang: n for lang, n in sorted(counts.items()) if n > 0}


def mixing_probs(manifest: dict[str, Any], alpha: float) -> dict[str, float]:
    """q_i ∝ n_i^alpha over the languages with train data (XLM-R, Conneau et al. 2020, alpha=0.3).

    Computed from the manifest's counts at load time, so changing alpha needs no re-sharding.
    """
    return temperature_probs(train_token_counts(manifest), alpha)


def shard_index(data_dir: str | Path, manifest: dict[str, Any]) -> dict[tuple[str, str], list[Shard]]:
    """The shards with samples, grouped by (language, split), each group in manifest order:
    one pass over the manifest (a big one lists 100k shards), no file touched."""
    index: dict[tuple[str, str], list[Shard]] = {}
    root = Path(data_dir)
    for s in manifest["shards"]:
        if s["samples"] > 0:
            index.setdefault((s["lang"], s["split"]), []).append(
                Shard(root, s["path"], s["lang"], s["split"], int(s["samples"]), int(s["bytes"]), s.get("sha256")))
    return index


def shards(data_dir: str | Path, manifest: dict[str, Any], lang: str, split: str) -> list[Shard]:
    """The shards of one language and split, in manifest order."""
    return shard_index(data_dir, manifest).get((lang, split), [])


def shard_problem(shard: Shard) -> str | None:
    """Why a shard's file cannot be used (missing, or not the manifest's size: a truncated copy,
    a partial rsync), or None. One stat."""
    try:
        size = shard.path.stat().st_size
    except FileNotFoundError:
        return "missing"
    return None if size == shard.bytes else f"{size} bytes"


def warn_skipped(shard: Shard, problem: str) -> None:
    warnings.warn(f"skipping shard {shard.path}: {problem}, manifest says {shard.bytes} bytes", stacklevel=3)


def usable_shards(candidates: list[Shard]) -> tuple[list[Shard], list[Shard]]:
    """Split shards into (usable, skipped), with a warning per skipped shard, checking every
    one now: for the validation shards (a few per language). The train stream checks its
    shards one by one as it reaches them (loader.TrainStream)."""
    usable, skipped = [], []
    for shard in candidates:
        problem = shard_problem(shard)
        if problem is None:
            usable.append(shard)
        else:
            skipped.append(shard)
            warn_skipped(shard, problem)
    return usable, skipped
