"""Where the train stream stands, in terms that survive a change of layout (ranks, loader
workers per rank, micro batch size).

Per language the loader reads an endless list of *items*. An item is (position, start): the
shard at `position` of the language's shard sequence (dealing.ShardSequence), read from its
`start`-th sample (in the shard's block-shuffled order) to its end. A *plan* fixes the items of
one generation of the run: first its `pending` items, then the fresh positions `next`,
`next + 1`, ...; item i goes to slot i % num_slots (a slot is one rank x worker pair).

A run keeps its plan while its layout stays (the first plan has nothing pending: slot s reads
positions s, s + num_slots, ...). A run resumed with another layout calls `carry_over`: it
replays the old generation's language draws (no I/O) to find how far every old slot got in
every language, and starts a new generation whose pending items are exactly the unread rest:
the partly read shards from where they stopped, then the ones never started. No sample is
read twice or skipped because of the change; only the order of what follows differs from
a run that kept its layout.

A plan is plain JSON data, saved in every checkpoint's client state:
    {"generation": 0, "start": 0,          # micro-batches per rank consumed before it began
     "layout": {"world_size": 2, "num_workers": 2, "micro_batch_size": 8},
     "pending": {"en": [[12, 40], ...]},   # per language: [position, start] items
     "next": {"en": 37}}                   # per language: the first fresh position
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import numpy as np

_LANGUAGE_DRAWS = 1  # first word of the mixing RNG's seed (see dealing._SHARD_ORDER)


def layout(world_size: int, num_workers: int, micro_batch_size: int) -> dict[str, int]:
    return {"world_size": world_size, "num_workers": max(1, num_workers), "micro_batch_size": micro_batch_size}


def first_plan(run_layout: dict[str, int]) -> dict:
    return {"generation": 0, "start": 0, "layout": dict(run_layout), "pending": {}, "next": {}}


def num_slots(plan: dict) -> int:
    return plan["layout"]["world_size"] * plan["layout"]["num_workers"]


def slot_items(plan: dict, lang: str, slot: int) -> Iterator[tuple[int, int]]:
    """(position, start) of the items ``slot`` reads in this generation, in order, endless."""
    pending, fresh = plan["pending"].get(lang, []), plan["next"].get(lang, 0)
    for i in itertools.count(slot, num_slots(plan)):
        yield _item(pending, fresh, i)


def _item(pending: list, fresh: int, i: int) -> tuple[int, int]:
    return (pending[i][0], pending[i][1]) if i < len(pending) else (fresh + i - len(pending), 0)


def language_rng(seed: int, plan: dict, rank: int, worker: int) -> np.random.Generator:
    """The RNG of one slot's language draws in this generation."""
    return np.random.default_rng([seed, _LANGUAGE_DRAWS, plan["generation"], rank, worker])


def draw_languages(rng: np.random.Generator, cdf: np.ndarray, samples: int) -> np.ndarray:
    """Languages (indices into the mixture) of the next ``samples`` samples, i.i.d. from the
    mixing probabilities. One call for n samples draws the same as n calls of one (Generator.random
    takes one 64-bit output per double, in order): a resume replays 10^6 micro-batches in seconds."""
    u = rng.random(samples)
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)


def micro_batches_made(consumed: int, worker: int, num_workers: int) -> int:
    """Micro-batches worker ``worker`` made out of the first ``consumed`` of its rank (batch i
    of a generation comes from worker i % num_workers: torch hands batches out round-robin)."""
    return max(0, -(-(consumed - worker) // num_workers))


def language_counts(rng: np.random.Generator, runs: list[tuple[np.ndarray, int]], micro_batch_size: int,
                    num_langs: int) -> np.ndarray:
    """Samples per language in a slot's micro-batches given as runs of (cdf, micro-batches)
    (phases.Mixture.runs; one run without phases); advances rng."""
    counts = np.zeros(num_langs, dtype=np.int64)
    for cdf, micro_batches in runs:
        samples = micro_batches * micro_batch_size
        for done in range(0, samples, 1 << 20):
            counts += np.bincount(draw_languages(rng, cdf, min(samples - done, 1 << 20)), minlength=len(cdf))
    return counts


def progress(items: Iterator[tuple[int, int]], shard_samples: Callable[[int], int], consumed: int) -> tuple[int, int]:
    """(items finished, samples read of the next one) after ``consumed`` samples of ``items``."""
    for finished, (position, start) in enumerate(items):
        left = max(0, shard_samples(position) - start)  # 0: a shard the stream skips (unusable)
        if consumed < left:
            return finished, consumed
        consumed -= left
    raise AssertionError("unreachable: items are endless")


def carry_over(plan: dict, consumed: int, new_layout: dict[str, int], seed: int, runs: Callable[..., list],
               languages: list[str], shard_samples: dict[str, Callable[[int], int]]) -> dict:
    """The next generation's plan for ``new_layout``, after every rank of ``plan``'s layout
    consumed ``consumed`` micro-batches (counted from the run's start). ``languages`` are the
    mixture's languages in the order of the CDFs; ``shard_samples[lang](position)`` the size
    of the shard at a position of that language's sequence; ``runs(start, first, count, stride)``
    the (cdf, micro-batches) runs of a slot's micro-batches (phases.Mixture.runs)."""
    old, n_slots = plan["layout"], num_slots(plan)
    in_generation = consumed - plan["start"]
    counts = {}  # slot -> samples per language
    for rank in range(old["world_size"]):
        for worker in range(old["num_workers"]):
            made = micro_batches_made(in_generation, worker, old["num_workers"])
            rng = language_rng(seed, plan, rank, worker)
            slot_runs = runs(plan["start"], worker, made, old["num_workers"])
            counts[rank * old["num_workers"] + worker] = language_counts(rng, slot_runs, old["micro_batch_size"], len(languages))

    pending, fresh = {}, {}
    for li, lang in enumerate(languages):
        old_pending, old_next = plan["pending"].get(lang, []), plan["next"].get(lang, 0)
        read = {}  # item index -> samples read (items not in here and below `touched` are unstarted)
        touched = -1  # the highest item index any slot started
        for slot in range(n_slots):
            finished, partial = progress(slot_items(plan, lang, slot), shard_samples[lang], int(counts[slot][li]))
            for k in range(finished):
                read[slot + k * n_slots] = None  # done
            current = slot + finished * n_slots
            if partial:
                read[current] = partial
            touched = max(touched, current if partial else current - n_slots)
        rest = []
        for i in range(max(touched, len(old_pending) - 1) + 1):
            position, start = _item(old_pending, old_next, i)
            if i not in read:
                rest.append([position, start])
            elif read[i] is not None:
                rest.append([position, start + read[i]])
        if rest:
            pending[lang] = rest
        fresh[lang] = old_next + max(0, touched + 1 - len(old_pending))
    return {"generation": plan["generation"] + 1, "start": consumed, "layout": dict(new_layout),
            "pending": pending, "next": fresh}
