"""Training phases of the language mixture: per range of optimizer steps, the sampling
temperature and the set of languages mixed (mmBERT anneals alpha 0.7 -> 0.5 -> 0.3 while it
adds languages phase by phase; XLM-R is one phase, alpha 0.3, every language).

`data.phases` lists the phases in order; phase i covers the steps before its `until_step`
that the earlier phases leave, the last one (no `until_step`) the rest. No phases: one
phase of `data.alpha` over every language, exactly the single mixture of before.

A micro-batch's phase is that of the optimizer step it is consumed in: micro-batch `a` of a
rank (counted from the run's start) belongs to step a // gradient_accumulation_steps. So the
mixture changes exactly at a step boundary, and as the loader draws every micro-batch's
languages from its slot's one RNG stream, the resume replay (position.language_counts) is a
run of draws per phase: pure arithmetic on the step, like the single-mixture case.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, List, Optional

import numpy as np

from data_prep.sampling import temperature_probs
from pretrain.data.manifest import train_token_counts


@dataclass
class PhaseConfig:
    until_step: Optional[int] = None  # the phase ends before this optimizer step; None: the last phase
    alpha: Optional[float] = None  # q_i ∝ n_i^alpha over the phase's languages; None: data.alpha
    languages: Optional[List[str]] = None  # the languages mixed in the phase; None: every one with train data
    mask_prob: Optional[float] = None  # the phase's masking rate; None: masking.mask_prob's schedule


class Mixture:
    """The mixing probabilities of every phase over one fixed language list (`languages`:
    every language some phase mixes), as CDFs for position.draw_languages."""

    def __init__(self, manifest: dict[str, Any], phases: list, default_alpha: float):
        self.phases = [PhaseConfig(**dict(p)) if not isinstance(p, PhaseConfig) else p for p in phases] or [PhaseConfig()]
        counts = train_token_counts(manifest)
        _check(self.phases, counts)
        self.bounds = [p.until_step for p in self.phases[:-1]]
        self.alphas = [default_alpha if p.alpha is None else p.alpha for p in self.phases]
        in_play = [sorted(p.languages) if p.languages is not None else list(counts) for p in self.phases]
        self.probs = [temperature_probs({lang: counts[lang] for lang in langs}, alpha)
                      for langs, alpha in zip(in_play, self.alphas)]
        self.languages = [lang for lang in counts if any(q.get(lang, 0) > 0 for q in self.probs)]
        self.cdfs = [_cdf(np.array([q.get(lang, 0.0) for lang in self.languages])) for q in self.probs]

    def phase_at(self, step: int) -> int:
        """The phase of 0-based optimizer step `step` (the update that makes the step count step + 1)."""
        return bisect.bisect_right(self.bounds, step)

    def in_play(self, step: int) -> list[str]:
        return sorted(lang for lang, q in self.probs[self.phase_at(step)].items() if q > 0)

    def runs(self, start: int, first: int, count: int, stride: int, micro_batches_per_step: int):
        """[(cdf, n), ...]: the CDFs of the micro-batches first, first + stride, ... (count of
        them) of a generation that began at micro-batch `start`, as runs of one phase."""
        runs, done = [], 0
        for phase, bound in enumerate([*self.bounds, None]):
            if bound is None:
                upto = count
            else:  # how many of them come before the boundary's first micro-batch
                before = bound * micro_batches_per_step - start - first
                upto = min(count, max(0, -(-before // stride)))
            if upto > done:
                runs.append((self.cdfs[phase], upto - done))
                done = upto
        return runs


def _cdf(probs: np.ndarray) -> np.ndarray:
    """cumsum of probs / sum, exactly 1.0 from the last language with mass on, so that a draw
    u < 1 never lands on a language the phase leaves out (searchsorted side="right")."""
    cdf = np.cumsum(probs / probs.sum())
    cdf[np.flatnonzero(probs > 0)[-1]:] = 1.0
    return cdf


def _check(phases: list[PhaseConfig], counts: dict[str, int]) -> None:
    """One-line errors for a phase list that cannot be meant."""
    for i, phase in enumerate(phases):
        where = f"data.phases[{i}]"
        last = i == len(phases) - 1
        if last and phase.until_step is not None:
            raise ValueError(f"{where}.until_step={phase.until_step}: the last phase runs to the end, leave it out")
        if not last and phase.until_step is None:
            raise ValueError(f"{where} has no until_step: only the last phase may leave it out")
        if not last and (phase.until_step < 1 or (i and phase.until_step <= phases[i - 1].until_step)):
            raise ValueError(f"{where}.until_step={phase.until_step}: phases must end at increasing steps >= 1")
        if phase.alpha is not None and phase.alpha < 0:
            raise ValueError(f"{where}.alpha={phase.alpha}: must be >= 0")
        if phase.mask_prob is not None and not 0 <= phase.mask_prob <= 1:
            raise ValueError(f"{where}.mask_prob={phase.mask_prob}: must be in [0, 1]")
        if phase.languages is not None:
            unknown = sorted(set(phase.languages) - set(counts))
            if unknown or not phase.languages:
                raise ValueError(f"{where}.languages: {unknown or 'empty'}: not languages with train data "
                                 f"(the data has {', '.join(counts)})")
