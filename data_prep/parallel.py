"""Run independent jobs in worker processes with one progress bar showing throughput.

Workers report progress through a shared counter (bytes of text, or any unit) so that a
single big language still moves the bar; the first failing job stops the pool and its
exception reaches the caller unchanged.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Callable, List, Optional, Sequence

from tqdm import tqdm

tqdm.monitor_interval = 0  # no monitor thread: the pool forks

_counter = None  # set in each worker (and in-process) by _init


def _init(counter) -> None:
    global _counter
    _counter = counter


def advance(n: int) -> None:
    """Called by jobs as they make progress."""
    if _counter is not None:
        with _counter.get_lock():
            _counter.value += n


def resolve_workers(workers: int) -> int:
    return workers if workers > 0 else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def run_jobs(
    fn: Callable,
    jobs: Sequence,
    *,
    workers: int,
    desc: str,
    unit: str = "B",
    total: Optional[int] = None,
    progress: bool = True,
) -> List:
    """fn(job) for every job; results in job order."""
    if not jobs:
        return []
    ctx = mp.get_context("fork")
    counter = ctx.Value("q", 0)
    bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1000, disable=not progress, dynamic_ncols=True)
    try:
        if workers <= 1 or len(jobs) <= 1:
            _init(counter)
            results = []
            for job in jobs:
                results.append(fn(job))
                bar.update(counter.value - bar.n)
            return results
        with ctx.Pool(min(workers, len(jobs)), initializer=_init, initargs=(counter,)) as pool:
            pending = [pool.apply_async(fn, (job,)) for job in jobs]
            while not all(p.ready() for p in pending):
                for p in pending:
                    if p.ready() and not p.successful():
                        p.get()  # re-raise the worker's exception; the pool is terminated on exit
                bar.update(counter.value - bar.n)
                time.sleep(0.1)
            results = [p.get() for p in pending]
            bar.update(counter.value - bar.n)
            return results
    finally:
        _init(None)
        bar.close()
