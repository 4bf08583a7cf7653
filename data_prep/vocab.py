"""Stage 2, vocab: one shared SentencePiece model trained on a temperature-sampled sample.

Language shares p_i count cleaned lines (paragraphs, the unit SentencePiece samples); the
sample takes round(q_i * S) lines from language i with q_i = p_i^α / Σ_j p_j^α
(`sampling.temperature_probs`) and S = min(vocab.sample_lines, all cleaned lines). A language
with fewer lines than its quota is repeated (up-sampled), one with more is subsampled
uniformly. The sample is drawn in parallel, one unit per clean part (sample_units), each
streaming over its part with pre-drawn line numbers, never loading the corpus; the parts
(vocab/sample/LANG/PART.txt) are joined into vocab/sample.txt for SentencePiece.
"""
from __future__ import annotations

import logging
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import sentencepiece as spm

from . import parallel
from .atomic import atomic_open, tmp_path_for
from .config import PrepConfig
from .dictionary import Dictionary
from .errors import PrepError
from .sampling import temperature_probs
from .state import Layout, file_identity, fingerprint, load_marker, require_allowed, sha256_file
from .units import Unit, run_units

log = logging.getLogger(__name__)


def sample_quotas(lines: Dict[str, int], alpha: float, sample_lines: int) -> Dict[str, int]:
    q = temperature_probs(lines, alpha)
    total = min(sample_lines, sum(lines.values()))
    return {lang: int(round(q[lang] * total)) for lang in lines}


def part_extras(part_lines: List[int], rest: int, rng: np.random.Generator) -> np.ndarray:
    """How many of a language's `rest` extra lines (drawn uniformly without replacement from
    all its lines) fall in each part: a multivariate hypergeometric draw, so that each part
    can then draw its own lines alone."""
    return rng.multivariate_hypergeometric(np.asarray(part_lines, dtype=np.int64), rest, method="marginals")


@dataclass(frozen=True)
class SampleJob:
    lang: str
    part: int
    path: Path  # the clean part
    lines: int
    reps: int  # every line of the language enters the sample reps times...
    extra: int  # ...and this many of the part's lines once more
    seed: Tuple[int, ...]
    out: Path
    max_bytes: int


def sample_part(job: SampleJob) -> Tuple[Dict, List[Path]]:
    """One clean part's share of the sample. Memory: the part's chosen line numbers."""
    chosen = np.sort(np.random.default_rng(job.seed).choice(job.lines, size=job.extra, replace=False)).tolist()
    written = skipped_long = 0
    at = 0  # next index into chosen
    with open(job.path, "rb") as src, atomic_open(job.out, "wb") as f:
        i = 0
        for line in src:
            if line == b"\n":
                continue
            c = job.reps
            if at < len(chosen) and chosen[at] == i:
                c += 1
                at += 1
            i += 1
            if c == 0:
                continue
            if len(line) > job.max_bytes:
                skipped_long += c
                continue
            f.write(line * c)
            written += c
            parallel.advance(len(line) * c)
    return {"lang": job.lang, "part": job.part, "lines": written, "skipped_too_long": skipped_long}, [job.out]


def sample_units(layout: Layout, quotas: Dict[str, int], clean_stats: Dict[str, Dict], cfg: PrepConfig, fp: str) -> List[Unit]:
    """The sample's units, one per clean part with lines in it. A language's quota k over its
    n lines: every line k // n times, plus k % n lines drawn uniformly without replacement,
    dealt to the parts by a hypergeometric draw seeded by (seed, language)."""
    units = []
    for lang in sorted(quotas):
        parts, n = clean_stats[lang]["parts"], clean_stats[lang]["lines"]
        if quotas[lang] == 0:
            continue
        reps, rest = divmod(quotas[lang], n)
        crc = zlib.crc32(lang.encode())
        extras = part_extras([p["lines"] for p in parts], rest, np.random.default_rng([cfg.seed, crc]))
        for i, (part, extra) in enumerate(zip(parts, extras.tolist())):
            if part["lines"] == 0 or reps == 0 and extra == 0:
                continue
            out = layout.vocab / "sample" / lang / f"{i:05d}.txt"
            job = SampleJob(lang, i, layout.root / part["path"], part["lines"], reps, extra, (cfg.seed, crc, i), out,
                            cfg.vocab.max_sentence_bytes)
            units.append(Unit(f"{lang}/{i:05d}", fp, job, part["bytes"]))
    return units


def write_sample(layout: Layout, units: List[Unit], workers: int, cfg: PrepConfig, progress: bool, out: Path) -> Dict:
    """Draw the sample part by part (resumable units), then join the parts in order."""
    drawn = run_units(layout, "vocab", units, sample_part, workers=workers, progress=progress, desc="vocab sample")
    written: Dict[str, int] = {}
    with atomic_open(out, "wb") as f:
        for unit in units:
            written[unit.job.lang] = written.get(unit.job.lang, 0) + drawn[unit.name]["lines"]
            with open(unit.job.out, "rb") as part:
                shutil.copyfileobj(part, f)
    return {"lines": written, "skipped_too_long": sum(d["skipped_too_long"] for d in drawn.values())}


