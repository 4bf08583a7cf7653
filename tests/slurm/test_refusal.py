"""xlmr-submit against the real test SLURM refuses a request no node of the partition can
meet (the README's "Bad input"): one line naming the key to change, and nothing queued."""
from __future__ import annotations

import subprocess
import sys
import uuid

import pytest


def _submit(slurm, tmp_path, name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pretrain.cluster.submit", f"output_dir={tmp_path}/data", f"run_dir={tmp_path}/run",
         f"slurm.extra_args=['--job-name={name}']", *args],
        capture_output=True, text=True, env=slurm.env, cwd=tmp_path, timeout=300)


@pytest.mark.parametrize("args, key", [
    ((), "slurm.prep.cpus_per_task=8"),  # the default, on a node with fewer CPUs
    (("jobs=[pretrain]", "slurm.ntasks_per_node=64"), "slurm.ntasks_per_node x slurm.cpus_per_task = 64"),
    (("jobs=[pretrain]", "slurm.gpus_per_node=1"), "slurm.gpus_per_node=1"),
], ids=["prep-cpus", "pretrain-tasks", "pretrain-gpus"])
def test_impossible_request_is_refused_and_nothing_queued(slurm, tmp_path, args, key):
    cpus = int(slurm.run("sinfo", "-h", "-N", "-o", "%c").stdout.split()[0])
    assert cpus < 8, "the test needs a node with fewer than 8 CPUs"
    name = f"refused-{uuid.uuid4().hex[:8]}"
    proc = _submit(slurm, tmp_path, name, *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xlmr-submit: error: the "), proc.stderr
    assert key in lines[0] and "nothing was submitted" in lines[0]
    assert proc.stdout == ""  # no job id printed
    queued = slurm.run("scontrol", "show", "jobs", "-o").stdout
    assert f"JobName={name}" not in queued


def test_a_request_that_fits_passes_the_check(slurm, tmp_path):
    name = f"fits-{uuid.uuid4().hex[:8]}"
    proc = _submit(slurm, tmp_path, name, "jobs=[vocab]", "slurm.prep.cpus_per_task=1", "slurm.prep.time=00:01:00",
                   "input_dir=/nonexistent")
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.split()[1]
    slurm.run("scancel", job_id)
