"""The train and validation loaders: per-slot endless language-mixed streams with exact
resume, and one deterministic loader per language over its held-out shards.

The README ("Data loading") documents the design and its guarantees.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Iterator
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.data import position
from pretrain.data.dealing import ShardSequence, block_order
from pretrain.data.manifest import Shard, languages, shard_index, shard_problem, usable_shards, warn_skipped
from pretrain.data.phases import Mixture, PhaseConfig
from pretrain.data.shards import ShardError, TokenSpec, read_shard, verify_shard


@dataclass
class DataConfig:
    """How to read the prepared data (conf/data/*.yaml mirrors these fields)."""

    alpha: float = 0.3  # language sampling temperature: q_i ∝ n_i^alpha, n_i = train tokens
    seed: int = 0  # seeds shard order, in-shard shuffle and language draws
    num_workers: int = 2  # dataloader worker processes per rank (0: read in the main process)
    prefetch_factor: int = 4  # micro-batches each worker prepares ahead
    shuffle_block: int = 256  # shuffle samples within blocks of this many per shard (1: off)
    pin_memory: bool = True  # pinned host memory for faster copies, when CUDA is available
    valid_max_sequences_per_lang: Optional[int] = None  # cap each language's validation set
    # Per range of steps its own alpha, languages and masking rate (phases.py); empty: one
    # phase of `alpha` over every language.
    phases: List[PhaseConfig] = field(default_factory=list)
    # A train shard found damaged while training (sha256 or content): fail (a one-line error,
    # exit 2) | skip (counted, logged, and remembered in checkpoints, so resume stays exact).
    on_damaged_shard: str = "fail"


def _collate(rows: list[tuple[str, np.ndarray]], langs: list[int], spec: TokenSpec) -> dict[str, Any]:
    """input_ids [B, seq_len] right-padded with <pad>; lang [B] (index into languages());
    keys [B] (the samples' __key__, for debugging and tests: a list of str, not a tensor)."""
    input_ids = np.full((len(rows), spec.seq_len), spec.pad, dtype=np.int64)
    for row, (_, tokens) in zip(input_ids, rows):
        row[: len(tokens)] = tokens
    return {
        "input_ids": torch.from_numpy(input_ids),
        "lang": torch.tensor(langs, dtype=torch.long),
        "keys": [key for key, _ in rows],
    }


class TrainStream(IterableDataset):
    """The endless micro-batch stream of one rank; each dataloader worker makes every
    num_workers-th micro-batch from its own slot. Its state is the plan of the current
    generation (position.py) and ``consumed_micro_batches``."""

    def __init__(self, data_dir, manifest, cfg: DataConfig, rank: int, plan: dict, consumed_micro_batches: int = 0,
                 micro_batches_per_step: int = 1, damaged: Collection[str] = ()):
        self.cfg, self.rank, self.plan = cfg, rank, plan
        # on_damaged_shard=skip: shards found damaged so far (the manifest's paths, from the
        # checkpoint) count as empty; ones found now are announced in the batch that met them.
        self.damaged, self.found_damaged = set(damaged), []
        self.micro_batch_size, self.num_workers = plan["layout"]["micro_batch_size"], plan["layout"]["num_workers"]
        self.consumed = consumed_micro_batches - plan["start"]  # within this generation
        self.spec = TokenSpec.from_manifest(manifest)
        self.languages = languages(manifest)
        self.mixture = Mixture(manifest, cfg.phases, cfg.alpha)
        self.mixed = self.mixture.languages  # every language some phase mixes: the draws index this
        # The (cdf, micro-batches) runs of a slot's micro-batches: phase changes at step boundaries.
        self.runs = functools.partial(self.mixture.runs, micro_batches_per_step=micro_batches_per_step)
        # No shard file is touched here: a manifest can list 100k shards (see `samples`).
        self.data_dir, index = data_dir, shard_index(data_dir, manifest)
        self.sequences: dict[str, ShardSequence] = {}
        self.skipped_shards: list[Shard] = []  # found unusable by this process so far
        self._usable: dict[Shard, bool] = {}
        self._readable_langs: set[str] = set()
        for lang in self.mixed:
            if (lang, "train") not in index:
                raise ShardError(f"no readable train shard for {lang!r} in {data_dir}: re-run xlmr-prep")
            self.sequences[lang] = ShardSequence(index[lang, "train"], seed=cfg.seed)

    def samples(self, lang: str) -> Callable[[int], int]:
        """The samples the stream reads from the shard at a position of ``lang``'s sequence: the
        manifest's count, or 0 for a shard whose file is missing or not the manifest's size (a
        truncated copy, a partial rsync), skipped with a warning. A shard is checked (one stat)
        when the stream first reaches it, and on resume when the replay walks past it, so every
        process that reaches a shard decides the same and resume stays exact; no process stats
        every shard of the manifest."""
        sequence = self.sequences[lang]
        return lambda position: sequence[position].samples if self._usable_shard(sequence[position]) else 0

    def _usable_shard(self, shard: Shard) -> bool:
        """Not skipped for a wrong size (below), nor as damaged before (data.on_damaged_shard=skip)."""
        return shard.name not in self.damaged and self._right_size(shard)

    def _right_size(self, shard: Shard) -> bool:
        usable = self._usable.get(shard)
        if usable is None:
            problem = shard_problem(shard)
            usable = self._usable[shard] = problem is None
            if problem:
                warn_skipped(shard, problem)
                self.skipped_shards.append(shard)
                # Damage found: make sure the language has a usable shard at all (else the stream
                # would skip forever). Stats this language's shards, once.
                if shard.lang not in self._readable_langs:
                    if all(shard_problem(s) for s in self.sequences[shard.lang].shards):
                        raise ShardError(f"no readable train shard for {shard.lang!r} in {self.data_dir}: re-run xlmr-prep")
                    self._readable_langs.add(shard.lang)
        return usable

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is not None and info.num_workers != self.num_workers:
            raise ValueError(f"TrainStream made for {self.num_workers} workers runs in {info.num_workers}")
        # torch asks worker 0 for the first batch, which is batch `consumed` of the generation:
        # so worker `id` plays the slot of the original run's worker (id + consumed) % num_workers.
        worker = ((0 if info is None else info.id) + self.consumed) % self.num_workers
        slot = self.rank * self.num_workers + worker
        rng = position.language_rng(self.cfg.seed, self.plan, self.rank, worker)
        # Resume: replay the language draws of the micro-batches this worker made (no I/O) and
        # turn the per-language counts into places in the language streams.
        made = position.micro_batches_made(self.consumed, worker, self.num_workers)
        start = self.plan["start"]
        counts = position.language_counts(rng, self.runs(start, worker, made, self.num_workers), self.micro_batch_size,
                                          len(self.mixed))
        streams = [self._language_stream(lang, slot, int(n)) for lang, n in zip(self.mixed, counts)]
        lang_index = [self.languages.index(lang) for lang in self.mixed]
        for k in itertools.count(made):  # this worker's k-th micro-batch of the generation
            [(cdf, _)] = self.runs(start, worker + k * self.num_workers, 1, self.num_workers)
            draws = position.draw_languages(rng, cdf, self.micro_batch_size)
            rows = [next(streams[i]) for i in draws]
            batch = _collate(rows, [lang_index[i] for i in draws], self.spec)
            batch["damaged_shards"], self.found_damaged = self.found_damaged, []
            yield batch

    def _intact(self, shard: Shard) -> bool:
        """data.on_damaged_shard=skip: the shard is checked whole before its first sample is
        read, so a damaged one is skipped entirely, the same way on every replay (then it is
        in `damaged`: empty for good). fail: read, and any damage raises ShardError."""
        if self.cfg.on_damaged_shard != "skip":
            return True
        try:
            verify_shard(shard, self.spec)
            return True
        except ShardError as exc:
            self.damaged.add(shard.name)
            self.found_damaged.append([shard.name, str(exc)])
            return False

    def _language_stream(self, lang: str, slot: int, consumed: int):
        """This slot's samples of one language, endless, after the first ``consumed``.
        Samples are shuffled within blocks of cfg.shuffle_block consecutive ones: prep writes
        a document's sequences next to each other, and a block-local shuffle keeps them apart
        in a batch at a bounded memory cost."""
        seed, block, sequence, shard_samples = self.cfg.seed, max(1, self.cfg.shuffle_block), self.sequences[lang], self.samples(lang)
        finished, offset = position.progress(position.slot_items(self.plan, lang, slot), shard_samples, consumed)
        damaged_in_row = 0
        for at, start in itertools.islice(position.slot_items(self.plan, lang, slot), finished, None):
            if not shard_samples(at):  # an unusable shard: skipped
                offset = 0
                continue
            shard, offset = sequence[at], start + offset
            if not self._intact(shard):
                damaged_in_row += 1
                if damaged_in_row > len(sequence.shards):
                    raise ShardError(f"every train shard of {lang!r} in {self.data_dir} is damaged: re-run xlmr-prep")
                offset = 0
                continue
            damaged_in_row = 0
            first_block = offset // block
            samples = read_shard(shard, range(first_block * block, shard.samples), self.spec,
                                 verify=self.cfg.on_damaged_shard != "skip")
            for block_no in range(first_block, -(-shard.samples // block)):
                rows = [next(samples) for _ in range(min(block, shard.samples - block_no * block))]
                order = block_order(len(rows), seed=seed, lang=lang, position=at, block=block_no) if block > 1 else range(len(rows))
                for i in order[offset % block if block_no == first_block else 0:]:
                    yield rows[i]
            offset = 0


def build_train_loader(data_dir: str | Path, manifest: dict, cfg: DataConfig, rank: int, world_size: int,
                       micro_batch_size: int, consumed_micro_batches: int = 0, plan: Optional[dict] = None,
                       micro_batches_per_step: int = 1, damaged: Collection[str] = ()) -> DataLoader:
    """The endless train loader of one rank, positioned after ``consumed_micro_batches``.

    Batch i of a generation comes from worker i % num_workers (torch hands batches out
    round-robin, in order), which makes the stream a function of (seed, alpha, the plan) and
    resumable from the count alone. ``micro_batches_per_step`` (gradient accumulation) places
    the phase changes of cfg.phases at step boundaries. ``plan`` (default: the first generation's) must have this
    run's layout: see `carry_over_plan`. No shard file is touched until the stream reaches it;
    ``loader.dataset.skipped_shards`` lists the shards found unusable so far by the process
    that reads (this one with num_workers=0; else each worker warns for its own)."""
    run_layout = position.layout(world_size, cfg.num_workers, micro_batch_size)
    plan = plan or position.first_plan(run_layout)
    if plan["layout"] != run_layout:
        raise ValueError(f"the data plan is for layout {plan['layout']}, this run has {run_layout}: carry it over first")
    dataset = TrainStream(data_dir, manifest, cfg, rank, plan, consumed_micro_batches, micro_batches_per_step, damaged)
    workers = cfg.num_workers
    return DataLoader(
        dataset, batch_size=None, num_workers=workers, pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        prefetch_factor=cfg.prefetch_factor if workers else None, persistent_workers=False,
    )


def carry_over_plan(data_dir: str | Path, manifest: dict, cfg: DataConfig, plan: Optional[dict],
                    consumed_micro_batches: int, world_size: int, micro_batch_size: int,
                    micro_batches_per_step: int = 1, damaged: Collection[str] = ()) -> dict:
    """The plan this run reads with: the first generation's for a new run (``plan`` None),
    ``plan`` itself if this run has its layout, else the next generation's plan: the unread
    rest of every language dealt over this run's slots (position.carry_over)."""
    run_layout = position.layout(world_size, cfg.num_workers, micro_batch_size)
    if plan is None:
        return position.first_plan(run_layout)
    if plan["layout"] == run_layout:
        return plan
    stream = TrainStream(data_dir, manifest, cfg, 0, plan, consumed_micro_batches, micro_batches_per_step, damaged)
    sizes = {lang: stream.samples(lang) for lang in stream.sequences}
    return position.carry_over(plan, consumed_micro_batches, run_layout, cfg.seed, stream.runs, stream.mixed, sizes)


class ValidSet(IterableDataset):
    """One language's validation samples for one rank: a contiguous slice of the (optionally
    capped) held-out samples in manifest order, so ranks read disjoint parts, all once.

    Batches also carry ``index`` [B]: each sequence's position in the language's validation
    set, which its mask is drawn from (pretrain.evaluation.mlm), so no result depends on the split."""

    def __init__(self, data_dir, manifest, cfg: DataConfig, lang: str, rank: int, world_size: int, batch_size: int,
                 index: Optional[dict] = None):
        self.spec, self.batch_size = TokenSpec.from_manifest(manifest), batch_size
        self.lang_index = languages(manifest).index(lang)
        index = shard_index(data_dir, manifest) if index is None else index  # build_valid_loaders: once for all
        # Checked now (a stat each): a language's validation set is a few shards.
        self.shards, self.skipped_shards = usable_shards(index.get((lang, "valid"), []))
        total = sum(shard.samples for shard in self.shards)
        if cfg.valid_max_sequences_per_lang is not None:
            total = min(total, cfg.valid_max_sequences_per_lang)
        self.start, self.stop = total * rank // world_size, total * (rank + 1) // world_size
        # Every rank runs this many forwards (ZeRO-3 gathers weights collectively): the batches
        # of the largest slice, ceil(total / world_size) samples.
        largest = -(-total // world_size)
        self.max_batches = -(-largest // batch_size)

    def __len__(self) -> int:
        """Batches on this rank; may be one short of ``max_batches``, the most of any rank."""
        return -(-(self.stop - self.start) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rows, offset, first = [], 0, self.start
        for shard in self.shards:
            wanted = range(max(self.start - offset, 0), min(self.stop - offset, shard.samples))
            for row in read_shard(shard, wanted, self.spec):
                rows.append(row)
                if len(rows) == self.batch_size:
                    yield self._batch(rows, first)
                    first += len(rows)
                    rows = []
            offset += shard.samples
        if rows:
            yield self._batch(rows, first)

    def _batch(self, rows: list[tuple[str, np.ndarray]], first: int) -> dict[str, Any]:
        batch = _collate(rows, [self.lang_index] * len(rows), self.spec)
        batch["index"] = torch.arange(first, first + len(rows))
        return batch


def build_valid_loaders(data_dir: str | Path, manifest: dict, cfg: DataConfig, rank: int, world_size: int,
                        batch_size: int) -> dict[str, DataLoader]:
    """One loader per language that has validation sequences, read in the main process (the
    sets are small and worker start-up per language would cost more than it saves)."""
    loaders, index = {}, shard_index(data_dir, manifest)
    for lang in languages(manifest):
        dataset = ValidSet(data_dir, manifest, cfg, lang, rank, world_size, batch_size, index)
        if dataset.max_batches:
            loaders[lang] = DataLoader(dataset, batch_size=None, num_workers=0,
                                       pin_memory=cfg.pin_memory and torch.cuda.is_available())
    return loaders
