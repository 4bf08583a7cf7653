"""Finding and reading the raw corpus.

Two layouts are accepted in `input_dir`:
- CC100: one file per language named `LANG.txt` (optionally `.xz`, `.gz`, `.zst`, `.bz2`),
  one paragraph per line, a blank line between documents. LANG is a code like `en`,
  `zh-Hans` or `hi_rom`.
- Records: `*.jsonl` (optionally compressed) or `*.parquet` files with `text` and `lang`
  fields, one document per record, paragraphs separated by newlines (CCNet/datatrove output).
  The clean stage routes them into per-language CC100-layout files first.
- Unlabelled text, only with clean.lid.route_unlabelled: records without a `lang` field and
  `*.txt` files (compressed too) not named LANG.txt are read as the pseudo-language
  UNLABELLED, whose every document clean files under the language lid.176 detects (lid.py).

Lines are read as bytes with a length bound, so a 50 MB line (or a binary file without
newlines) is counted and skipped without ever being held in memory whole.
"""
from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Dict, Iterator, List, Optional

import zstandard

from .errors import PrepError

LANG_RE = r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]+)*"
_TEXT_FILE = re.compile(rf"^(?P<lang>{LANG_RE})\.txt(?:\.(?P<comp>[^.]+))?$")
_RECORD_FILE = re.compile(r"^(?P<stem>.+)\.(?P<kind>jsonl|parquet)(?:\.(?P<comp>[^.]+))?$")
_LANG_CODE = re.compile(rf"^{LANG_RE}$")
_ANY_TEXT_FILE = re.compile(r"^.+\.txt(?:\.(?P<comp>[^.]+))?$")
UNLABELLED = "_unlabelled"  # not a language code (LANG_RE), so no LANG.txt can take its place

_OPENERS = {
    None: lambda p: open(p, "rb"),
    "xz": lambda p: lzma.open(p, "rb"),
    "gz": lambda p: gzip.open(p, "rb"),
    "bz2": lambda p: bz2.open(p, "rb"),
    # zstandard's reader has no readline(); a BufferedReader adds it.
    "zst": lambda p: io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(p, "rb"), closefd=True)),
}


@dataclass(frozen=True)
class Source:
    path: Path
    kind: str  # "text" (CC100 layout), "jsonl" or "parquet"; records carry their own language


@dataclass
class Inventory:
    text_sources: Dict[str, List[Source]]  # lang -> CC100-layout files
    record_sources: List[Source]  # JSONL/parquet files, routed by their `lang` field
    skipped: List[str]  # files that are not corpus files, reported


def is_lang_code(code: str) -> bool:
    return bool(_LANG_CODE.match(code))


def discover(input_dir: Path, unlabelled: bool = False) -> Inventory:
    """The corpus files of input_dir; with `unlabelled`, *.txt files not named LANG.txt are
    text of the pseudo-language UNLABELLED (routed by language identification)."""
    if not input_dir.exists():
        raise PrepError(f"input_dir {input_dir} does not exist")
    if not input_dir.is_dir():
        raise PrepError(f"input_dir {input_dir} is not a directory")
    text: Dict[str, List[Source]] = {}
    records: List[Source] = []
    skipped: List[str] = []
    for path in sorted(p for p in input_dir.iterdir() if not p.name.startswith(".")):
        if path.is_dir():
            skipped.append(f"{path.name} (a directory; only files directly in input_dir are read)")
            continue
        m = _TEXT_FILE.match(path.name) or _RECORD_FILE.match(path.name)
        if m is None and unlabelled and (plain := _ANY_TEXT_FILE.match(path.name)):
            comp = plain.group("comp")
            if comp not in _OPENERS:
                raise PrepError(f"{path}: unknown compression '.{comp}'; supported: .xz, .gz, .zst, .bz2")
            text.setdefault(UNLABELLED, []).append(Source(path, "text"))
            continue
        if m is None:
            skipped.append(f"{path.name} (not LANG.txt[.xz|.gz|.zst|.bz2], *.jsonl[...] or *.parquet)")
            continue
        comp = m.group("comp")
        kind = m.groupdict().get("kind") or "text"
        if comp not in _OPENERS or (kind == "parquet" and comp is not None):
            raise PrepError(
                f"{path}: unknown compression '.{comp}'; supported: .xz, .gz, .zst, .bz2 "
                "(parquet files carry their own compression)"
            )
        if kind == "text":
            lang = m.group("lang")
            text.setdefault(lang, []).append(Source(path, "text"))
        else:
            records.append(Source(path, kind))
    if not text and not records:
        found = f"; skipped: {', '.join(skipped)}" if skipped else ""
        raise PrepError(f"input_dir {input_dir} holds no corpus files (LANG.txt[.xz], *.jsonl, *.parquet){found}")
    return Inventory(text, records, skipped)


