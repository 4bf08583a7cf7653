"""Stage 2, vocab: one shared SentencePiece model trained on a temperature-sampled sample.

Language shares p_i count cleaned lines (paragraphs, the unit SentencePiece samples); the
sample takes round(q_i * S) lines from language i with q_i = p_i^α / Σ_j p_j^α
(`sampling.temperature_probs`) and S = min(vocab.sample_lines, all cleaned lines). A language
with fewer lines than its quota is repeated (up-sampled), one with more is subsampled
uniformly. The sample is drawn by streaming over the cleaned files with pre-drawn line
numbers, never loading the corpus, and written to vocab/sample.txt for SentencePiece.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict

import numpy as np
import sentencepiece as spm

from . import parallel
from .atomic import atomic_open, tmp_path_for
from .config import PrepConfig
from .dictionary import Dictionary
from .errors import PrepError
from .sampling import temperature_probs
from .state import Layout, file_identity, fingerprint, load_marker, require_allowed, sha256_file

log = logging.getLogger(__name__)


def sample_quotas(lines: Dict[str, int], alpha: float, sample_lines: int) -> Dict[str, int]:
    q = temperature_probs(lines, alpha)
    total = min(sample_lines, sum(lines.values()))
    return {lang: int(round(q[lang] * total)) for lang in lines}


def line_multiplicities(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """How often each of n lines enters a sample of k: every line k // n times, plus a
    uniformly drawn subset of k % n lines once more."""
    reps, rest = divmod(k, n)
    counts = np.full(n, reps, dtype=np.int64)
    counts[rng.choice(n, size=rest, replace=False)] += 1
    return counts


def write_sample(layout: Layout, quotas: Dict[str, int], line_counts: Dict[str, int], cfg: PrepConfig, out: Path) -> Dict:
    rng = np.random.default_rng(cfg.seed)
    written = {lang: 0 for lang in quotas}
    skipped_long = 0
    with atomic_open(out, "wb") as f:
        for lang in sorted(quotas):
            if quotas[lang] == 0:
                continue
            counts = line_multiplicities(line_counts[lang], quotas[lang], rng)
            i = 0
            with open(layout.clean / f"{lang}.txt", "rb") as src:
                for line in src:
                    if line == b"\n":
                        continue
                    c = counts[i]
                    i += 1
                    if c == 0:
                        continue
                    if len(line) > cfg.vocab.max_sentence_bytes:
                        skipped_long += int(c)
                        continue
                    f.write(line * int(c))
                    written[lang] += int(c)
                    parallel.advance(len(line) * int(c))
    return {"lines": written, "skipped_too_long": skipped_long}


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


def run_vocab(layout: Layout, clean_stats: Dict[str, Dict], cfg: PrepConfig, progress: bool, allowed: bool = True) -> Dict:
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
        drawn = parallel.run_jobs(
            lambda _: write_sample(layout, quotas, line_counts, cfg, sample), [None], workers=1,
            desc="vocab sample", progress=progress,
        )[0]
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
