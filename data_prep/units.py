"""Units of work: what every stage is split into, and how each one is recorded as done.

A unit (a clean part, a dedup bucket, a vocab-sample part...) has a name, a fingerprint of
everything its output depends on, and a job for a worker process. `run_units` skips the units
whose marker matches, deals the rest over this job array task's processes, and writes each
unit's marker (state/STAGE/NAME.json, after the unit's outputs) the moment the unit is done:
a kill at any point loses only the units in flight, and a rerun does the others.

Array tasks (task.index of task.count) deal out all units of a stage, done or not, biggest
first, so that every task computes the same deal from the same inputs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from . import parallel
from .config import TaskConfig
from .state import Layout, load_marker, require_allowed

log = logging.getLogger("xlmr-prep")


@dataclass(frozen=True)
class Unit:
    name: str  # its marker is state/STAGE/NAME.json
    fingerprint: str
    job: Any  # the argument of the stage's work function (picklable)
    size: int  # bytes of input: the deal and the progress bar


def run_units(layout: Layout, stage: str, units: List[Unit], work: Callable, *, workers: int,
              task: TaskConfig = TaskConfig(), progress: bool = True, allowed: bool = True,
              desc: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Run this task's share of the units that are not done yet.

    `work(job)` returns (result, outputs): the result is kept in the marker, the outputs are
    the files the marker vouches for. Returns {unit name: result} for all units once every
    unit is done, or None while units dealt to other array tasks are still missing.
    """
    results = {u.name: load_marker(layout.marker(stage, u.name))["result"]
               for u in units if layout.is_done(stage, u.name, u.fingerprint)}
    pending = [u for u in units if u.name not in results]
    require_allowed(stage, len(pending), allowed)
    deal = sorted(units, key=lambda u: (-u.size, u.name))[task.index::task.count]
    todo = [u for u in deal if u.name not in results]
    if units:
        log.info("%s: %d units, %d done before, %d to do in this task", desc or stage, len(units), len(results), len(todo))

    for index, (result, outputs) in parallel.iter_jobs(
        _indexed(work), list(enumerate(u.job for u in todo)), workers=workers, desc=desc or stage,
        total=sum(u.size for u in todo), progress=progress,
    ):
        unit = todo[index]
        layout.write_marker(stage, unit.name, unit.fingerprint, outputs, result=result)
        results[unit.name] = result
    if len(results) < len(units):
        return None
    return {u.name: results[u.name] for u in units}


class _indexed:
    """work(job) -> (index, work's answer): tells which unit a result belongs to."""

    def __init__(self, work: Callable):
        self.work = work

    def __call__(self, item):
        index, job = item
        return index, self.work(job)