# What the decompressors raise on a file cut short or damaged (OSError: gzip's BadGzipFile).
_DAMAGED = (EOFError, lzma.LZMAError, zstandard.ZstdError, OSError, ValueError)


def open_binary(path: Path) -> BinaryIO:
    """Open a (possibly compressed) file; discover() has vetted the names of input files."""
    stream = _OPENERS.get(path.suffix.lstrip("."), _OPENERS[None])(path)
    stream.source_path = path  # for read_bounded_lines' message
    return stream


def _readline(stream: BinaryIO, limit: int) -> bytes:
    """One line; a truncated or damaged compressed file is a one-line PrepError naming it."""
    try:
        return stream.readline(limit)
    except _DAMAGED as exc:
        path = getattr(stream, "source_path", None) or getattr(stream, "name", "an input file")
        raise PrepError(f"{path} is cut short or damaged ({exc}): copy it again, or move it out of input_dir "
                        "(the other files' finished work is kept)") from None


def read_bounded_lines(stream: BinaryIO, max_bytes: int) -> Iterator[Optional[bytes]]:
    """Yield lines without their newline; None for a line longer than max_bytes (skipped unread)."""
    while True:
        line = _readline(stream, max_bytes + 1)
        if not line:
            return
        if len(line) > max_bytes and not line.endswith(b"\n"):
            while True:  # drain the rest of the overlong line in bounded pieces
                rest = _readline(stream, 1 << 20)
                if not rest or rest.endswith(b"\n"):
                    break
            yield None
            continue
        yield line.rstrip(b"\n").rstrip(b"\r")


def iter_documents(lines: Iterator[Optional[bytes]]) -> Iterator[List[Optional[bytes]]]:
    """Group CC100-layout lines into documents (blank lines separate them)."""
    doc: List[Optional[bytes]] = []
    for line in lines:
        if line is not None and not line.strip():
            if doc:
                yield doc
                doc = []
        else:
            doc.append(line)
    if doc:
        yield doc


def iter_records(source: Source, stats: Dict[str, int], unlabelled: bool = False) -> Iterator[tuple]:
    """Yield (lang, text) from a JSONL or parquet file, counting records that are unusable;
    with `unlabelled`, a record without a lang (absent, null or "") has lang UNLABELLED."""
    if source.kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(source.path)
        columns = [c for c in ("text", "lang") if c in pf.schema_arrow.names]
        missing = ({"text"} if unlabelled else {"text", "lang"}) - set(columns)
        if missing:
            raise PrepError(f"{source.path}: parquet file lacks column(s) {sorted(missing)}")
        for batch in pf.iter_batches(columns=columns, batch_size=4096):
            langs = batch.column("lang").to_pylist() if "lang" in columns else [None] * batch.num_rows
            for text, lang in zip(batch.column("text").to_pylist(), langs):
                yield from _checked_record(text, lang, stats, unlabelled)
        return
    with open_binary(source.path) as f:
        for raw in read_bounded_lines(f, 256 << 20):
            if raw is None:
                stats["too_long_records"] = stats.get("too_long_records", 0) + 1
                continue
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                stats["bad_json"] = stats.get("bad_json", 0) + 1
                continue
            if not isinstance(record, dict):
                stats["bad_json"] = stats.get("bad_json", 0) + 1
                continue
            yield from _checked_record(record.get("text"), record.get("lang"), stats, unlabelled)


def _checked_record(text, lang, stats: Dict[str, int], unlabelled: bool) -> Iterator[tuple]:
    if unlabelled and isinstance(text, str) and lang in (None, ""):
        stats["unlabelled"] = stats.get("unlabelled", 0) + 1
        lang = UNLABELLED
    elif not isinstance(text, str) or not isinstance(lang, str) or not is_lang_code(lang):
        stats["missing_text_or_lang"] = stats.get("missing_text_or_lang", 0) + 1
        return
    stats["records"] = stats.get("records", 0) + 1
    yield lang, text
