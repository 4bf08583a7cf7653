"""DeepSpeed's CPU communication op, built on a machine's first CPU run (1-6 minutes) into
torch's extension dir (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions): say so
instead of a silent wait, and name a stale build lock instead of waiting on it forever.

torch's builder (cpp_extension.FileBaton) takes the build by creating BUILD_DIR/lock and
keeps it open until it deletes it; every other process waits while the file exists. A
builder killed midway leaves the file behind with nobody holding it: every later run and
test would wait without a word. Nobody holding it is seen in /proc (this host's processes);
since a home dir may be shared by nodes, a lock is called stale only when, besides, nothing
in the build dir changed for STALE_AFTER_S.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from pretrain.config import PretrainError

OP = "ShareMemCommBuilder"
# A build writes into its dir every few seconds (compiler outputs); a lock with nobody on this
# host holding it and no change for this long is a killed build's, not another host's.
STALE_AFTER_S = 600


def build_dir() -> Optional[Path]:
    """Where the op is (or will be) built; None where DeepSpeed does not use it (GPUs)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder(OP)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    return Path(_get_build_directory(builder.name, verbose=False))


def holders(path: Path) -> list[int]:
    """Pids of this host's processes that have ``path`` open."""
    target, pids = str(path.resolve()), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) == target for fd in (proc / "fd").iterdir()):
                pids.append(int(proc.name))
        except OSError:  # gone, or not ours to look at
            continue
    return pids


def _idle_s(directory: Path) -> float:
    """Seconds since anything in the build dir changed."""
    newest = max((p.stat().st_mtime for p in [directory, *directory.iterdir()]), default=0.0)
    return time.time() - newest


def check_op_build(say) -> None:
    """Before DeepSpeed initializes: announce a build, refuse a stale lock, name a live builder."""
    directory = build_dir()
    if directory is None:
        return
    lock = directory / "lock"
    if lock.exists():
        pids = holders(lock)
        if pids:
            say(f"waiting for process {', '.join(map(str, pids))} to finish building DeepSpeed's CPU communication "
                f"op in {directory}")
        elif _idle_s(directory) >= STALE_AFTER_S:
            raise PretrainError(
                f"{lock} is a stale lock of DeepSpeed's CPU communication op build (no process on this host holds "
                f"it and nothing in {directory} changed for {STALE_AFTER_S // 60} min: its builder was killed): "
                "delete it and run again (the op is then built anew, 1-6 min)")
        else:  # a home dir shared by several nodes: another node may be building right now
            say(f"waiting on {lock}: no process on this host holds it; another host may be building the op (a "
                f"shared file system). If it was left by a killed build, delete it (it counts as stale after "
                f"{STALE_AFTER_S // 60} min without a change in {directory})")
    elif not any(directory.glob("*.so")):
        say(f"building DeepSpeed's CPU communication op in {directory} (once per machine, 1-6 min)")
