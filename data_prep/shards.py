"""Writing WebDataset tar shards atomically, with their size and checksum.

One sample = one sequence: `__key__` LANG-SPLIT-CHUNK-INDEX and one member `tokens.npy`, a 1-D
uint16 (vocabulary <= 65536) or uint32 array, which `webdataset` decodes natively. A shard is
written under a temporary name and renamed when complete; its sha256 is computed while it is
written, not by reading it again.

Writing a tar member per 512-token sequence through webdataset's TarWriter or
`tarfile.addfile` costs more than encoding the sequence (119 and 57 µs a member on the dev
machine). So members are written a packed block at a time: `tarfile` builds the USTAR header
once per block shape, and numpy stamps each member's index digits and checksum into copies of
it. The tars are byte for byte what `tarfile` writes (tests/data_prep/test_shards.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import tarfile
from pathlib import Path
from typing import Dict, List

import numpy as np

from .atomic import atomic_open

_BLOCK = tarfile.BLOCKSIZE
_CHKSUM = 148  # offset of the USTAR header's 8-byte checksum field
_INDEX_DIGITS = 8


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what passes through."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.bytes = 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        return self.f.write(data)


def _npy_header(length: int, dtype) -> np.ndarray:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.zeros(length, dtype=dtype), allow_pickle=False)
    return np.frombuffer(buf.getvalue()[: -length * np.dtype(dtype).itemsize], dtype=np.uint8)


def tar_members(prefix: str, first_index: int, block: np.ndarray) -> bytes:
    """USTAR members `{prefix}{index:08d}.tokens.npy` holding the rows of block [n, length]."""
    n, length = block.shape
    npy = _npy_header(length, block.dtype)
    size = len(npy) + block.nbytes // n
    name = f"{prefix}{0:0{_INDEX_DIGITS}d}.tokens.npy"
    if len(name) > 100:
        raise ValueError(f"tar member name longer than USTAR's 100 bytes: {name}")
    member = tarfile.TarInfo(name)
    member.size, member.mode = size, 0o444  # mtime 0: identical inputs give identical shards
    template = np.frombuffer(member.tobuf(format=tarfile.USTAR_FORMAT), dtype=np.uint8).copy()
    template[_CHKSUM:_CHKSUM + 8] = ord(" ")  # a checksum is summed with its field as spaces

    headers = np.tile(template, (n, 1))
    index = first_index + np.arange(n, dtype=np.int64)
    powers = 10 ** np.arange(_INDEX_DIGITS - 1, -1, -1, dtype=np.int64)
    start = len(prefix)
    headers[:, start:start + _INDEX_DIGITS] = ord("0") + index[:, None] // powers % 10
    checksum = headers.sum(axis=1, dtype=np.int64)
    headers[:, _CHKSUM:_CHKSUM + 6] = ord("0") + (checksum[:, None] >> (3 * np.arange(5, -1, -1))) % 8
    headers[:, _CHKSUM + 6] = 0

    body = np.zeros((n, -(-size // _BLOCK) * _BLOCK), dtype=np.uint8)  # data padded to 512-byte blocks
    body[:, : len(npy)] = npy
    body[:, len(npy): size] = block.view(np.uint8).reshape(n, -1)
    return np.concatenate([headers, body], axis=1).tobytes()


class ShardWriter:
    """Writes samples of one (language, split, chunk) into shards of about target_bytes."""

    def __init__(self, out_dir: Path, lang: str, split: str, chunk: int, target_bytes: int, dtype):
        self.out_dir, self.lang, self.split, self.chunk = out_dir, lang, split, chunk
        self.prefix = f"{lang}-{split}-{chunk:05d}-"
        self.target_bytes = max(1, target_bytes)
        self.dtype = dtype
        self.records: List[Dict] = []
        self._index = 0
        self._stack = None
        for stale in out_dir.glob(f"{split}-{chunk:05d}-*.tar*"):  # a killed earlier try, temp files too
            stale.unlink()

    def _open(self) -> None:
        self.path = self.out_dir / f"{self.split}-{self.chunk:05d}-{len(self.records):03d}.tar"
        self._stack = contextlib.ExitStack()
        self._file = _HashingWriter(self._stack.enter_context(atomic_open(self.path, "wb")))
        self._samples = self._tokens = 0

    def write_block(self, block: np.ndarray) -> None:
        """Write the rows of block [n, length] as samples, rolling over to new shards as they fill."""
        block = block.astype(self.dtype, copy=False)
        member_bytes = _BLOCK + -(-(128 + block.shape[1] * block.itemsize) // _BLOCK) * _BLOCK  # npy header <= 128
        done = 0
        while done < len(block):
            if self._stack is None:
                self._open()
            room = max(1, -(-(self.target_bytes - self._file.bytes) // member_bytes))
            part = block[done: done + room]
            self._file.write(tar_members(self.prefix, self._index, part))
            self._index += len(part)
            self._samples += len(part)
            self._tokens += part.size
            done += len(part)
            if self._file.bytes >= self.target_bytes:
                self._close()

    def _close(self) -> None:
        self._file.write(bytes(2 * _BLOCK))  # end of archive
        self._file.write(bytes(-self._file.bytes % tarfile.RECORDSIZE))  # as tarfile pads
        self._stack.close()  # fsync + rename into place
        self.records.append({
            "path": str(self.path), "lang": self.lang, "split": self.split, "samples": self._samples,
            "tokens": self._tokens, "bytes": self._file.bytes, "sha256": self._file.sha.hexdigest(),
        })
        self._stack = None

    def close(self) -> List[Dict]:
        if self._stack is not None:
            self._close()
        return self.records

    def abort(self) -> None:
        if self._stack is not None:
            self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)  # removes the temp file
            self._stack = None
