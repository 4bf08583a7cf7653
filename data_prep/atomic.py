"""Atomic file writes: a file appears under its final name only once it is complete.

Everything the prep writes goes through here, so a run killed at any point (kill -9, full
disk) leaves at most `*.tmp-PID` files, which no stage mistakes for output and which the next
run removes.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import IO, Iterator

TMP_MARK = ".tmp-"


def tmp_path_for(path: Path) -> Path:
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "wb", **kwargs) -> Iterator[IO]:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False, sort_keys=False)
        f.write("\n")


def read_json(path: Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def remove_stale_tmp_files(root: Path) -> int:
    """Delete leftovers of killed runs; returns how many were removed."""
    removed = 0
    if root.exists():
        for p in root.rglob(f"*{TMP_MARK}*"):
            if p.is_file():
                p.unlink(missing_ok=True)
                removed += 1
    return removed
