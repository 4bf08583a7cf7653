"""The train and validation loaders: per-slot endless language-mixed streams with exact
resume, and one deterministic loader per language over its held-out shards.

The README ("Data loading") documents the design and its guarantees.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.data.dealing import block_order, locate, slot_shards
from pretrain.data.manifest import Shard, languages, mixing_probs, shards, usable_shards
from pretrain.data.shards import ShardError, TokenSpec, read_shard

_LANGUAGE_DRAWS = 1  # first word of the mixing RNG's seed (see dealing._SHARD_ORDER)


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
    num_workers-th micro-batch from its own slot. The only state is ``consumed_micro_batches``."""

    def __init__(self, data_dir, manifest, cfg: DataConfig, rank: int, world_size: int,
                 micro_batch_size: int, consumed_micro_batches: int = 0):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.micro_batch_size, self.consumed_micro_batches = micro_batch_size, consumed_micro_batches
        self.num_workers = max(1, cfg.num_workers)
        self.spec = TokenSpec.from_manifest(manifest)
        self.languages = languages(manifest)
        q = mixing_probs(manifest, cfg.alpha)
        self.mixed = [lang for lang in self.languages if q.get(lang, 0) > 0]
        probs = np.array([q[lang] for lang in self.mixed], dtype=np.float64)
        self.cdf = np.cumsum(probs / probs.sum())
        self.shards: dict[str, list[Shard]] = {}
        self.skipped_shards: list[Shard] = []
        for lang in self.mixed:
            usable, skipped = usable_shards(shards(data_dir, manifest, lang, "train"))
            self.skipped_shards += skipped
            if not usable:
                raise ShardError(f"no readable train shard for {lang!r} in {data_dir}: re-run xlmr-prep")
            self.shards[lang] = usable

    def _draw(self, rng: np.random.Generator, batches: int = 1) -> np.ndarray:
        """Languages (positions in self.mixed) of the next micro-batches' samples, i.i.d. from q.
        One call for n batches draws the same as n calls: Generator.random takes one 64-bit
        output per double, in order, so a resume replays 10^6 micro-batches in seconds."""
        u = rng.random(batches * self.micro_batch_size)
        return np.minimum(np.searchsorted(self.cdf, u, side="right"), len(self.mixed) - 1)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is not None and info.num_workers != self.num_workers:
            raise ValueError(f"TrainStream made for {self.num_workers} workers runs in {info.num_workers}")
        # torch asks worker 0 for the first batch, which is global batch `consumed`: so worker
        # `id` plays the slot of the original run's worker (id + consumed) % num_workers.
        worker = ((0 if info is None else info.id) + self.consumed_micro_batches) % self.num_workers
        slot, num_slots = self.rank * self.num_workers + worker, self.world_size * self.num_workers
        rng = np.random.default_rng([self.cfg.seed, _LANGUAGE_DRAWS, self.rank, worker])
        # Resume: this worker made micro-batches worker, worker + W, ... below consumed. Replay
        # their language draws (no I/O) and turn the per-language counts into stream positions.
        made = max(0, -(-(self.consumed_micro_batches - worker) // self.num_workers))
        counts = np.zeros(len(self.mixed), dtype=np.int64)
        for start in range(0, made, 1 << 16):
            counts += np.bincount(self._draw(rng, min(made - start, 1 << 16)), minlength=len(self.mixed))
        streams = [
            self._language_stream(lang, slot, num_slots, *locate(
                self.shards[lang], int(n), seed=self.cfg.seed, slot=slot, num_slots=num_slots))
            for lang, n in zip(self.mixed, counts)
        ]
        lang_index = [self.languages.index(lang) for lang in self.mixed]
        while True:
            draws = self._draw(rng)
            rows = [next(streams[i]) for i in draws]
            yield _collate(rows, [lang_index[i] for i in draws], self.spec)

    def _language_stream(self, lang: str, slot: int, num_slots: int, finished: int, offset: int):
        """This slot's samples of one language, endless, from ``offset`` samples into its
        shard number ``finished`` on. Samples are shuffled within blocks of cfg.shuffle_block
        consecutive ones: prep writes a document's sequences next to each other, and a
        block-local shuffle keeps them apart in a batch at a bounded memory cost."""
        seed, block = self.cfg.seed, max(1, self.cfg.shuffle_block)
        for position, shard in slot_shards(self.shards[lang], seed=seed, slot=slot, num_slots=num_slots, skip=finished):
            first_block = offset // block
            samples = read_shard(shard, range(first_block * block, shard.samples), self.spec)
            for block_no in range(first_block, -(-shard.samples // block)):
                rows = [next(samples) for _ in range(min(block, shard.samples - block_no * block))]
                order = block_order(len(rows), seed=seed, lang=lang, position=position, block=block_no) if block > 1 else range(len(rows))
                for i in order[offset % block if block_no == first_block else 0:]:
                    yield rows[i]
            offset = 0


def build_train_loader(data_dir: str | Path, manifest: dict, cfg: DataConfig, rank: int, world_size: int,
                       micro_batch_size: int, consumed_micro_batches: int = 0) -> DataLoader:
    """The endless train loader of one rank, positioned after ``consumed_micro_batches``.

    Batch i comes from worker i % num_workers (torch hands batches out round-robin, in order),
    which is what makes the stream a function of (seed, alpha, world_size, num_workers,
    micro_batch_size) and resumable from the count alone. ``loader.dataset.skipped_shards``
    lists shards skipped as unreadable (log its length)."""
    dataset = TrainStream(data_dir, manifest, cfg, rank, world_size, micro_batch_size, consumed_micro_batches)
    workers = cfg.num_workers
    return DataLoader(
        dataset, batch_size=None, num_workers=workers, pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        prefetch_factor=cfg.prefetch_factor if workers else None, persistent_workers=False,
    )


class ValidSet(IterableDataset):
    """One language's validation samples for one rank: a contiguous slice of the (optionally
    capped) held-out samples in manifest order, so ranks read disjoint parts, all once."""

    def __init__(self, data_dir, manifest, cfg: DataConfig, lang: str, rank: int, world_size: int, batch_size: int):
        self.spec, self.batch_size = TokenSpec.from_manifest(manifest), batch_size
        self.lang_index = languages(manifest).index(lang)
        self.shards, self.skipped_shards = usable_shards(shards(data_dir, manifest, lang, "valid"))
        total = sum(shard.samples for shard in self.shards)
        if cfg.valid_max_sequences_per_lang is not None:
            total = min(total, cfg.valid_max_sequences_per_lang)
        self.start, self.stop = total * rank // world_size, total * (rank + 1) // world_size

    def __len__(self) -> int:
        """Batches on this rank; may differ by one between ranks (reduce totals after the loop)."""
        return -(-(self.stop - self.start) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rows, offset = [], 0
        for shard in self.shards:
            wanted = range(max(self.start - offset, 0), min(self.stop - offset, shard.samples))
            for row in read_shard(shard, wanted, self.spec):
                rows.append(row)
                if len(rows) == self.batch_size:
                    yield _collate(rows, [self.lang_index] * len(rows), self.spec)
                    rows = []
            offset += shard.samples
        if rows:
            yield _collate(rows, [self.lang_index] * len(rows), self.spec)


def build_valid_loaders(data_dir: str | Path, manifest: dict, cfg: DataConfig, rank: int, world_size: int,
                        batch_size: int) -> dict[str, DataLoader]:
    """One loader per language that has validation shards, read in the main process (the sets
    are small and worker start-up per language would cost more than it saves)."""
    loaders = {}
    for lang in languages(manifest):
        dataset = ValidSet(data_dir, manifest, cfg, lang, rank, world_size, batch_size)
        if dataset.shards:
            loaders[lang] = DataLoader(dataset, batch_size=None, num_workers=0,
                                       pin_memory=cfg.pin_memory and torch.cuda.is_available())
    return loaders
