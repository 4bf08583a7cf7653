"""Stage 1b, dedup: exact line dedup of each language in bounded memory, then its clean text.

As CCNet and datatrove do at scale, a language's line keys (8-byte hashes, see
clean.dedup_key) are never held in one set. The clean parts wrote their keys sorted
(filtered/LANG/PART.hashes.npy); the key space is cut into buckets by key range, so many that
one bucket's records fit dedup.memory_mb, and each bucket is a unit resolved on its own:

  bucket  reads its key range from every part's key file (a binary search in each), orders
          the records by (key, part, line) and drops every record but the first of a key:
          the first occurrence in corpus order wins, so the kept lines are exactly those of a
          sequential dedup of the whole language. Writes dedup/LANG/BUCKET-of-N.npy, the
          dropped lines as sorted uint64 (part << 32 | line).
  apply   (one unit per clean part) filters a part's lines by the drop lists and writes the
          language's final text clean/LANG/PART.txt (CC100 layout) with a sparse index of
          document-start offsets for the encode stage; documents left empty count as
          empty_docs, dropped lines as duplicate.

Buckets of a language need all of its parts; the apply units need all buckets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from . import parallel
from .atomic import atomic_open
from .clean import keys_path, lid_summary
from .config import PrepConfig
from .state import Layout, fingerprint
from .units import Unit, run_units

# A bucket's peak memory per record: the key and position read in (16 B), the sort order
# (8 B) and the sorted copies made one at a time (16 B at most alongside).
BYTES_PER_RECORD = 40
KEY_SPACE = 1 << 64


def bucket_count(lines: int, memory_mb: float) -> int:
    """Buckets whose records each fit the memory budget (keys are uniform hashes)."""
    return max(1, math.ceil(lines * BYTES_PER_RECORD / (memory_mb * 1e6)))


@dataclass(frozen=True)
class BucketJob:
    lang: str
    bucket: int
    buckets: int
    key_files: Tuple[Path, ...]  # every part's, in part order
    out: Path


def resolve_bucket(job: BucketJob) -> Tuple[Dict, List[Path]]:
    lo, hi = job.bucket * KEY_SPACE // job.buckets, (job.bucket + 1) * KEY_SPACE // job.buckets
    slices = []
    for path in job.key_files:
        keys = np.load(path, mmap_mode="r")["key"]
        start = np.searchsorted(keys, np.uint64(lo))
        stop = len(keys) if hi == KEY_SPACE else np.searchsorted(keys, np.uint64(hi))
        slices.append((start, stop))
    n = sum(stop - start for start, stop in slices)
    keys, positions = np.empty(n, np.uint64), np.empty(n, np.uint64)
    at = 0
    for part, (path, (start, stop)) in enumerate(zip(job.key_files, slices)):
        records = np.load(path, mmap_mode="r")[start:stop]
        keys[at:at + len(records)] = records["key"]
        positions[at:at + len(records)] = (np.uint64(part) << np.uint64(32)) | records["line"].astype(np.uint64)
        at += len(records)
        parallel.advance(len(records) * 12)
    # Parts are read in order and each part's records are in line order within a key, so a
    # stable sort by key orders the records by (key, part, line): the first of a key is kept.
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    positions = positions[order]
    del order
    later = np.empty(n, dtype=bool)
    later[:1] = False
    np.equal(keys[1:], keys[:-1], out=later[1:])
    del keys
    drops = np.sort(positions[later])
    with atomic_open(job.out, "wb") as f:
        np.save(f, drops)
    return {"lang": job.lang, "bucket": job.bucket, "lines": int(n), "duplicates": int(len(drops))}, [job.out]


@dataclass(frozen=True)
class ApplyJob:
    lang: str
    part: int
    filtered: Path
    drop_files: Tuple[Path, ...]
    out: Path
    index_every: int


def dropped_lines(drop_files: Tuple[Path, ...], part: int) -> np.ndarray:
    """Line numbers of the part dropped as duplicates, sorted."""
    lo, hi = np.uint64(part) << np.uint64(32), np.uint64(part + 1) << np.uint64(32)
    pieces = []
    for path in drop_files:
        drops = np.load(path, mmap_mode="r")
        pieces.append(np.array(drops[np.searchsorted(drops, lo):np.searchsorted(drops, hi)]) & np.uint64(0xFFFFFFFF))
    return np.sort(np.concatenate(pieces)) if pieces else np.empty(0, np.uint64)


def apply_drops(job: ApplyJob) -> Tuple[Dict, List[Path]]:
    drops = dropped_lines(job.drop_files, job.part).tolist()
    stats = {"part": job.part, "docs": 0, "lines": 0, "chars": 0, "bytes": 0, "duplicate": len(drops), "empty_docs": 0}
    index: List[List[int]] = [[0, 0]]  # [byte offset, document number] of chunkable points
    line, next_drop = 0, 0
    kept: List[str] = []
    with open(job.filtered, "rb") as src, atomic_open(job.out, "wb") as out:
        for raw in src:
            parallel.advance(len(raw))
            if raw != b"\n":
                if next_drop < len(drops) and drops[next_drop] == line:
                    next_drop += 1
                else:
                    kept.append(raw[:-1].decode("utf-8"))
                line += 1
                continue
            if not kept:  # every line of the document was a duplicate
                stats["empty_docs"] += 1
                continue
            if stats["bytes"] - index[-1][0] >= job.index_every:
                index.append([stats["bytes"], stats["docs"]])
            data = ("\n".join(kept) + "\n\n").encode("utf-8")
            out.write(data)
            stats["docs"] += 1
            stats["lines"] += len(kept)
            stats["chars"] += sum(map(len, kept))
            stats["bytes"] += len(data)
            kept = []
    return {**stats, "index": index}, [job.out]


def run_dedup(layout: Layout, cleaned: Dict[str, Dict], cfg: PrepConfig, workers: int, progress: bool = True,
              allowed: bool = True) -> Optional[Dict[str, Dict]]:
    """Resolve every language's buckets, then write its clean parts (this task's share).

    Returns the per-language clean stats once all is done (None while other array tasks'
    buckets are missing): input and output counts, the filter counts, and the parts."""
    buckets, drop_files = [], {}
    for lang, clean in cleaned.items():
        drop_files[lang] = ()
        if not cfg.clean.dedup:
            continue
        n = bucket_count(sum(p["lines"] for p in clean["parts"]), cfg.dedup.memory_mb)
        key_files = tuple(keys_path(layout.filtered / p["filtered"]) for p in clean["parts"])
        drop_files[lang] = tuple(layout.dedup / lang / f"{b:05d}-of-{n:05d}.npy" for b in range(n))
        for b, out in enumerate(drop_files[lang]):
            size = sum(p["lines"] for p in clean["parts"]) * 12 // n
            buckets.append(Unit(f"{lang}/bucket-{b:05d}-of-{n:05d}", fingerprint({"clean": clean["fingerprint"]}),
                                BucketJob(lang, b, n, key_files, out), size))
    if run_units(layout, "dedup", buckets, resolve_bucket, workers=workers, task=cfg.task, progress=progress,
                 allowed=allowed, desc="dedup buckets") is None:
        return None

    parts = []
    for lang, clean in cleaned.items():
        fp = fingerprint({"clean": clean["fingerprint"], "dedup": cfg.clean.dedup, "index": cfg.clean.index_every_mb})
        for p in clean["parts"]:
            filtered = layout.filtered / p["filtered"]
            job = ApplyJob(lang, p["part"], filtered, drop_files[lang], part_path(layout, lang, p["part"]),
                           max(1, int(cfg.clean.index_every_mb * 1e6)))
            parts.append(Unit(f"{lang}/part-{p['part']:05d}", fp, job, filtered.stat().st_size))
    applied = run_units(layout, "dedup", parts, apply_drops, workers=workers, task=cfg.task, progress=progress,
                        allowed=allowed, desc="dedup apply")
    if applied is None:
        return None
    return {lang: language_stats(layout, lang, clean["parts"], [applied[f"{lang}/part-{p['part']:05d}"] for p in clean["parts"]])
            for lang, clean in sorted(cleaned.items())}


def part_path(layout: Layout, lang: str, part: int) -> Path:
    return layout.clean / lang / f"{part:05d}.txt"


def language_stats(layout: Layout, lang: str, cleaned: List[Dict], applied: List[Dict]) -> Dict:
    """A language's clean stats, as one sequential pass over its text would count them."""
    stats = {k: sum(p[k] for p in cleaned) for k in ("input_docs", "input_lines", "input_bytes")}
    stats |= {k: sum(p[k] for p in applied) for k in ("docs", "lines", "chars", "bytes")}
    removed = {k: sum(p["removed"][k] for p in cleaned) for k in cleaned[0]["removed"]}
    removed["duplicate"] += sum(p["duplicate"] for p in applied)
    removed["empty_docs"] += sum(p["empty_docs"] for p in applied)
    stats["lid"] = lid_summary(cleaned)
    parts = [{"path": str(part_path(layout, lang, p["part"]).relative_to(layout.root)),
              **{k: p[k] for k in ("bytes", "docs", "lines", "index")}} for p in applied]
    return {"lang": lang, **stats, "removed": removed, "parts": parts}
