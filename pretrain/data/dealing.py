"""Which shards of a language each loader slot reads, as pure arithmetic on the manifest:
no I/O, so a resumed run finds its place without reading anything.

A slot is one (rank, dataloader worker) pair; there are world_size * num_workers of them.
Per language, epoch e is the language's k train shards shuffled with RNG(seed, lang, e);
concatenating epochs 0, 1, 2, ... gives an endless sequence of shards (ShardSequence), and
position p of it goes to slot p % num_slots (after a change of layout the positions are dealt
the same way, the unfinished ones first: see position.py). So
- within an epoch every shard, hence every sample, is read by exactly one slot;
- every slot always has a next shard (streams are endless: no rank runs dry and hangs at the
  end of uneven shards, and a language with fewer shards than slots needs no special case);
- a slot reads whole shards only, so no byte is read twice per epoch. Dealing single samples
  to the slots instead would make every slot read every shard of a small language
  (num_slots times the I/O, e.g. 256x on 64 GPUs with 4 workers).
With fewer shards than slots, consecutive epochs of the language run side by side on
different slots, so the same sample can be in flight on two slots at once: unavoidable when
a language is upsampled past its size, which temperature sampling does to small languages.
"""

from __future__ import annotations

import zlib

import numpy as np

from pretrain.data.manifest import Shard

# Distinct first words keep the RNG streams of different purposes apart.
_SHARD_ORDER, _BLOCK_ORDER = 2, 3


def lang_id(lang: str) -> int:
    """A stable integer for a language, for seeding (not its index: languages may be added)."""
    return zlib.crc32(lang.encode())


def epoch_order(shards: list[Shard], *, seed: int, epoch: int) -> list[Shard]:
    """The language's shards in the order of ``epoch``."""
    if len(shards) == 1:  # a resume walks every epoch of a one-shard language: skip the RNG
        return shards
    rng = np.random.default_rng([seed, _SHARD_ORDER, lang_id(shards[0].lang), epoch])
    return [shards[i] for i in rng.permutation(len(shards))]


class ShardSequence:
    """A language's endless shard sequence: position p is shard p % k of epoch p // k."""

    def __init__(self, shards: list[Shard], *, seed: int):
        self.shards, self.seed = shards, seed
        self._epoch, self._order = -1, shards

    def __getitem__(self, position: int) -> Shard:
        epoch = position // len(self.shards)
        if epoch != self._epoch:  # readers walk positions mostly in order: keep the last epoch
            self._epoch, self._order = epoch, epoch_order(self.shards, seed=self.seed, epoch=epoch)
        return self._order[position % len(self.shards)]

    def samples(self, position: int) -> int:
        return self[position].samples


def block_order(size: int, *, seed: int, lang: str, position: int, block: int) -> np.ndarray:
    """The order in which a block of ``size`` consecutive samples of a shard is yielded
    (``position``: the shard's place in the language's sequence)."""
    rng = np.random.default_rng([seed, _BLOCK_ORDER, lang_id(lang), position, block])
    return rng.permutation(size)
