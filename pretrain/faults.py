"""The trainer's answers to faults a cluster produces, kept out of the training loop: the
run-dir lock taken on every rank's behalf, damaged shards met while training, and the one
line a damaged shard ends a run with. The README's "Bad input" and "Preemption" sections
list every case.
"""
from __future__ import annotations

from pathlib import Path

from pretrain.config import PretrainError
from pretrain.distributed import all_gather_object, broadcast_object
from pretrain.runlock import RunLock


def lock_run_dir(run_dir: Path, rank: int, wait_s: float, say) -> RunLock:
    """Rank 0 takes the run dir's lock (runlock.py) for the whole run; every rank raises the
    same PretrainError when it cannot, so none is left waiting in a collective."""
    lock, error = RunLock(run_dir), None
    if rank == 0:
        try:
            lock.acquire(wait_s, say)
        except PretrainError as exc:
            error = str(exc)
    error = broadcast_object(error)
    if error:
        raise PretrainError(error)
    return lock


def note_damaged_shards(micro_batches: list, state: dict, step: int, skip: bool, say) -> None:
    """data.on_damaged_shard=skip: add the shards the loader skipped in this step's batches
    (on any rank) to state["damaged_shards"], which checkpoints keep, and log each one."""
    if not skip:
        return
    found = [entry for batch in micro_batches for entry in batch.get("damaged_shards", [])]
    for name, reason in (pair for gathered in all_gather_object(found) for pair in gathered):
        if name not in state["damaged_shards"]:
            state["damaged_shards"].append(name)
            say(f"step {step}: skipped damaged shard {name} ({len(state['damaged_shards'])} so far): {reason}")


def shard_error_line(exc: Exception, data_dir: str) -> str:
    """A ShardError (raised here, or re-raised by a DataLoader worker with its traceback in
    the message) as one line: the shard, the sample, and how to go on."""
    last = [line for line in str(exc).splitlines() if line.strip()][-1]
    message = last.split("ShardError: ", 1)[-1].strip()
    return (f"damaged shard: {message}. Restore it from a copy, or rebuild the shards with "
            f"`xlmr-prep output_dir={data_dir} force=encode` (the same input and settings give the same shards; "
            "the run then resumes from its last checkpoint), or train on without it: data.on_damaged_shard=skip")
