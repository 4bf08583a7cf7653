"""Reading the samples of one shard: webdataset parses the tar and decodes ``tokens.npy``;
this module picks the wanted samples and checks each against the manifest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import webdataset as wds

from pretrain.data.manifest import Shard


class ShardError(RuntimeError):
    """A shard whose content is damaged: unreadable tar, bad sample, fewer samples than listed."""


@dataclass(frozen=True)
class TokenSpec:
    """What every sample must look like (from the manifest)."""

    seq_len: int
    dtype: np.dtype
    vocab_size: int
    bos: int
    pad: int

    @classmethod
    def from_manifest(cls, manifest: dict) -> TokenSpec:
        vocab = manifest["vocab"]
        ids = vocab["special_ids"]
        return cls(int(manifest["seq_len"]), np.dtype(manifest["dtype"]), int(vocab["size"]), ids["bos"], ids["pad"])


def verify_shard(shard: Shard, spec: TokenSpec) -> None:
    """Raise ShardError unless the shard's bytes are the ones xlmr-prep wrote: its sha256
    against the manifest's (bit rot keeps the size), or, for a manifest without one, every
    sample read and checked. One sequential read; the page cache serves the reading after it."""
    if shard.sha256 is None:
        for _ in read_shard(shard, range(shard.samples), spec, verify=False):
            pass
        return
    digest = hashlib.sha256()
    try:
        with open(shard.path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    except OSError as exc:
        raise ShardError(f"{shard.path}: unreadable before sample 0: {exc.strerror}") from None
    if digest.hexdigest() != shard.sha256:
        raise ShardError(f"{shard.path}: damaged before sample 0 (its sha256 {digest.hexdigest()[:12]}… is not the "
                         f"manifest's {shard.sha256[:12]}…)")


def read_shard(shard: Shard, wanted: range, spec: TokenSpec, verify: bool = True) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (key, tokens) for the samples of ``shard`` whose position is in ``wanted``
    (ascending), in order. Samples before and between are skipped without decoding; reading
    stops after the last wanted one. Raises ShardError, naming the shard, on any damage; with
    ``verify`` the whole file is checked (verify_shard) before the first sample is yielded.
    """
    if len(wanted) == 0:
        return
    if verify:
        verify_shard(shard, spec)
    last = wanted[-1]
    samples = wds.tarfile_samples([{"url": str(shard.path)}])
    index = -1
    try:
        for index, sample in enumerate(samples):
            if index in wanted:
                yield sample["__key__"], _tokens(sample, shard, spec)
            if index == last:
                return
    except ShardError:
        raise
    except Exception as exn:  # tarfile.ReadError, a decode error: report which shard, then stop
        raise ShardError(f"{shard.path}: unreadable after sample {index}: {exn!r}; re-run xlmr-prep for this data") from exn
    raise ShardError(f"{shard.path}: ends after {index + 1} samples, manifest says {shard.samples}; re-run xlmr-prep for this data")


def _tokens(sample: dict, shard: Shard, spec: TokenSpec) -> np.ndarray:
    key = sample["__key__"]
    if not key.startswith(f"{shard.lang}-") or "tokens.npy" not in sample:
        raise ShardError(f"{shard.path}: sample {key!r} is not a {shard.lang} tokens.npy sample")
    tokens = wds.autodecode.npy_loads(sample["tokens.npy"])
    if (
        tokens.ndim != 1
        or tokens.dtype != spec.dtype
        or not 2 <= len(tokens) <= spec.seq_len
        or tokens[0] != spec.bos
        or tokens.max() >= spec.vocab_size
    ):
        raise ShardError(
            f"{shard.path}: sample {key!r} is not <s> + up to seq_len-1 {spec.dtype} token ids "
            f"< {spec.vocab_size} (got {tokens.dtype} shape {tokens.shape})"
        )
    return tokens
