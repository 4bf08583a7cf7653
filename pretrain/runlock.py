"""One trainer per run dir: an exclusive OS lock on RUN_DIR/run.lock for the whole run.

The lock is a POSIX record lock (fcntl.lockf), which NFS (NLM/NFSv4) and Lustre (mounted
with -o flock) carry across nodes, and which the kernel drops when the holding process dies
for any reason, SIGKILL included: a crashed trainer never leaves its run dir locked. Unlike
flock(), it is not inherited by forked children, so a DataLoader worker outliving a killed
trainer for a few seconds does not hold it either.

The file also says who holds it (one JSON line: host, pid, SLURM job id and restart count,
start time), for the refusal message and for `xlmr-status`. A second trainer refuses at once,
naming the holder. A requeued SLURM job (the same job id) whose earlier instance still holds
the lock (its tasks are being killed) waits for it up to trainer.lock_wait_s, then takes over.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from pretrain.config import PretrainError

LOCK_FILE = "run.lock"


def holder(run_dir: Path) -> Optional[dict]:
    """Who holds (or last held) the lock of run_dir, from the lock file; None if unknown."""
    try:
        text = (Path(run_dir) / LOCK_FILE).read_text(encoding="utf-8").strip()
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


def describe(info: Optional[dict]) -> str:
    if not info:
        return "another process (holder unknown)"
    job = f", SLURM job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
    return f"pid {info.get('pid')} on {info.get('host')}{job}, since {info.get('started')}"


def _me() -> dict:
    env = os.environ
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": env.get("SLURM_JOB_ID"),
            "slurm_restart_count": env.get("SLURM_RESTART_COUNT"),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


class RunLock:
    """Held from `acquire()` until `release()` (or the process's end)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.fd: Optional[int] = None

    def acquire(self, wait_s: float = 0.0, say=print) -> None:
        """Take the lock or raise PretrainError naming its holder. Only a requeued instance of
        the holder's own SLURM job waits (up to wait_s) for it to be released."""
        path = self.run_dir / LOCK_FILE
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise PretrainError(f"run_dir={self.run_dir}: cannot create {LOCK_FILE} there ({exc.strerror}): "
                                "give a writable directory") from None
        deadline, waiting = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                pass
            info = holder(self.run_dir)
            mine = os.environ.get("SLURM_JOB_ID")
            if not (mine and info and info.get("slurm_job_id") == mine and time.monotonic() < deadline):
                os.close(fd)
                raise PretrainError(
                    f"run_dir={self.run_dir} is in use by another xlmr-pretrain ({describe(info)}; lock "
                    f"{path}): wait for it to finish or stop it, or use another run_dir")
            if not waiting:
                say(f"waiting for the earlier instance of SLURM job {mine} ({describe(info)}) to release "
                    f"{path} (up to {wait_s:.0f} s)")
                waiting = True
            time.sleep(1.0)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_me()) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        if waiting:
            say(f"took over {path} from the earlier instance of the job")

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock; the file stays, naming the last holder
            self.fd = None
