"""Stage 3+4, encode, pack and shard: every language through the shared vocabulary.

A language's clean parts are cut into chunks of about pack.chunk_mb at document boundaries
(each part's index, written by the dedup stage), and chunks are encoded in parallel
processes. Each chunk streams its documents through SentencePiece in batches, splits them
into train and held-out validation documents, packs each split (`packing.py`) and writes the
shards of shard.target_mb it fills, shards/LANG/train-CHUNK-PART.tar, and stages the rest
(shards/LANG/staged/{train,valid}-CHUNK.tar: the unfilled last shard's samples, and every
validation sample). When all chunks of a language are done, its merge unit concatenates the
staged samples in chunk order into shards/LANG/{train,valid}-merged-PART.tar (`shards.py`),
so every shard but the last of a language's split holds the target size, whatever the
chunking, and the validation split is a few shards. Each unit's marker, written after its
outputs, makes it complete; a rerun redoes only units without one. Array tasks
(task.count > 1) encode chunks only; the merges run in the next run with task.count = 1 (the
merge job, stages=[manifest,report]), once every chunk of the language is done.

Validation documents are drawn per language: k = clamp(round(split.valid_fraction * docs),
split.valid_min_docs, split.valid_max_docs) documents (at most docs - 1), uniformly, with a
generator seeded by (seed, language).
"""
from __future__ import annotations

import functools
import logging
import shutil
import zlib
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import numpy as np

from . import parallel
from .config import PrepConfig
from .dictionary import EOS, UNK, Dictionary
from .errors import PrepError
from .packing import SequencePacker
from .shards import ShardWriter, merge_staged
from .state import Layout, fingerprint, load_marker, require_allowed

log = logging.getLogger(__name__)
SPLITS = ("train", "valid")
BATCH_BYTES = 1 << 20  # text per SentencePiece call: large enough to amortize the call


@dataclass(frozen=True)
class EncodeJob:
    lang: str
    chunk: int
    start: int  # byte range [start, end) of a clean part (clean/LANG/PART.txt), on document boundaries
    end: int
    first_doc: int
    valid_docs: Tuple[int, ...]  # document numbers (language-wide) held out for validation
    clean_path: Path
    out_dir: Path
    spm_path: Path
    seq_len: int
    shard_bytes: int


@dataclass(frozen=True)
class MergeJob:
    lang: str
    root: Path
    out_dir: Path
    staged: Tuple[Tuple[Dict, ...], ...]  # per split: the chunks' staged records, in chunk order
    shard_bytes: int
    itemsize: int


def choose_valid_docs(lang: str, n_docs: int, cfg: PrepConfig) -> np.ndarray:
    s = cfg.split
    k = min(max(int(round(s.valid_fraction * n_docs)), s.valid_min_docs), s.valid_max_docs, max(n_docs - 1, 0))
    rng = np.random.default_rng([cfg.seed, zlib.crc32(lang.encode())])
    return np.sort(rng.choice(n_docs, size=k, replace=False))


def plan_chunks(index: List[List[int]], total_bytes: int, chunk_bytes: int) -> List[Tuple[int, int, int]]:
    """Group the clean index's document-boundary points into (start, end, first_doc) chunks."""
    chunks = []
    for offset, doc in index:
        if not chunks or offset - chunks[-1][0] >= chunk_bytes:
            chunks.append([offset, None, doc])
    for i, c in enumerate(chunks):
        c[1] = chunks[i + 1][0] if i + 1 < len(chunks) else total_bytes
    return [tuple(c) for c in chunks]


def plan_language_chunks(parts: List[Dict], chunk_bytes: int) -> List[Tuple[str, int, int, int]]:
    """(clean part file, start, end, first_doc) of every chunk of a language, in corpus order:
    each clean part (clean/LANG/PART.txt) is cut on its own index; documents are numbered
    language-wide."""
    chunks, docs = [], 0
    for part in parts:
        for start, end, first in plan_chunks(part["index"], part["bytes"], chunk_bytes):
            chunks.append((part["path"], start, end, docs + first))
        docs += part["docs"]
    return chunks


def stream_tokens(dictionary: Dictionary, lines: List[str]) -> Tuple[np.ndarray, np.ndarray]:
    """Encode lines ("" marks a document end) into one stream with `</s>` after every line.

    Returns the stream and each line's length in it (its tokens + 1)."""
    pieces = dictionary.sp.encode(lines)
    lens = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces)) + 1
    stream = np.empty(int(lens.sum()), dtype=np.int64)
    ends = np.cumsum(lens) - 1
    is_token = np.ones(len(stream), dtype=bool)
    is_token[ends] = False
    flat = np.fromiter(chain.from_iterable(pieces), dtype=np.int64, count=len(stream) - len(lines))
    stream[is_token] = dictionary.to_dict_ids(flat)
    stream[ends] = EOS
    return stream, lens


