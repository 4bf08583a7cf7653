"""The SLURM edge of a training job: rank, world size and master address from SLURM's
environment, the signal relay of the batch shell, and the requeue.

`slurm/pretrain.sbatch` runs, in the batch shell,

    python3 -m pretrain.cluster.slurm launch -- xlmr-pretrain OVERRIDES...

which sets MASTER_ADDR (the job's first node) and MASTER_PORT (from the job id), then runs
`srun python3 -m pretrain.cluster.slurm task -- xlmr-pretrain ...`: one task per GPU, each of which
exports RANK/WORLD_SIZE/LOCAL_RANK from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (what torch
and DeepSpeed read) and execs the trainer.

Preemption: `#SBATCH --signal=B:USR1@120` signals the batch shell only. `launch` passes
SIGUSR1 (and SIGTERM) on to srun, which passes it to every task; the trainer checkpoints on
all ranks and exits with `preemption.EXIT_PREEMPTED`; then `launch` -- one process for the
whole job, never a rank -- requeues the job (`ARRAYJOBID_TASKID` for an array task) and the
requeued job resumes from the newest checkpoint in the same fixed run dir.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
from typing import Mapping, Optional, Sequence

from pretrain.preemption import EXIT_PREEMPTED


def first_host(nodelist: str) -> str:
    """The first node of a SLURM nodelist ("gpu[03-05,09],cpu1" -> "gpu03")."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30)
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        m = re.match(r"([^,\[]+)(?:\[([^,\]-]+))?", nodelist)
        if not m:
            raise ValueError(f"cannot parse SLURM nodelist {nodelist!r}") from None
        return m.group(1) + (m.group(2) or "")


def master_port(env: Mapping[str, str]) -> int:
    """A port per job and restart in 20000-39999, so jobs sharing a node do not collide and a
    requeued job does not wait for its predecessor's socket to be released."""
    job = int(env.get("SLURM_JOB_ID", "0"))
    restart = int(env.get("SLURM_RESTART_COUNT", "0"))
    return 20000 + (job * 7 + restart * 1009) % 20000


def master_env(env: Mapping[str, str]) -> dict[str, str]:
    """MASTER_ADDR and MASTER_PORT of this job (kept when already set)."""
    return {
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(env["SLURM_JOB_NODELIST"]),
        "MASTER_PORT": env.get("MASTER_PORT") or str(master_port(env)),
    }


def task_env(env: Mapping[str, str]) -> dict[str, str]:
    """torch.distributed's variables for this srun task."""
    missing = [k for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_NODELIST") if k not in env]
    if missing:
        raise KeyError(f"not inside an srun task: {', '.join(missing)} not set")
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": env.get("SLURM_NTASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "1")).split("(")[0],
        **master_env(env),
    }


def requeue_target(env: Mapping[str, str]) -> str:
    """What `scontrol requeue` takes: an array task by its array id, else the job id."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env["SLURM_JOB_ID"]


def requeue(env: Mapping[str, str]) -> bool:
    target = requeue_target(env)
    proc = subprocess.run(["scontrol", "requeue", target], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"pretrain.cluster.slurm: scontrol requeue {target} failed: {proc.stderr.strip()}", file=sys.stderr, flush=True)
        return False
    print(f"pretrain.cluster.slurm: requeued job {target}", flush=True)
    return True


def launch(command: Sequence[str], env: Optional[dict] = None, srun: Sequence[str] = ("srun",)) -> int:
    """The batch shell's part: srun the command on every task, relay SIGUSR1/SIGTERM to it,
    requeue when the trainer exits for preemption. Returns the exit code for the batch job."""
    env = dict(os.environ if env is None else env)
    env.update(master_env(env))
    print(f"pretrain.cluster.slurm: job {env.get('SLURM_JOB_ID')} restart {env.get('SLURM_RESTART_COUNT', '0')}: "
          f"{env.get('SLURM_NTASKS', '?')} tasks on {env.get('SLURM_JOB_NODELIST', '?')}, "
          f"master {env['MASTER_ADDR']}:{env['MASTER_PORT']}", flush=True)
    # --wait: a task that ends (crashed, or done) takes the others down after 60 s, instead of
    # leaving them blocked in a collective; not --kill-on-bad-exit, which would kill rank 0
    # while it closes W&B when another rank already exited with EXIT_PREEMPTED.
    argv = [*srun, "--kill-on-bad-exit=0", "--wait=60", sys.executable, "-m", "pretrain.cluster.slurm", "task", "--", *command]
    received: list[int] = []
    procs: list[subprocess.Popen] = []

    def relay(signum, frame):
        received.append(signum)
        print(f"pretrain.cluster.slurm: got {signal.Signals(signum).name}, passing it on to the tasks", flush=True)
        for proc in procs:
            try:
                proc.send_signal(signum)  # srun forwards it to every task of the step
            except ProcessLookupError:
                pass

    for sig in (signal.SIGUSR1, signal.SIGTERM):  # before srun starts: USR1's default action kills
        signal.signal(sig, relay)
    if signal.SIGUSR1 in received:  # warned before anything started: nothing to save
        return 0 if requeue(env) else 1
    proc = subprocess.Popen(argv, env=env)
    procs.append(proc)
    while True:
        try:
            rc = proc.wait()
            break
        except InterruptedError:  # pragma: no cover (PEP 475 retries)
            continue
    if rc == EXIT_PREEMPTED:
        print("pretrain.cluster.slurm: the trainer checkpointed and stopped for preemption", flush=True)
        if signal.SIGTERM in received and signal.SIGUSR1 not in received:
            return 0  # killed by SLURM (scancel, preemption, requeue): SLURM decides what follows
        return 0 if requeue(env) else 1
    return rc


def exec_task(command: Sequence[str]) -> None:
    """An srun task's part: export the rank variables and become the command."""
    os.environ.update(task_env(os.environ))
    os.execvp(command[0], list(command))


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pretrain.cluster.slurm", description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["launch", "task", "env"],
                        help="launch: in the batch shell; task: in each srun task; env: print the task's variables")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.mode == "env":
        for key, value in task_env(os.environ).items():
            print(f"{key}={value}")
        return
    if not command:
        parser.error("no command given after --")
    if args.mode == "task":
        exec_task(command)
    sys.exit(launch(command))


if __name__ == "__main__":
    main()
