"""Writing WebDataset tar shards atomically, with their size and checksum.

One sample = one sequence: `__key__` LANG-SPLIT-CHUNK-INDEX and one member `tokens.npy`, a 1-D
uint16 (vocabulary <= 65536) or uint32 array, which `webdataset` decodes natively. A shard is
written under a temporary name and renamed when complete; its sha256 is computed while it is
written, not by reading it again.

Shards hold shard.target_mb whatever the chunking. A shard is closed at the first member
boundary where it reaches the target, so it is the target plus less than one member (and the
end-of-archive padding `tarfile` writes). An encode chunk writes the shards it fills
(`{split}-CHUNK-PART.tar`) and stages the members of its last, unfilled one
(`staged/{split}-CHUNK.tar`, a tar too); validation samples are all staged. Once every chunk of
a language is done, `merge_staged` concatenates the staged members in chunk order into
`{split}-merged-PART.tar` shards of the target size: only the last shard of a language's split
is smaller. Members are copied as they are (a tar is its members in a row), so the merged
shards are still what `tarfile` writes.

Writing a tar member per 512-token sequence through webdataset's TarWriter or
`tarfile.addfile` costs more than encoding the sequence (119 and 57 µs a member on the dev
machine). So members are written a packed block at a time: `tarfile` builds the USTAR header
once per block shape, and numpy stamps each member's index digits and checksum into copies of
it. The tars are byte for byte what `tarfile` writes (tests/data_prep/test_shards.py).
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import BinaryIO, Dict, Iterator, List, Optional, Tuple

import numpy as np

from . import parallel
from .atomic import tmp_path_for
from .errors import PrepError

_BLOCK = tarfile.BLOCKSIZE
_CHKSUM = 148  # offset of the USTAR header's 8-byte checksum field
_INDEX_DIGITS = 8


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


class _Tar:
    """One shard being written: under a temporary name, hashed and counted as it goes.
    `commit(path)` ends the archive as `tarfile` does and renames it to `path`."""

    def __init__(self, tmp_name: Path, lang: str, split: str):
        tmp_name.parent.mkdir(parents=True, exist_ok=True)
        self.lang, self.split = lang, split
        self.tmp = tmp_path_for(tmp_name)  # a killed run leaves only *.tmp-PID files
        self.file = open(self.tmp, "wb")
        self.sha = hashlib.sha256()
        self.bytes = self.samples = self.tokens = 0

    def write(self, data) -> None:
        self.sha.update(data)
        self.bytes += len(data)
        self.file.write(data)

    def commit(self, path: Path) -> Dict:
        self.write(bytes(2 * _BLOCK))  # end of archive
        self.write(bytes(-self.bytes % tarfile.RECORDSIZE))  # as tarfile pads
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, path)
        return {"path": str(path), "lang": self.lang, "split": self.split, "samples": self.samples,
                "tokens": self.tokens, "bytes": self.bytes, "sha256": self.sha.hexdigest()}

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def staged_path(out_dir: Path, split: str, chunk: int) -> Path:
    return out_dir / "staged" / f"{split}-{chunk:05d}.tar"


class ShardWriter:
    """Writes the samples of one (language, split, encode chunk) into shards of target_bytes;
    `close()` stages the samples of the last, unfilled shard for `merge_staged`. With
    stage_all (validation) every sample is staged."""

    def __init__(self, out_dir: Path, lang: str, split: str, chunk: int, target_bytes: int, dtype,
                 stage_all: bool = False):
        self.out_dir, self.lang, self.split, self.chunk = out_dir, lang, split, chunk
        self.prefix = f"{lang}-{split}-{chunk:05d}-"
        self.target_bytes = max(1, target_bytes)
        self.stage_all = stage_all
        self.dtype = dtype
        self.records: List[Dict] = []
        self._index = 0
        self._tar: Optional[_Tar] = None
        self._tmp_name = out_dir / f"{split}-{chunk:05d}.tar"
        stale = [*out_dir.glob(f"{split}-{chunk:05d}[-.]*"), *staged_path(out_dir, split, chunk).parent.glob(
            f"{split}-{chunk:05d}.tar*")]
        for path in stale:  # a killed earlier try of this chunk, temp files too
            path.unlink()

    def write_block(self, block: np.ndarray) -> None:
        """Write the rows of block [n, length] as samples, rolling over to new shards as they fill."""
        block = block.astype(self.dtype, copy=False)
        member_bytes = _BLOCK + -(-(128 + block.shape[1] * block.itemsize) // _BLOCK) * _BLOCK  # npy header <= 128
        done = 0
        while done < len(block):
            if self._tar is None:
                self._tar = _Tar(self._tmp_name, self.lang, self.split)
            room = len(block) if self.stage_all else max(1, -(-(self.target_bytes - self._tar.bytes) // member_bytes))
            part = block[done: done + room]
            self._tar.write(tar_members(self.prefix, self._index, part))
            self._index += len(part)
            self._tar.samples += len(part)
            self._tar.tokens += part.size
            done += len(part)
            if not self.stage_all and self._tar.bytes >= self.target_bytes:
                path = self.out_dir / f"{self.split}-{self.chunk:05d}-{len(self.records):03d}.tar"
                self.records.append(self._tar.commit(path))
                self._tar = None

    def close(self) -> Tuple[List[Dict], Optional[Dict]]:
        """(the full shards, the staged remainder or None)."""
        staged = None
        if self._tar is not None:
            path = staged_path(self.out_dir, self.split, self.chunk)
            path.parent.mkdir(exist_ok=True)
            staged, self._tar = self._tar.commit(path), None
        return self.records, staged

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.abort()
            self._tar = None


def _member_ends(f: BinaryIO, itemsize: int) -> Iterator[Tuple[int, int]]:
    """(end offset, tokens) of each member of one of our tars, reading headers only."""
    at = 0
    while True:
        f.seek(at)
        header = f.read(_BLOCK)
        if len(header) < _BLOCK or not any(header):
            return
        size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
        npy = f.read(10)  # magic, version, header length (format 1.0: 2 bytes little endian)
        tokens = (size - 10 - int.from_bytes(npy[8:10], "little")) // itemsize
        at += _BLOCK + -(-size // _BLOCK) * _BLOCK
        yield at, tokens


def _copy(src: BinaryIO, start: int, end: int, dst: _Tar, block: int = 1 << 20) -> None:
    src.seek(start)
    for at in range(start, end, block):
        dst.write(src.read(min(block, end - at)))
    parallel.advance(end - start)


def merge_staged(root: Path, staged: List[Dict], out_dir: Path, lang: str, split: str, target_bytes: int,
                 itemsize: int) -> List[Dict]:
    """The staged members of a language's split, in the given (chunk) order, as shards
    {split}-merged-PART.tar of target_bytes; only the last is smaller."""
    for stale in out_dir.glob(f"{split}-merged[-.]*"):  # a killed earlier try, temp files too
        stale.unlink()
    records: List[Dict] = []
    tar: Optional[_Tar] = None
    try:
        for rec in staged:
            with open(root / rec["path"], "rb") as src:
                start = end = members = 0
                for end, tokens in _member_ends(src, itemsize):
                    members += 1
                    tar = tar or _Tar(out_dir / f"{split}-merged.tar", lang, split)
                    tar.samples += 1
                    tar.tokens += tokens
                    if tar.bytes + end - start >= target_bytes:
                        _copy(src, start, end, tar)
                        start = end
                        records.append(tar.commit(out_dir / f"{split}-merged-{len(records):03d}.tar"))
                        tar = None
                if tar is not None and end > start:
                    _copy(src, start, end, tar)
            if members != rec["samples"]:
                raise PrepError(f"{root / rec['path']} holds {members} samples, its chunk wrote {rec['samples']}: "
                                "it was damaged; pass force=encode to rebuild the shards")
        if tar is not None:
            records.append(tar.commit(out_dir / f"{split}-merged-{len(records):03d}.tar"))
    except BaseException:
        if tar is not None:
            tar.abort()
        raise
    return records
