"""Schedules as pure functions of the optimizer step: the masking rate (`mask_prob_at`) and
the shapes the learning-rate schedules (optim.lr_factor) decay with.

`mask_prob_at(step, ...)` is what the training loop passes into masking.mask_batch as its
`mask_prob`: a resumed run, or a loader worker that masks, gets the same rate from the step
alone. A phase's own `mask_prob` (data.phases) wins over the schedule inside that phase.
"""
from __future__ import annotations

import math
from typing import Optional

SHAPES = ("linear", "cosine", "sqrt")  # sqrt: 1 - sqrt(progress), Hägele et al. 2024's cooldown
MASK_SCHEDULES = ("constant", "linear", "cosine", "step")


def decay(shape: str, progress: float) -> float:
    """1 at progress 0, falling to 0 at progress 1 (clamped outside [0, 1])."""
    p = min(1.0, max(0.0, progress))
    if shape == "linear":
        return 1.0 - p
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if shape == "sqrt":
        return 1.0 - math.sqrt(p)
    raise ValueError(f"unknown decay shape {shape!r}: one of {', '.join(SHAPES)}")


def mask_prob_at(step: int, masking, max_steps: int, phase_mask_prob: Optional[float] = None) -> float:
    """The masking rate of 0-based optimizer step `step`: masking.mask_prob until
    masking.schedule_start, then towards masking.end_mask_prob, reached at schedule_end (None:
    max_steps): linearly, along a half cosine, or (step) all at once at schedule_start."""
    if phase_mask_prob is not None:
        return phase_mask_prob
    if masking.schedule == "constant":
        return masking.mask_prob
    start, end = masking.schedule_start, masking.schedule_end if masking.schedule_end is not None else max_steps
    s0, s1 = masking.mask_prob, masking.end_mask_prob
    if masking.schedule == "step":
        return s0 if step < start else s1
    progress = (step - start) / max(1, end - start)
    return s1 + (s0 - s1) * decay(masking.schedule, progress)