def memory_estimate_gb(sample_lines: int, gb_per_million: float) -> float:
    return sample_lines / 1e6 * gb_per_million


def physical_memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def train_sentencepiece(sample: Path, prefix: Path, cfg: PrepConfig, n_lines: int) -> None:
    v = cfg.vocab
    spm.set_random_generator_seed(cfg.seed + 1)  # reproducible sampling inside the trainer
    try:
        spm.SentencePieceTrainer.train(
            input=str(sample),
            model_prefix=str(prefix),
            vocab_size=v.size,
            model_type=v.model_type,
            character_coverage=v.character_coverage,
            byte_fallback=v.byte_fallback,
            max_sentence_length=v.max_sentence_bytes,
            input_sentence_size=0,  # the sample is already capped; use all of it
            shuffle_input_sentence=True,
            num_threads=parallel.resolve_workers(v.threads),
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # SentencePiece defaults; see dictionary.py
            minloglevel=2,
        )
    except (RuntimeError, OSError) as exc:
        raise PrepError(
            f"SentencePiece training failed: {str(exc).rstrip('.')}"
            " (settings: vocab.size, vocab.sample_lines, vocab.character_coverage)"
        ) from None


def machine_independent(model: bytes) -> bytes:
    """Drop the paths and thread count SentencePiece records in the model, so that the same
    sample and settings give a byte-identical model (and vocabulary hash) anywhere."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    for name in ("input", "model_prefix", "num_threads"):
        proto.trainer_spec.ClearField(name)
    return proto.SerializeToString()


def run_vocab(layout: Layout, clean_stats: Dict[str, Dict], cfg: PrepConfig, workers: int, progress: bool,
              allowed: bool = True) -> Dict:
    """Returns the vocabulary record: hash, sizes and the sampling it was trained on."""
    line_counts = {lang: s["lines"] for lang, s in clean_stats.items()}
    model_path = layout.vocab / "spm.model"
    external = Path(cfg.vocab.model).resolve() if cfg.vocab.model else None
    fp = fingerprint({
        "clean": {lang: [s["lines"], s["bytes"]] for lang, s in clean_stats.items()},
        "vocab": vars(cfg.vocab) | {"model": file_identity(external) if external else None},
        "alpha": cfg.sampling.alpha,
        "seed": cfg.seed,
    })
    if layout.is_done("vocab", "", fp):
        return load_marker(layout.marker("vocab"))["vocab"]
    require_allowed("vocab", 1, allowed)

    quotas = sample_quotas(line_counts, cfg.sampling.alpha, cfg.vocab.sample_lines)
    record = {"sampling": {"count": "lines", "alpha": cfg.sampling.alpha, "quota_lines": quotas}}
    layout.vocab.mkdir(parents=True, exist_ok=True)
    if external is not None:
        if not external.exists():
            raise PrepError(f"vocab.model={external} does not exist")
        with atomic_open(model_path) as f:
            f.write(external.read_bytes())
        record["source"] = str(external)
    else:
        n = sum(quotas.values())
        need, have = memory_estimate_gb(n, cfg.vocab.gb_per_million_lines), physical_memory_gb()
        log.info("vocab sample: %d lines over %d languages; SentencePiece needs about %.1f GB of RAM "
                 "for it (%.0f GB/M lines), this machine has %.0f GB", n, len(quotas), need,
                 cfg.vocab.gb_per_million_lines, have)
        if need > 0.9 * have:
            raise PrepError(
                f"the vocab sample of {n} lines needs about {need:.0f} GB of RAM to train, this machine has "
                f"{have:.0f} GB: lower vocab.sample_lines (or run the vocab job on a bigger node)"
            )
        sample = layout.vocab / "sample.txt"
        units = sample_units(layout, quotas, clean_stats, cfg, fp)
        drawn = write_sample(layout, units, workers, cfg, progress, sample)
        record["sample"] = drawn
        prefix = tmp_path_for(layout.vocab / "spm")
        log.info("training SentencePiece %s, %d pieces, character_coverage %s", cfg.vocab.model_type,
                 cfg.vocab.size, cfg.vocab.character_coverage)
        train_sentencepiece(sample, prefix, cfg, n)
        os.replace(f"{prefix}.vocab", layout.vocab / "spm.vocab")
        with atomic_open(model_path) as f:
            f.write(machine_independent(Path(f"{prefix}.model").read_bytes()))
        Path(f"{prefix}.model").unlink()

    d = Dictionary(model_path)
    record |= {"sha256": sha256_file(model_path), "spm_model": "vocab/spm.model", "spm_size": d.spm_size,
               "size": d.size, "dtype": np.dtype(d.dtype).name, "special_ids": d.special_ids}
    layout.write_marker("vocab", "", fp, [model_path], vocab=record)
    return record