def read_batches(job: EncodeJob) -> Iterator[Tuple[List[str], int]]:
    """The chunk's lines ("" ends a document) in batches of about BATCH_BYTES cut at line ends,
    each with its size in bytes. Streaming, not the whole chunk at once: a chunk's lines as
    Python strings take about twice its size, and the allocator kept part of that after each
    chunk (peak RSS grew with the number of chunks a process encoded)."""
    with open(job.clean_path, "rb") as f:
        f.seek(job.start)
        left, rest = job.end - job.start, b""
        while left or rest:
            read = f.read(min(BATCH_BYTES, left))
            if left and not read:
                raise PrepError(f"{job.clean_path} ends at byte {job.end - left}, before its chunk's end "
                                f"{job.end}: the clean part changed after dedup; rerun with force=dedup")
            data = rest + read
            left -= len(read)
            cut = data.rfind(b"\n") + 1 if left else len(data)  # chunks end with a newline
            data, rest = data[:cut], data[cut:]
            if data:  # (none yet within a line longer than a batch)
                yield data.decode("utf-8").split("\n")[:-1], len(data)


@functools.lru_cache(maxsize=1)
def load_dictionary(spm_path: Path) -> Dictionary:
    """One load per worker process, not per chunk (a 250k-piece model takes a second to load)."""
    return Dictionary(spm_path)


def encode_chunk(job: EncodeJob) -> Dict:
    dictionary = load_dictionary(job.spm_path)
    job.out_dir.mkdir(parents=True, exist_ok=True)
    stats = {split: {"docs": 0, "lines": 0, "chars": 0, "tokens": 0, "unk": 0, "sequences": 0, "stream_tokens": 0}
             for split in SPLITS}
    packers = {s: SequencePacker(job.seq_len, dictionary.dtype) for s in SPLITS}
    writers = {s: ShardWriter(job.out_dir, job.lang, s, job.chunk, job.shard_bytes, dictionary.dtype,
                              stage_all=s == "valid") for s in SPLITS}
    valid_docs = np.asarray(job.valid_docs, dtype=np.int64)
    first_doc = job.first_doc
    try:
        # Batches need not align with documents: the stream is contiguous.
        for lines, size in read_batches(job):
            # Per line, vectorized: its length, whether it ends a document, whether its document is held out.
            chars = np.fromiter(map(len, lines), dtype=np.int64, count=len(lines))
            doc_end = chars == 0
            doc = first_doc + np.cumsum(doc_end) - doc_end
            first_doc += int(np.count_nonzero(doc_end))
            held_out = np.isin(doc, valid_docs)
            stream, lens = stream_tokens(dictionary, lines)
            token_held_out = np.repeat(held_out, lens)
            for split, mask, select in (("train", ~held_out, ~token_held_out), ("valid", held_out, token_held_out)):
                st = stats[split]
                st["docs"] += int(np.count_nonzero(doc_end & mask))
                st["lines"] += int(np.count_nonzero(~doc_end & mask))
                st["chars"] += int(chars[mask].sum())
                part = stream if select.all() else stream[select]
                if not len(part):
                    continue
                st["stream_tokens"] += len(part)
                st["unk"] += int(np.count_nonzero(part == UNK))
                packed = packers[split].add(part)
                if packed is not None:
                    writers[split].write_block(packed)
                    st["sequences"] += len(packed)
            parallel.advance(size)
        for split in SPLITS:
            last = packers[split].finish()
            if last is not None:
                writers[split].write_block(last[None, :])
                stats[split]["sequences"] += 1
            stats[split]["tokens"] = stats[split]["stream_tokens"] + stats[split]["sequences"]  # + <s> each
        closed = [writers[s].close() for s in SPLITS]
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    return {"lang": job.lang, "chunk": job.chunk, "stats": stats,
            "shards": [rec for full, _ in closed for rec in full], "staged": [st for _, st in closed if st]}


def merge_language(job: MergeJob) -> Dict:
    shards = [rec for split, staged in zip(SPLITS, job.staged)
              for rec in merge_staged(job.root, list(staged), job.out_dir, job.lang, split, job.shard_bytes, job.itemsize)]
    return {"lang": job.lang, "shards": shards}


def check_vocabulary_matches(layout: Layout, vocab_sha: str) -> None:
    """Refuse to mix shards of two vocabularies in one output_dir."""
    found = set()
    if layout.manifest.exists():
        found.add(load_marker(layout.manifest).get("vocab", {}).get("sha256"))
    for marker in (layout.state / "encode").glob("*/*.json"):
        found.add((load_marker(marker) or {}).get("vocab_sha256"))
    other = {sha for sha in found if sha and sha != vocab_sha}
    if other:
        raise PrepError(
            f"{layout.root} holds shards encoded with another vocabulary (sha256 {sorted(other)[0][:12]}…, "
            f"the current one is {vocab_sha[:12]}…). Use a new output_dir, or pass force=encode to "
            "re-encode everything with the current vocabulary."
        )


