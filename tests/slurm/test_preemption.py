"""Preemption for real: a training job signalled mid-run (SLURM's `--signal=B:USR1@...`
warning, sent with `scancel --signal=USR1 --batch`) checkpoints, requeues itself and resumes;
a job requeued from outside (`scontrol requeue`: SIGTERM, then SIGKILL) restarts from its
checkpoints. Both must end with the same steps, losses and final checkpoint as an
uninterrupted job of the same config, and no complete checkpoint may be lost or corrupt."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.pretrain.test_train import records
from tests.slurm.conftest import REPO, job_output

SCRIPT = str(REPO / "slurm" / "pretrain.sbatch")
MAX_STEPS, SAVE_EVERY, INTERRUPT_AT = 120, 20, 30
TRAIN_ARGS = ["model=tiny", f"trainer.max_steps={MAX_STEPS}", f"trainer.save_every={SAVE_EVERY}",
              "trainer.log_every=1", "trainer.keep_last=3", "deepspeed.precision=fp32", "data.num_workers=1",
              "wandb.mode=offline"]


def _submit(slurm, data: Path, run: Path) -> str:
    return slurm.sbatch("--ntasks=2", "--cpus-per-task=1", "--time=00:30:00", f"--output={run}.out",
                        SCRIPT, f"data_dir={data}", f"run_dir={run}", *TRAIN_ARGS, cwd=run.parent)


def _logged_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        return json.loads(lines[-1])["step"] if lines else 0
    except json.JSONDecodeError:
        return 0


def _interrupt_when(slurm, job: str, run: Path, step: int, action, timeout: float = 600) -> int:
    deadline = time.monotonic() + timeout
    while _logged_step(run) < step:
        assert slurm.state(job) in ("PENDING", "RUNNING", "CONFIGURING"), slurm.job(job)
        assert time.monotonic() < deadline, f"step {step} never reached"
        time.sleep(0.2)
    at = _logged_step(run)
    assert at < MAX_STEPS, "the run ended before it could be interrupted: raise MAX_STEPS"
    action()
    return at


@pytest.mark.slow
def test_interrupted_jobs_requeue_resume_and_end_like_an_uninterrupted_one(slurm, prepared_data, tmp_path):
    straight, signalled, requeued = tmp_path / "straight", tmp_path / "signalled", tmp_path / "requeued"
    jobs = {run: _submit(slurm, prepared_data, run) for run in (straight, signalled, requeued)}

    # The time-limit warning: USR1 to the batch shell only, as `--signal=B:USR1@120` sends it.
    _interrupt_when(slurm, jobs[signalled], signalled, INTERRUPT_AT,
                    lambda: slurm.run("scancel", "--signal=USR1", "--batch", jobs[signalled]))
    # Requeued from outside while training (an admin, or preemption with PreemptMode=REQUEUE).
    _interrupt_when(slurm, jobs[requeued], requeued, INTERRUPT_AT + 5,
                    lambda: slurm.run("scontrol", "requeue", jobs[requeued]))
    slurm.wait(*jobs.values(), timeout=900)
    logs = job_output(tmp_path)

    for run, job in jobs.items():
        info = slurm.job(job)[0]
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{run.name}: {info}\n{logs}"
        assert int(info["Restarts"]) == (0 if run == straight else 1), f"{run.name}: {info}\n{logs}"
    out = Path(f"{signalled}.out").read_text()
    stopped = [line for line in out.splitlines() if line.startswith("stopping at step")]
    assert len(stopped) == 1 and "requeued job" in out, out
    stop_step = int(stopped[0].split()[3])
    assert f"resuming from step {stop_step} " in out, out  # from the checkpoint the signal made
    assert "resuming from step" in Path(f"{requeued}.out").read_text(), logs

    # Same losses at every step as the uninterrupted job (fp32 on CPU: bit for bit), none twice.
    expected = records(straight)
    assert sorted(expected) == list(range(1, MAX_STEPS + 1))
    for run in (signalled, requeued):
        assert records(run) == expected, f"{run.name} differs from the uninterrupted run\n{logs}"
        assert records(run, "valid/loss") == records(straight, "valid/loss")
        lines = (run / "metrics.jsonl").read_text().splitlines()
        assert len([line for line in lines if '"loss"' in line]) == MAX_STEPS
        # Every checkpoint left is complete and `latest` names the final one.
        ckpts = run / "checkpoints"
        assert (ckpts / "latest").read_text().strip() == f"step_{MAX_STEPS:08d}"
        for tag in ckpts.glob("step_*"):
            meta = json.loads((tag / "checkpoint.json").read_text())
            assert meta["step"] == int(tag.name.split("_")[1]) and meta["world_size"] == 2
            assert list(tag.rglob("*model_states.pt")), tag
        # One W&B run across the restart.
        run_id = (run / "wandb_run_id").read_text().strip()
        assert {p.name.rsplit("-", 1)[1] for p in (run / "wandb").glob("offline-run-*")} == {run_id}
        assert len(list((run / "wandb").glob("offline-run-*"))) == 2
