"""Cutting a CC100-layout file into byte ranges that start and end on document boundaries.

The clean stage processes each range as its own unit (in parallel, over processes and array
tasks). A range boundary is placed just after a blank line (the document separator), so the
documents read from the ranges one after the other are exactly the file's documents.

Compressed files cannot be seeked: a compressed file is a single range (None as its end), read
from the start. The clean stage first decompresses a compressed file bigger than a part into
uncompressed pieces (clean.split_compressed), so only small compressed files get here.
"""
from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Iterator, List, Optional, Tuple

from .inputs import open_binary, read_bounded_lines

COMPRESSED = (".xz", ".gz", ".zst", ".bz2")

Range = Tuple[int, Optional[int]]  # [start, end) in bytes; end None: to the end of the file


def plan_ranges(path: Path, chunk_bytes: int, max_line_bytes: int) -> List[Range]:
    """Ranges of about chunk_bytes each, cut at the first document boundary after every
    multiple of chunk_bytes (at least one range, even for an empty file)."""
    if path.suffix in COMPRESSED:
        return [(0, None)]
    size = path.stat().st_size
    cuts = [0]
    with open(path, "rb") as f:
        target = chunk_bytes
        while target < size:
            cut = next_document_start(f, max(target, cuts[-1]), max_line_bytes)
            if cut >= size:
                break
            if cut > cuts[-1]:
                cuts.append(cut)
            target = cut + chunk_bytes
    return [(a, b) for a, b in zip(cuts, cuts[1:] + [size])]


def next_document_start(f: BinaryIO, offset: int, max_line_bytes: int) -> int:
    """The first offset >= `offset` just after a blank line (as iter_documents sees lines:
    a line of at most max_line_bytes holding only whitespace)."""
    if offset > 0:
        f.seek(offset - 1)
        _skip_line(f)  # the rest of the line holding byte offset-1: we are at a line start
    else:
        f.seek(0)
    while True:
        line = f.readline(max_line_bytes + 1)
        if not line:
            return f.tell()
        if len(line) > max_line_bytes and not line.endswith(b"\n"):
            _skip_line(f)  # an overlong line is never a separator
            continue
        if not line.strip():
            return f.tell()


def _skip_line(f: BinaryIO) -> None:
    while True:
        piece = f.readline(1 << 20)
        if not piece or piece.endswith(b"\n"):
            return


def read_range_lines(path: Path, rng: Range, max_line_bytes: int) -> Iterator[Optional[bytes]]:
    """The lines of one range (read_bounded_lines' convention: None for an overlong line)."""
    start, end = rng
    with open_binary(path) as stream:
        if end is None:
            yield from read_bounded_lines(stream, max_line_bytes)
            return
        stream.seek(start)
        yield from read_bounded_lines(_Bounded(stream, end - start), max_line_bytes)


class _Bounded:
    """readline() over the next `left` bytes of a stream (a range ends on a line end)."""

    def __init__(self, stream: BinaryIO, left: int):
        self.stream, self.left = stream, left

    def readline(self, limit: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        limit = self.left if limit < 0 else min(limit, self.left)
        line = self.stream.readline(limit)
        self.left -= len(line)
        return line