def staged_exist(layout: Layout, result: Dict) -> bool:
    return all((layout.root / rec["path"]).exists() for rec in result["staged"])


def run_encode(layout: Layout, clean_stats: Dict[str, Dict], vocab: Dict, cfg: PrepConfig,
               workers: int, progress: bool, allowed: bool = True) -> Dict[str, Dict] | None:
    """Encode every language (or this array task's share of the chunks: cfg.task), then merge
    each language's staged samples (task.count = 1 only); returns per language its chunk
    records ("chunks") and every shard in order ("shards"), or None while chunks or merges
    are left to other runs."""
    check_vocabulary_matches(layout, vocab["sha256"])
    spm_path = layout.root / vocab["spm_model"]
    planned, pending, fps, done, merge_fps, merged = [], [], {}, {}, {}, {}
    for lang, st in clean_stats.items():
        done[lang] = []
        valid = tuple(int(d) for d in choose_valid_docs(lang, st["docs"], cfg))
        clean_fp = load_marker(layout.marker("dedup", f"{lang}/part-00000"))["fingerprint"]
        chunks = plan_language_chunks(st["parts"], int(cfg.pack.chunk_mb * 1e6))
        chunk_fps = [fingerprint({"clean": clean_fp, "vocab": vocab["sha256"], "chunk": list(c), "valid": valid,
                                  "seq_len": cfg.pack.seq_len, "shard": cfg.shard.target_mb}) for c in chunks]
        merge_fps[lang] = fingerprint({"chunks": chunk_fps, "shard": cfg.shard.target_mb})
        if layout.is_done("encode", f"{lang}/merge", merge_fps[lang]):
            merged[lang] = load_marker(layout.marker("encode", f"{lang}/merge"))["result"]
        for chunk, ((part, start, end, first_doc), fp) in enumerate(zip(chunks, chunk_fps)):
            job = EncodeJob(
                lang, chunk, start, end, first_doc, valid,
                layout.root / part, layout.shards / lang, spm_path,
                cfg.pack.seq_len, int(cfg.shard.target_mb * 1e6),
            )
            name = f"{lang}/{chunk:05d}"
            result = load_marker(layout.marker("encode", name))["result"] if layout.is_done("encode", name, fp) else None
            if result is not None and (lang in merged or staged_exist(layout, result)):
                done[lang].append(result)
            else:
                pending.append(job)
                fps[name] = fp
            planned.append(job)
    require_allowed("encode", len(pending), allowed)
    # Array tasks deal out all chunks, done or not, so every task computes the same deal.
    planned.sort(key=lambda j: (-(j.end - j.start), j.lang, j.chunk))  # biggest first
    mine, todo = set(planned[cfg.task.index::cfg.task.count]), set(pending)
    jobs = [job for job in planned if job in mine and job in todo]
    total = sum(j.end - j.start for j in jobs)
    for result in parallel.iter_jobs(encode_chunk, jobs, workers=workers, desc="encode+pack+shard", total=total, progress=progress):
        name = f"{result['lang']}/{result['chunk']:05d}"
        for rec in result["shards"] + result["staged"]:
            rec["path"] = str(Path(rec["path"]).relative_to(layout.root))
        # The staged samples are not the marker's outputs: the merge deletes them once it is done.
        layout.write_marker("encode", name, fps[name], [layout.root / r["path"] for r in result["shards"]],
                            vocab_sha256=vocab["sha256"], result=result)
        done[result["lang"]].append(result)
    if cfg.task.count > 1 or len(jobs) < len(pending):
        return None  # the merge job (stages=[manifest,report]) merges once every task's chunks are done
    for lang in done:
        done[lang].sort(key=lambda r: r["chunk"])
    merges = [MergeJob(lang, layout.root, layout.shards / lang,
                       tuple(tuple(s for c in done[lang] for s in c["staged"] if s["split"] == split) for split in SPLITS),
                       int(cfg.shard.target_mb * 1e6), np.dtype(vocab["dtype"]).itemsize)
              for lang in sorted(done) if lang not in merged]
    total = sum(s["bytes"] for job in merges for staged in job.staged for s in staged)
    for result in parallel.iter_jobs(merge_language, merges, workers=workers, desc="merge shards", total=total, progress=progress):
        lang = result["lang"]
        for rec in result["shards"]:
            rec["path"] = str(Path(rec["path"]).relative_to(layout.root))
        layout.write_marker("encode", f"{lang}/merge", merge_fps[lang], [layout.root / r["path"] for r in result["shards"]],
                            vocab_sha256=vocab["sha256"], result=result)
        merged[lang] = result
    for lang in done:  # the staged samples are in the merged shards now (also after a kill right here)
        shutil.rmtree(layout.shards / lang / "staged", ignore_errors=True)
    return {lang: {"chunks": done[lang], "shards": [s for c in done[lang] for s in c["shards"]] + merged[lang]["shards"]}
            for lang in done}
