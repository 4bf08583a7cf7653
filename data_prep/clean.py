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
Then, with clean.lid.enabled, language identification (lid.py) judges each document (or line,
clean.lid.unit) and counts the lines it drops:
  low_confidence  no language scores clean.lid.threshold (CCNet: 0.5)
  wrong_language  another language does (clean.lid.action=drop, or route with no such
                  language in the corpus)
With clean.lid.action=route the text goes to the detected language instead: the part writes
it to filtered/TARGET/from-LANG-PART.txt, which dedup treats as one more part of TARGET, after
TARGET's own parts. Unlabelled input (inputs.UNLABELLED) is always routed.

Record files (JSONL/parquet) are first routed into per-language CC100-layout files, and a
compressed file bigger than clean.chunk_mb is decompressed once into uncompressed pieces (one
unit per file each). Every language's files are then cut into parts of about clean.chunk_mb
at document boundaries (ranges.py; a small compressed file is one part), and each part is a
unit: it writes
filtered/LANG/PART.txt (its filtered, normalized documents) and, for the dedup stage,
filtered/LANG/PART.hashes.npy (each kept line's dedup key and line number, sorted by key).
"""
from __future__ import annotations

import array
import contextlib
import functools
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
from .inputs import UNLABELLED, Source, iter_documents, iter_records, open_binary
from .lid import accepted_labels, decide, identifier
from .ranges import COMPRESSED, Range, plan_ranges, read_range_lines
from .state import Layout, file_identity, fingerprint
from .units import Unit, run_units

_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd\ufeff\ufffe\uffff]")
_DIGITS = re.compile(r"\d")
FILTERS = ("too_long", "invalid_utf8", "binary", "too_short", "low_confidence", "wrong_language", "duplicate",
           "empty_docs")
LID_BINS = 20  # confidence histogram bins over [0, 1] (report/lid_confidence.png)


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
    filtered: Path  # filtered/: the part writes filtered/LANG/PART.txt (and routed text elsewhere)
    cfg: CleanConfig
    corpus_langs: Tuple[str, ...]  # the languages LID may route text to


def filtered_paths(out_dir: Path, part: int) -> Tuple[Path, Path]:
    text = out_dir / f"{part:05d}.txt"
    return text, keys_path(text)


def routed_paths(filtered: Path, target: str, lang: str, part: int) -> Tuple[Path, Path]:
    """Where part PART of LANG puts the text LID files under TARGET."""
    text = filtered / target / f"from-{lang}-{part:05d}.txt"
    return text, keys_path(text)


class LanguageFilter:
    """clean.lid's decisions over one part, with their counts and confidence histograms."""

    def __init__(self, lang: str, cfg: CleanConfig, corpus_langs: Tuple[str, ...]):
        self.claimed = None if lang == UNLABELLED else lang
        self.cfg = cfg.lid
        self.active = cfg.lid.enabled or self.claimed is None
        self.judged = self.active and (self.claimed is None or bool(accepted_labels(self.claimed)))
        self.corpus_langs = None if self.claimed is None else corpus_langs
        self.stats = {"judged": self.judged, "docs": {}, "hist": {"kept": [0] * LID_BINS, "dropped": [0] * LID_BINS}}

    def split(self, lines: List[str]) -> List[Tuple[Optional[str], str, List[str]]]:
        """The document's lines as (language filed under, or None if dropped; outcome; lines)."""
        if not self.judged:
            return [(self.claimed, "unjudged", lines)]
        if self.cfg.unit == "document":
            return [(*self._judge(" ".join(lines)), lines)]
        groups: Dict[Tuple[Optional[str], str], List[str]] = {}
        for line in lines:
            lang, outcome = self._judge(line)
            groups.setdefault((lang, outcome if lang is None else ""), []).append(line)
        return [(lang, outcome, group) for (lang, outcome), group in groups.items()]

    def _judge(self, text: str) -> Tuple[Optional[str], str]:
        decision = functools.partial(decide, self.claimed, text, threshold=self.cfg.threshold, action=self.cfg.action,
                                     corpus_langs=self.corpus_langs)
        verdict = None
        if self.claimed is not None and len(accepted_labels(self.claimed)) == 1:
            # Most text is in its file's language: the top label alone decides "kept", and the
            # top-1 prediction costs 0.6x the top-5 one (measured on generated English text).
            verdict = decision(identifier().predict(text, k=1))
        if verdict is None or verdict.outcome != "kept":
            verdict = decision(identifier().predict(text))
        self.stats["docs"][verdict.outcome] = self.stats["docs"].get(verdict.outcome, 0) + 1
        kind = "dropped" if verdict.lang is None else "kept"
        self.stats["hist"][kind][min(LID_BINS - 1, int(verdict.confidence * LID_BINS))] += 1
        return verdict.lang, verdict.outcome


class FilteredWriter:
    """One filtered text file and its lines' dedup keys."""

    def __init__(self, stack: contextlib.ExitStack, paths: Tuple[Path, Path], dedup: bool):
        self.text_path, self.keys_path = paths
        self.out = stack.enter_context(atomic_open(self.text_path, "wb"))
        self.keys = array.array("Q") if dedup else None  # 8 bytes a kept line
        self.lines = self.docs = 0

    def write(self, lines: List[str]) -> None:
        if self.keys is not None:
            self.keys.extend(int.from_bytes(dedup_key(t), "big") for t in lines)
        self.out.write(("\n".join(lines) + "\n\n").encode("utf-8"))
        self.lines += len(lines)
        self.docs += 1

    def finish(self) -> List[Path]:
        if self.keys is None:
            return [self.text_path]
        write_sorted_keys(self.keys_path, np.frombuffer(self.keys, dtype=np.uint64))
        return [self.text_path, self.keys_path]


def clean_part(job: CleanPart) -> Tuple[Dict, List[Path]]:
    cleaner = LineCleaner(job.cfg)
    lid = LanguageFilter(job.lang, job.cfg, job.corpus_langs)
    stats = {"input_docs": 0, "input_lines": 0, "input_bytes": 0}
    with contextlib.ExitStack() as stack:  # the part's files are renamed into place together
        writers = {job.lang: FilteredWriter(stack, filtered_paths(job.filtered / job.lang, job.part), job.cfg.dedup)}
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
            for target, outcome, lines in lid.split(kept):
                if target is None:
                    cleaner.counts[outcome] += len(lines)
                    continue
                if target not in writers:
                    paths = routed_paths(job.filtered, target, job.lang, job.part)
                    writers[target] = FilteredWriter(stack, paths, job.cfg.dedup)
                writers[target].write(lines)
        outputs = [path for w in writers.values() for path in w.finish()]
    own = writers.pop(job.lang)
    routed = {target: {"lines": w.lines, "docs": w.docs, "filtered": str(w.text_path.relative_to(job.filtered))}
              for target, w in sorted(writers.items())}
    return {"lang": job.lang, "part": job.part, **stats, "lines": own.lines, "removed": cleaner.counts,
            "filtered": str(own.text_path.relative_to(job.filtered)), "lid": lid.stats, "routed": routed}, outputs


def keys_path(filtered_text: Path) -> Path:
    """The dedup keys beside a filtered text file (PART.txt -> PART.hashes.npy)."""
    return filtered_text.with_name(filtered_text.name.removesuffix(".txt") + ".hashes.npy")


def lid_summary(parts: List[Dict]) -> Dict:
    """A language's LID counts over its parts (routed-in parts carry none of their own)."""
    judged = [p["lid"] for p in parts if p.get("lid")]
    docs: Dict[str, int] = {}
    for stats in judged:
        for outcome, n in stats["docs"].items():
            docs[outcome] = docs.get(outcome, 0) + n
    hist = {kind: [sum(s["hist"][kind][i] for s in judged) for i in range(LID_BINS)] for kind in ("kept", "dropped")}
    return {"judged": any(s["judged"] for s in judged), "docs": docs, "confidence_hist": hist,
            "routed_out_lines": sum(r["lines"] for p in parts for r in p.get("routed", {}).values()),
            "routed_in_lines": sum(p["lines"] for p in parts if "routed_from" in p)}


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
    unlabelled: bool  # records without lang go to routed/_unlabelled (clean.lid.route_unlabelled)


def route_records(job: RouteJob) -> Tuple[Dict, List[Path]]:
    """Split a JSONL/parquet file into per-language CC100-layout files."""
    stats: Dict[str, int] = {}
    files: Dict[str, object] = {}
    with contextlib.ExitStack() as stack:  # every routed file is renamed into place, or none
        for lang, text in iter_records(job.source, stats, job.unlabelled):
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


@dataclass(frozen=True)
class SplitJob:
    source: Path  # a compressed CC100-layout file
    out_dir: Path  # routed/LANG; pieces land in routed/LANG/<source name>.PIECE.txt
    chunk_bytes: int
    max_line_bytes: int


def split_compressed(job: SplitJob) -> Tuple[Dict, List[Path]]:
    """Decompress a big compressed file once into uncompressed pieces of about chunk_bytes,
    each ending on a document boundary (after a blank line, as iter_documents sees it), so
    that its text is cleaned in parallel parts like an uncompressed file's. The bytes are
    copied unchanged: the pieces in order are the decompressed file."""
    pieces: List[Path] = []
    with open_binary(job.source) as stream:
        while True:
            path = job.out_dir / f"{job.source.name}.{len(pieces):05d}.txt"
            with atomic_open(path, "wb") as out:
                more = _copy_piece(stream, out, job.chunk_bytes, job.max_line_bytes)
            pieces.append(path)
            if not more:
                break
    return {"source": job.source.name, "pieces": [p.name for p in pieces]}, pieces


def _copy_piece(stream, out, chunk_bytes: int, max_line_bytes: int) -> bool:
    """Copy lines until chunk_bytes are written and a blank line ends; False at the end of the stream."""
    written, line_bytes, blank = 0, 0, True
    while piece := stream.readline(1 << 20):
        out.write(piece)
        written += len(piece)
        line_bytes += len(piece)
        blank = blank and not piece.strip()
        parallel.advance(len(piece))
        if piece.endswith(b"\n"):
            if blank and line_bytes <= max_line_bytes + 1 and written >= chunk_bytes:
                return True
            line_bytes, blank = 0, True
    return False


def run_clean(inventory, cfg: CleanConfig, layout: Layout, workers: int, progress: bool = True,
              allowed: bool = True, task: TaskConfig = TaskConfig()) -> Optional[Dict[str, Dict]]:
    """Route record files, then clean every language's parts (this array task's share).

    Returns {lang: {"fingerprint", "parts": [part results in corpus order]}} once every part
    of every language is done, or None while other array tasks' units are missing."""
    routes = [Unit(src.path.name, fingerprint({"source": file_identity(src.path), "unlabelled": cfg.lid.route_unlabelled}),
                   RouteJob(src, layout.routed, cfg.lid.route_unlabelled),
                   src.path.stat().st_size) for src in inventory.record_sources]
    routed = run_units(layout, "route", routes, route_records, workers=workers, task=task, progress=progress,
                       allowed=allowed, desc="route records")
    if routed is None:
        return None  # the parts of routed text are planned once all routing is done

    sources: Dict[str, List[Path]] = {lang: [s.path for s in srcs] for lang, srcs in inventory.text_sources.items()}
    for src in inventory.record_sources:
        for lang in routed[src.path.name]["langs"]:
            sources.setdefault(lang, []).append(routed_path(layout.routed, lang, src.path))

    corpus_langs = tuple(sorted(lang for lang in sources if lang != UNLABELLED))
    # A compressed file bigger than a part is decompressed once into pieces (one unit per file).
    chunk_bytes = max(1, int(cfg.chunk_mb * 1e6))
    splits = [Unit(f"{path.name}.split", fingerprint({"source": file_identity(path), "chunk_mb": cfg.chunk_mb,
                                                      "max_line_chars": cfg.max_line_chars}),
                   SplitJob(path, layout.routed / lang, chunk_bytes, 4 * cfg.max_line_chars), path.stat().st_size)
              for lang, paths in sources.items() for path in paths
              if path.suffix in COMPRESSED and path.stat().st_size > chunk_bytes]
    split = run_units(layout, "route", splits, split_compressed, workers=workers, task=task, progress=progress,
                      allowed=allowed, desc="split compressed")
    if split is None:
        return None
    pieces = {unit.job.source: [unit.job.out_dir / name for name in split[unit.name]["pieces"]] for unit in splits}

    units, part_fps = [], {}
    for lang in sorted(sources):
        part = 0
        # Where LID may route text, the output depends on which languages the corpus has.
        routes_to = corpus_langs if lang == UNLABELLED or (cfg.lid.enabled and cfg.lid.action == "route") else ()
        # The corpus order: files by path (a split file's pieces in its place), ranges by offset.
        for path in (piece for source in sorted(sources[lang]) for piece in pieces.get(source, [source])):
            identity = file_identity(path)
            for rng in plan_ranges(path, chunk_bytes, 4 * cfg.max_line_chars):
                fp = fingerprint({"input": identity, "range": rng, "clean": vars(cfg), "routes_to": routes_to})
                size = (rng[1] if rng[1] is not None else identity["size"]) - rng[0]
                units.append(Unit(f"{lang}/{part:05d}", fp, CleanPart(lang, part, path, rng, layout.filtered, cfg, corpus_langs), size))
                part_fps.setdefault(lang, []).append(fp)
                part += 1
    results = run_units(layout, "clean", units, clean_part, workers=workers, task=task, progress=progress,
                        allowed=allowed, desc="clean")
    if results is None:
        return None
    return language_parts(results, part_fps)


def language_parts(results: Dict[str, Dict], part_fps: Dict[str, List[str]]) -> Dict[str, Dict]:
    """Each language's parts in corpus order: its own, then the text LID routed to it from
    other languages' parts (by source language, then part); and a fingerprint of them all."""
    langs: Dict[str, Dict] = {lang: {"fps": list(fps), "parts": [results[f"{lang}/{i:05d}"] for i in range(len(fps))]}
                              for lang, fps in part_fps.items()}
    for source_lang, fps in sorted(part_fps.items()):
        for i, fp in enumerate(fps):
            for target, routed in results[f"{source_lang}/{i:05d}"]["routed"].items():
                entry = langs.setdefault(target, {"fps": [], "parts": []})
                entry["fps"].append(fp)
                entry["parts"].append({
                    "lang": target, "part": len(entry["parts"]), "input_docs": 0, "input_lines": 0, "input_bytes": 0,
                    "lines": routed["lines"], "removed": {name: 0 for name in FILTERS}, "filtered": routed["filtered"],
                    "routed_from": f"{source_lang}/{i:05d}",
                })
    return {lang: {"fingerprint": fingerprint(entry["fps"]), "parts": entry["parts"]} for lang, entry in sorted(langs.items())}
