"""Checkpoint-and-exit on a signal: the trainer's side of a preemptible SLURM job.

SLURM warns a job before its time limit (`#SBATCH --signal=B:USR1@120`, passed on to the
tasks by `pretrain.cluster.slurm launch`) and kills a preempted or requeued one with SIGTERM (then
SIGKILL after KillWait). `install()` makes both signals only set a flag; the loop calls
`stop_requested()` once per metrics record (every trainer.log_every steps, where the loop syncs
with the device anyway). The ranks agree on it with one all-reduce (a signal reaches
them at different steps, and every rank must take part in the DeepSpeed checkpoint save),
then all save, and the process exits with `EXIT_PREEMPTED` so the launcher knows to requeue.
"""
from __future__ import annotations

import signal
import sys

# EX_TEMPFAIL: "try again later". `pretrain.cluster.slurm launch` requeues the job on this code only.
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_received: list[int] = []


def _handler(signum, frame) -> None:
    _received.append(signum)


def install() -> None:
    """Make SIGUSR1 and SIGTERM set the flag instead of killing the process."""
    _received.clear()
    for sig in SIGNALS:
        signal.signal(sig, _handler)


def received() -> bool:
    """Whether this process got a signal (local, no communication)."""
    return bool(_received)


def stop_requested(device="cpu") -> bool:
    """Collective: True on every rank once any rank got a signal. Call it on all ranks at
    the same point of the loop."""
    import torch  # here, not at the top: pretrain.cluster.slurm's launcher imports this module
    import torch.distributed as dist

    flag = torch.tensor([1.0 if _received else 0.0], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def exit_preempted() -> None:
    """Exit with EXIT_PREEMPTED; the trainer calls it after shutdown_distributed, so all ranks
    leave together and the launcher sees every task end with this code (srun returns the highest)."""
    sys.exit(EXIT_PREEMPTED)
