"""Shared fixtures: real prep output made once per test session by the real `xlmr-prep`."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

REPO = Path(__file__).resolve().parent.parent
SAMPLE_CORPUS = REPO / "data_prep" / "sample_corpus"
MANPAGES = REPO.parent / "shared" / "corpora" / "manpages"

# Small settings that keep the real code paths: several shards for big languages, one for
# small ones, a vocabulary SentencePiece trains in seconds.
PREPARED_DATA_ARGS = ["vocab.size=2000", "pack.seq_len=64", "shard.target_mb=0.05", "progress=false"]


def run_prep(*overrides: str, check: bool = True, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real `xlmr-prep` CLI in a subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep.cli", *overrides],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
        env={**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"xlmr-prep failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def prep_code_hash() -> str:
    """A hash of everything that decides what xlmr-prep writes (its sources, its config and
    the settings above), so a cached prepared sample is never one made by other code."""
    h = hashlib.sha256(" ".join(PREPARED_DATA_ARGS).encode())
    for path in sorted([*(REPO / "data_prep").rglob("*.py"), *(REPO / "conf").rglob("*.yaml"), *SAMPLE_CORPUS.iterdir()]):
        h.update(str(path.relative_to(REPO)).encode() + path.read_bytes())
    return h.hexdigest()[:12]


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> Path:
    """DATA_DIR written by xlmr-prep on the bundled sample, shared by all xdist workers and
    kept between test sessions while the prep code is unchanged."""
    root = tmp_path_factory.getbasetemp().parent
    out = root / f"prepared_data-{prep_code_hash()}"
    with FileLock(str(root / "prepared_data.lock")):
        if not (out / "manifest.json").exists():
            run_prep(f"output_dir={out}", *PREPARED_DATA_ARGS)
    return out
