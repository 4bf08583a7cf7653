"""Shared fixtures: real prep output made once per test session by the real `xlmr-prep`; the
device rule: every test runs on the CPU unless it is marked `gpu`."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

# CUDA is hidden from this process and every subprocess it starts (DS_ACCELERATOR=cpu alone
# would let torch put the model on the GPU and the inputs elsewhere). Set before anything
# initializes CUDA; `gpu` tests get the GPUs back in their subprocesses' env (gpu_env).
VISIBLE_GPUS = os.environ.get("CUDA_VISIBLE_DEVICES")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

REPO = Path(__file__).resolve().parent.parent
SAMPLE_CORPUS = REPO / "data_prep" / "sample_corpus"
MANPAGES = REPO.parent / "shared" / "corpora" / "manpages"

# Small settings that keep the real code paths: several shards for big languages, one for
# small ones, a vocabulary SentencePiece trains in seconds. Language identification is off so
# that all 29 languages stay (it drops sl's few pages of the sample; tests/data_prep/test_lid*.py
# test it).
PREPARED_DATA_ARGS = ["vocab.size=2000", "pack.seq_len=64", "shard.target_mb=0.05", "progress=false",
                      "clean.lid.enabled=false"]


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


def _gpu_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "DS_ACCELERATOR")}
    if VISIBLE_GPUS is not None:
        env["CUDA_VISIBLE_DEVICES"] = VISIBLE_GPUS
    return env


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where a subprocess with the GPUs visible finds CUDA."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True, env=_gpu_env())
    if probe.stdout.strip() != "True":
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)"))


@pytest.fixture(scope="session")
def gpu_env() -> dict:
    """The environment for a `gpu` test's subprocesses: the GPUs this session was started with."""
    return _gpu_env()
