"""A real single-node SLURM for the tests: tests/slurm/start_slurm.sh starts munged,
slurmctld and slurmd under a temp dir (no systemd), once per test session, shared by the
xdist workers (a reference count under a file lock; the last worker out stops it).
Without root or the Debian packages (tests/slurm/install_slurm.sh) the tests skip and say why.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import FileLock

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


class Slurm:
    """Client side of the test cluster: sbatch, scontrol, squeue with its SLURM_CONF."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.conf = directory / "slurm.conf"
        venv_bin = str(Path(sys.executable).parent)  # the jobs run xlmr-prep/xlmr-pretrain from here
        self.env = {**os.environ, "SLURM_CONF": str(self.conf),
                    "PATH": os.pathsep.join([venv_bin, os.environ.get("PATH", "")])}
        for key in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
            if key != "SLURM_CONF":
                del self.env[key]  # never inherit another job's environment
        self.env.pop("PYTEST_XDIST_WORKER", None)

    def run(self, *argv: str, check: bool = True, cwd=None, timeout: int = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(argv), capture_output=True, text=True, env=self.env, cwd=cwd, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, *argv: str, cwd=None) -> str:
        return self.run("sbatch", "--parsable", *argv, cwd=cwd).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> list[dict]:
        """`scontrol show job -o` as dicts (an array job: one per task)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]

    def state(self, job_id: str) -> str:
        return self.job(job_id)[0]["JobState"]

    def wait(self, *job_ids: str, timeout: float = 900) -> None:
        """Until every job (and array task) ended, requeues included."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = [j for job_id in job_ids for j in self.job(job_id)]
            if all(j["JobState"] in TERMINAL for j in jobs):
                return
            time.sleep(1)
        raise AssertionError(f"jobs {job_ids} still running after {timeout} s: "
                             + self.run("squeue", check=False).stdout)


def _start(directory: Path) -> None:
    missing = [c for c in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(c) is None]
    if missing:
        pytest.skip(f"SLURM not installed ({', '.join(missing)} missing): run tests/slurm/install_slurm.sh as root")
    if os.geteuid() != 0:
        pytest.skip("SLURM tests need root (the test cluster runs SlurmUser=root)")
    proc = subprocess.run([str(HERE / "start_slurm.sh"), str(directory)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.skip(f"SLURM could not start: {proc.stdout}{proc.stderr}".strip())


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> Slurm:
    root = tmp_path_factory.getbasetemp().parent
    directory, count = root / "slurm", root / "slurm.users"
    with FileLock(str(root / "slurm.lock")):
        users = int(count.read_text()) if count.is_file() else 0
        if users == 0:
            _start(directory)
        count.write_text(str(users + 1))
    try:
        yield Slurm(directory)
    finally:
        with FileLock(str(root / "slurm.lock")):
            users = int(count.read_text()) - 1
            count.write_text(str(users))
            if users == 0:
                subprocess.run([str(HERE / "start_slurm.sh"), "--stop", str(directory)], capture_output=True)


def job_output(directory: Path) -> str:
    """Every job output file under a dir, for assertion messages."""
    return "\n".join(f"==> {p} <==\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(directory.rglob("*.out")))
