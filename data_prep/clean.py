"""Stage 1, clean: normalize and filter each language's text, in parts that run in parallel.

Per line, in this order (each drop counted per language):
  too_long      longer than clean.max_line_chars (checked on bytes first, so never read whole)
  invalid_utf8  not valid UTF-8
  binary        a NUL byte, or more than clean.max_control_fraction control/replacement chars
  too_short     shorter than clean.min_line_chars after normalization
  duplicate     same text as an earlier line of the language (after lowercasing and mapping
                digits to 0, hashed to 8 bytes as CCNet does; exact dedup, first one kept):
                counted by the dedup stage (dedup.py), which resolves it over the whole language
Normalization: Unicode NFC, control characters removed, every run of Unicode whitespace
collapsed to one space, ends stripped. A document left with no line is dropped (empty_docs).

Record files (JSONL/parquet) are first routed into per-language CC100-layout files, one unit
per file. Every language's files are then cut into parts of about clean.chunk_mb at document
boundaries (ranges.py; a compressed file is one part), and each part is a unit: it writes
filtered/LANG/PART.txt (its filtered, normalized documents) and, for the dedup stage,
filtered/LANG/PART.hashes.npy (each kept line's dedup key and line number, sorted by key).
"""
from __future__ import annotations

import array
import contextlib
import hashlib
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from . import parallel
from .atomic import atomic_open
from .config import CleanConfig, TaskConfig
from .inputs import Source, iter_documents, iter_records
from .ranges import Range, plan_ranges, read_range_lines
from .state import Layout, file_identity, fingerprint
from .units import Unit, run_units

_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd\ufeff\ufffe\uffff]")
_DIGITS = re.compile(r"\d")
FILTERS = ("too_long", "invalid_utf8", "binary", "too_short", "duplicate", "empty_docs")


def normalize_line(text: str) -> str:
    text = unicodedata.normalize("NFC", _CONTROL.sub("", text))
    return " ".join(text.split())


def dedup_key(text: str) -> bytes:
    return hashlib.blake2b(_DIGITS.sub("0", text.lower()).encode("utf-8"), digest_size=8).digest()


class LineCleaner:
    """Applies the line filters (all but the duplicate one, see dedup.py), keeping the counts."""

    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg
        self.max_bytes = 4 * cfg.max_line_chars  # UTF-8 needs at most 4 bytes a character
        self.counts: Dict[str, int] = {name: 0 for name in FILTERS}

    def __call__(self, raw) -> str | None:
        if raw is None or len(raw) > self.max_bytes:
            self.counts["too_long"] += 1
            return None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.counts["invalid_utf8"] += 1
            return None
        n_control = len(_CONTROL.findall(text))
        if "\x00" in text or n_control > self.cfg.max_control_fraction * len(text):
            self.counts["binary"] += 1
            return None
        text = normalize_line(text)
        if len(text) < self.cfg.min_line_chars:
            self.counts["too_short"] += 1
            return None
        if len(text) > self.cfg.max_line_chars:
            self.counts["too_long"] += 1
            return None
        return text


@dataclass(frozen=True)
class CleanPart:
    lang: str
    part: int  # its number in the language's corpus order
    source: Path  # a CC100-layout file (an input, or a routed record file)
    range: Range  # byte range of the source, on document boundaries
    out_dir: Path  # filtered/LANG
    cfg: CleanConfig


def filtered_paths(out_dir: Path, part: int) -> Tuple[Path, Path]:
    return out_dir / f"{part:05d}.txt", out_dir / f"{part:05d}.hashes.npy"


def clean_part(job: CleanPart) -> Tuple[Dict, List[Path]]:
    cleaner = LineCleaner(job.cfg)
    stats = {"input_docs": 0, "input_lines": 0, "input_bytes": 0, "lines": 0}
    keys = array.array("Q")  # each kept line's dedup key, 8 bytes a line of this part
    text_path, hash_path = filtered_paths(job.out_dir, job.part)
    with atomic_open(text_path, "wb") as out:
        for doc in iter_documents(read_range_lines(job.source, job.range, cleaner.max_bytes)):
            stats["input_docs"] += 1
            stats["input_lines"] += len(doc)
            doc_bytes = sum(len(raw) + 1 for raw in doc if raw is not None)
            stats["input_bytes"] += doc_bytes
            parallel.advance(doc_bytes)
            kept = [t for t in map(cleaner, doc) if t is not None]
            if not kept:
                cleaner.counts["empty_docs"] += 1
                continue
            if job.cfg.dedup:
                keys.extend(int.from_bytes(dedup_key(t), "big") for t in kept)
            out.write(("\n".join(kept) + "\n\n").encode("utf-8"))
            stats["lines"] += len(kept)
    outputs = [text_path]
    if job.cfg.dedup:
        write_sorted_keys(hash_path, np.frombuffer(keys, dtype=np.uint64))
        outputs.append(hash_path)
    return {"lang": job.lang, "part": job.part, **stats, "removed": cleaner.counts}, outputs


