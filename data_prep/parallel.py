"""Run independent jobs in worker processes with one progress bar showing throughput.

Workers report progress through a shared counter (bytes of text, or any unit) so that a
single big language still moves the bar; the first failing job stops the pool and its
exception reaches the caller unchanged.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Callable, Iterator, Optional, Sequence

from tqdm import tqdm

tqdm.monitor_interval = 0  # no monitor thread: the pool forks

_counter = None  # set in each worker (and in-process) by _init
_pending = 0  # this process's progress not yet added to _counter
# Jobs report per line; taking the shared counter's lock that often made the workers queue on
# it (two processes deduplicated no faster than one), so progress is added in batches.
FLUSH_EVERY = 1 << 22


def _init(counter) -> None:
    global _counter, _pending
    _counter, _pending = counter, 0


def advance(n: int) -> None:
    """Called by jobs as they make progress (cheap: a lock once per FLUSH_EVERY)."""
    global _pending
    if _counter is not None:
        _pending += n
        if _pending >= FLUSH_EVERY:
            _flush()


def _flush() -> None:
    global _pending
    if _counter is not None and _pending:
        with _counter.get_lock():
            _counter.value += _pending
    _pending = 0


def _run(fn: Callable, job):
    try:
        return fn(job)
    finally:
        _flush()


def resolve_workers(workers: int) -> int:
    return workers if workers > 0 else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def iter_jobs(
    fn: Callable,
    jobs: Sequence,
    *,
    workers: int,
    desc: str,
    unit: str = "B",
    total: Optional[int] = None,
    progress: bool = True,
) -> Iterator:
    """fn(job) for every job, each result handed back the moment its job is done.

    Results come in completion order (job order with one process), so that the caller can
    record each unit as complete right away: a kill then loses only the jobs in flight. What
    the stages write never depends on that order, only on which units are complete.
    """
    if not jobs:
        return
    ctx = mp.get_context("fork")
    counter = ctx.Value("q", 0)
    bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1000, disable=not progress, dynamic_ncols=True)
    try:
        if workers <= 1 or len(jobs) <= 1:
            _init(counter)
            for job in jobs:
                result = _run(fn, job)
                bar.update(counter.value - bar.n)
                yield result
            return
        with ctx.Pool(min(workers, len(jobs)), initializer=_init, initargs=(counter,)) as pool:
            pending = [pool.apply_async(_run, (fn, job)) for job in jobs]
            while pending:
                still = []
                for p in pending:
                    if not p.ready():
                        still.append(p)
                        continue
                    result = p.get()  # re-raises the worker's exception; the pool is terminated on exit
                    bar.update(counter.value - bar.n)
                    yield result
                pending = still
                bar.update(counter.value - bar.n)
                if pending:
                    time.sleep(0.05)
    finally:
        _init(None)
        bar.close()
