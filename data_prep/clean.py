"""Stage 1, clean: normalize, filter and deduplicate each language's text.

Per line, in this order (each drop counted per language):
  too_long      longer than clean.max_line_chars (checked on bytes first, so never read whole)
  invalid_utf8  not valid UTF-8
  binary        a NUL byte, or more than clean.max_control_fraction control/replacement chars
  too_short     shorter than clean.min_line_chars after normalization
  duplicate     same text as an earlier line of the language (after lowercasing and mapping
                digits to 0, hashed to 8 bytes as CCNet does; exact dedup, first one kept)
Normalization: Unicode NFC, control characters removed, every run of Unicode whitespace
collapsed to one space, ends stripped. A document left with no line is dropped (empty_docs).

Output: clean/LANG.txt in CC100 layout, plus a sparse index of document-start offsets that lets
the encode stage split a language into chunks processed in parallel.
"""
from __future__ import annotations

import contextlib
import hashlib
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

from . import parallel
from .atomic import atomic_open
from .config import CleanConfig
from .inputs import Source, iter_documents, iter_records, open_binary, read_bounded_lines
from .state import Layout, file_identity, fingerprint, load_marker, require_allowed

_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd\ufeff\ufffe\uffff]")
_DIGITS = re.compile(r"\d")
FILTERS = ("too_long", "invalid_utf8", "binary", "too_short", "duplicate", "empty_docs")


def normalize_line(text: str) -> str:
    text = unicodedata.normalize("NFC", _CONTROL.sub("", text))
    return " ".join(text.split())


def dedup_key(text: str) -> bytes:
    return hashlib.blake2b(_DIGITS.sub("0", text.lower()).encode("utf-8"), digest_size=8).digest()


class LineCleaner:
    """Applies the line filters of one language, keeping the counts and the dedup set."""

    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg
        self.max_bytes = 4 * cfg.max_line_chars  # UTF-8 needs at most 4 bytes a character
        self.seen: set = set()
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
        if self.cfg.dedup:
            key = dedup_key(text)
            if key in self.seen:
                self.counts["duplicate"] += 1
                return None
            self.seen.add(key)
        return text


@dataclass(frozen=True)
class CleanJob:
    lang: str
    sources: tuple  # paths of CC100-layout files (inputs and routed record files)
    out: Path
    cfg: CleanConfig


def clean_language(job: CleanJob) -> Dict:
    cleaner = LineCleaner(job.cfg)
    stats = {"input_docs": 0, "input_lines": 0, "input_bytes": 0, "docs": 0, "lines": 0, "chars": 0, "bytes": 0}
    index: List[List[int]] = [[0, 0]]  # [byte offset, document number] of chunkable points
    index_every = max(1, int(job.cfg.index_every_mb * 1e6))
    with atomic_open(job.out, "wb") as out:
        for path in job.sources:
            with open_binary(Path(path)) as stream:
                for doc in iter_documents(read_bounded_lines(stream, cleaner.max_bytes)):
                    stats["input_docs"] += 1
                    stats["input_lines"] += len(doc)
                    doc_bytes = sum(len(raw) + 1 for raw in doc if raw is not None)
                    stats["input_bytes"] += doc_bytes
                    parallel.advance(doc_bytes)
                    kept = [t for t in map(cleaner, doc) if t is not None]
                    if not kept:
                        cleaner.counts["empty_docs"] += 1
                        continue
                    if stats["bytes"] - index[-1][0] >= index_every:
                        index.append([stats["bytes"], stats["docs"]])
                    data = ("\n".join(kept) + "\n\n").encode("utf-8")
                    out.write(data)
                    stats["docs"] += 1
                    stats["lines"] += len(kept)
                    stats["chars"] += sum(map(len, kept))
                    stats["bytes"] += len(data)
    return {"lang": job.lang, **stats, "removed": cleaner.counts, "index": index}


@dataclass(frozen=True)
class RouteJob:
    source: Source
    out_dir: Path  # routed/; files land in routed/LANG/<source name>.txt


def route_records(job: RouteJob) -> Dict:
    """Split a JSONL/parquet file into per-language CC100-layout files."""
    stats: Dict[str, int] = {}
    files: Dict[str, object] = {}
    with contextlib.ExitStack() as stack:  # every routed file is renamed into place, or none
        for lang, text in iter_records(job.source, stats):
            if lang not in files:
                files[lang] = stack.enter_context(atomic_open(job.out_dir / lang / f"{job.source.path.name}.txt", "wb"))
            body = "\n".join(p.strip() for p in text.split("\n") if p.strip())
            if body:
                data = body.encode("utf-8", "surrogatepass") + b"\n\n"  # invalid text is counted by clean
                files[lang].write(data)
                parallel.advance(len(data))
    return {"source": job.source.path.name, "langs": sorted(files), **stats}


def run_clean(inventory, cfg, layout: Layout, workers: int, progress: bool, allowed: bool = True) -> Dict[str, Dict]:
    """Route record files, then clean every language; returns per-language stats."""
    route_jobs, route_fps = [], {}
    for src in inventory.record_sources:
        fp = fingerprint({"source": file_identity(src.path)})
        if not layout.is_done("route", src.path.name, fp):
            route_jobs.append(RouteJob(src, layout.routed))
        route_fps[src.path.name] = fp
    require_allowed("clean", len(route_jobs), allowed)
    for result in parallel.run_jobs(route_records, route_jobs, workers=workers, desc="route records", progress=progress):
        outs = [layout.routed / lang / f"{result['source']}.txt" for lang in result["langs"]]
        layout.write_marker("route", result["source"], route_fps[result["source"]], outs, stats=result)

    sources: Dict[str, List[Path]] = {lang: [s.path for s in srcs] for lang, srcs in inventory.text_sources.items()}
    for src in inventory.record_sources:
        marker = layout.marker("route", src.path.name)
        for lang in load_marker(marker)["stats"]["langs"]:
            sources.setdefault(lang, []).append(layout.routed / lang / f"{src.path.name}.txt")

    jobs, fps, stats = [], {}, {}
    for lang in sorted(sources):
        paths = tuple(sorted(sources[lang]))
        fps[lang] = fingerprint({"inputs": [file_identity(p) for p in paths], "clean": vars(cfg)})
        if layout.is_done("clean", lang, fps[lang]):
            stats[lang] = _load_stats(layout, lang)
        else:
            jobs.append(CleanJob(lang, paths, layout.clean / f"{lang}.txt", cfg))
    require_allowed("clean", len(jobs), allowed)
    jobs.sort(key=lambda j: -sum(Path(p).stat().st_size for p in j.sources))  # biggest first
    for result in parallel.run_jobs(clean_language, jobs, workers=workers, desc="clean", progress=progress):
        lang = result["lang"]
        layout.write_marker("clean", lang, fps[lang], [layout.clean / f"{lang}.txt"], stats=result)
        stats[lang] = result
    return dict(sorted(stats.items()))


def _load_stats(layout: Layout, lang: str) -> Dict:
    return load_marker(layout.marker("clean", lang))["stats"]