KEY_RECORD = np.dtype([("key", "<u8"), ("line", "<u4")])


def write_sorted_keys(path: Path, keys: np.ndarray) -> None:
    """(key, line number) records sorted by key, equal keys in line order: the dedup stage
    reads any key range of them with a binary search."""
    order = np.argsort(keys, kind="stable")
    records = np.empty(len(keys), dtype=KEY_RECORD)
    records["key"] = keys[order]
    records["line"] = order
    with atomic_open(path, "wb") as f:
        np.save(f, records)


@dataclass(frozen=True)
class RouteJob:
    source: Source
    out_dir: Path  # routed/; files land in routed/LANG/<source name>.txt


def route_records(job: RouteJob) -> Tuple[Dict, List[Path]]:
    """Split a JSONL/parquet file into per-language CC100-layout files."""
    stats: Dict[str, int] = {}
    files: Dict[str, object] = {}
    with contextlib.ExitStack() as stack:  # every routed file is renamed into place, or none
        for lang, text in iter_records(job.source, stats):
            if lang not in files:
                files[lang] = stack.enter_context(atomic_open(routed_path(job.out_dir, lang, job.source.path), "wb"))
            body = "\n".join(p.strip() for p in text.split("\n") if p.strip())
            if body:
                data = body.encode("utf-8", "surrogatepass") + b"\n\n"  # invalid text is counted by clean
                files[lang].write(data)
                parallel.advance(len(data))
    result = {"source": job.source.path.name, "langs": sorted(files), **stats}
    return result, [routed_path(job.out_dir, lang, job.source.path) for lang in files]


def routed_path(routed: Path, lang: str, source: Path) -> Path:
    return routed / lang / f"{source.name}.txt"


def run_clean(inventory, cfg: CleanConfig, layout: Layout, workers: int, progress: bool = True,
              allowed: bool = True, task: TaskConfig = TaskConfig()) -> Optional[Dict[str, Dict]]:
    """Route record files, then clean every language's parts (this array task's share).

    Returns {lang: {"fingerprint", "parts": [part results in corpus order]}} once every part
    of every language is done, or None while other array tasks' units are missing."""
    routes = [Unit(src.path.name, fingerprint({"source": file_identity(src.path)}), RouteJob(src, layout.routed),
                   src.path.stat().st_size) for src in inventory.record_sources]
    routed = run_units(layout, "route", routes, route_records, workers=workers, task=task, progress=progress,
                       allowed=allowed, desc="route records")
    if routed is None:
        return None  # the parts of routed text are planned once all routing is done

    sources: Dict[str, List[Path]] = {lang: [s.path for s in srcs] for lang, srcs in inventory.text_sources.items()}
    for src in inventory.record_sources:
        for lang in routed[src.path.name]["langs"]:
            sources.setdefault(lang, []).append(routed_path(layout.routed, lang, src.path))

    units, part_fps = [], {}
    chunk_bytes = max(1, int(cfg.chunk_mb * 1e6))
    for lang in sorted(sources):
        part = 0
        for path in sorted(sources[lang]):  # the corpus order: files by path, ranges by offset
            identity = file_identity(path)
            for rng in plan_ranges(path, chunk_bytes, 4 * cfg.max_line_chars):
                fp = fingerprint({"input": identity, "range": rng, "clean": vars(cfg)})
                size = (rng[1] if rng[1] is not None else identity["size"]) - rng[0]
                units.append(Unit(f"{lang}/{part:05d}", fp, CleanPart(lang, part, path, rng, layout.filtered / lang, cfg), size))
                part_fps.setdefault(lang, []).append(fp)
                part += 1
    results = run_units(layout, "clean", units, clean_part, workers=workers, task=task, progress=progress,
                        allowed=allowed, desc="clean")
    if results is None:
        return None
    return {lang: {"fingerprint": fingerprint(fps), "parts": [results[f"{lang}/{i:05d}"] for i in range(len(fps))]}
            for lang, fps in part_fps.items()}
