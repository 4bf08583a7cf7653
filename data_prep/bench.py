"""`xlmr-prep-bench`: encode+pack+shard throughput against its limit and the usual alternative.

On the same cleaned text and the same SentencePiece vocabulary it measures, in one run:
  1. limit       SentencePiece's own batch encoding (`sp.encode(lines)`), one process, text
                 already in memory: the speed no encoder built on it can beat;
  2. xlmr-prep   the real encode stage (read, encode, pack, write shards) with 1..N processes;
  3. HF          the path a `run_mlm.py` user takes: `datasets.load_dataset("text")`, then
                 `map(tokenize)` with the HF XLM-R tokenizer built from the same model, then
                 `map(group_texts)`, with the same number of processes.
Throughput is MB of cleaned UTF-8 text per second. The clean and vocab stages run first
(their time is not measured).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from .cli import CONF_DIR
from .clean import run_clean
from .config import PrepConfig
from .dedup import run_dedup
from .dictionary import Dictionary
from .encode import BATCH_BYTES, run_encode
from .inputs import discover
from .pipeline import run_prep
from .state import Layout, apply_force, load_marker


@dataclass
class BenchConfig:
    input_dir: str = "../shared/corpora/manpages"
    work_dir: str = "data/bench"
    vocab_size: int = 32000
    sample_lines: int = 200_000
    seq_len: int = 512
    processes: List[int] = field(default_factory=lambda: [1, 2])
    hf_baseline: bool = True
    output: str = ""  # also write the results as JSON here


def prep_config(cfg: BenchConfig) -> PrepConfig:
    prep = PrepConfig(input_dir=cfg.input_dir, output_dir=cfg.work_dir, progress=False)
    prep.vocab.size, prep.vocab.sample_lines, prep.pack.seq_len = cfg.vocab_size, cfg.sample_lines, cfg.seq_len
    prep.pack.chunk_mb = 4.0  # enough chunks to balance processes on a 100 MB corpus
    return prep


def time_encode_stage(layout: Layout, prep: PrepConfig, processes: int, languages: List[str]) -> float:
    """Wall time of the real encode stage (read, encode, pack, write shards) from scratch."""
    cleaned = run_clean(discover(Path(prep.input_dir)), prep.clean, layout, processes, False, allowed=False)
    clean_stats = {lang: st for lang, st in run_dedup(layout, cleaned, prep, processes, False, allowed=False).items()
                   if lang in languages}
    vocab = load_marker(layout.marker("vocab"))["vocab"]
    apply_force(layout, "encode")
    start = time.perf_counter()
    run_encode(layout, clean_stats, vocab, prep, processes, False)
    return time.perf_counter() - start


def clean_files(layout: Layout) -> List[Path]:
    return sorted(layout.clean.glob("*/*.txt"))


def sentencepiece_limit(layout: Layout, dictionary: Dictionary) -> float:
    """Seconds SentencePiece alone takes to encode every cleaned line, in the encoder's batches."""
    elapsed = 0.0
    for path in clean_files(layout):
        lines = path.read_text(encoding="utf-8").split("\n")[:-1]
        batch, size = [], 0
        for i, line in enumerate(lines):
            batch.append(line)
            size += len(line.encode("utf-8")) + 1
            if size >= BATCH_BYTES or i == len(lines) - 1:
                start = time.perf_counter()
                dictionary.sp.encode(batch)
                elapsed += time.perf_counter() - start
                batch, size = [], 0
    return elapsed


def hf_run_mlm_path(layout: Layout, processes: int, seq_len: int) -> float:
    """run_mlm.py's tokenize + group_texts with datasets and the HF XLM-R tokenizer."""
    import datasets
    from transformers import XLMRobertaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(layout.vocab / "spm.model", Path(tmp) / "sentencepiece.bpe.model")
        tokenizer = XLMRobertaTokenizer.from_pretrained(tmp)
        datasets.disable_progress_bars()
        start = time.perf_counter()
        raw = datasets.load_dataset("text", data_files=[str(p) for p in clean_files(layout)], split="train",
                                    cache_dir=str(Path(tmp) / "cache"))

        def tokenize(examples):
            return tokenizer(examples["text"], return_special_tokens_mask=True)

        def group_texts(examples):  # as run_mlm.py: concatenate, then cut into max_seq_length blocks
            concatenated = {k: sum(examples[k], []) for k in examples}
            total = len(concatenated["input_ids"]) // seq_len * seq_len
            return {k: [t[i: i + seq_len] for i in range(0, total, seq_len)] for k, t in concatenated.items()}

        tokenized = raw.map(tokenize, batched=True, num_proc=processes if processes > 1 else None,
                            remove_columns=["text"])
        grouped = tokenized.map(group_texts, batched=True, num_proc=processes if processes > 1 else None)
        assert len(grouped) > 0
        return time.perf_counter() - start


def run_bench(cfg: BenchConfig) -> Dict:
    layout = Layout(Path(cfg.work_dir).resolve())
    prep = prep_config(cfg)
    prep.workers = max(cfg.processes)
    languages = list(run_prep(prep)["languages"])  # clean, vocab, a first encode: untimed
    dictionary = Dictionary(layout.vocab / "spm.model")
    mb = sum(p.stat().st_size for p in clean_files(layout)) / 1e6
    results = {"text_mb": round(mb, 1), "vocab_size": dictionary.size, "seq_len": cfg.seq_len, "rows": []}

    def row(name, processes, seconds):
        r = {"path": name, "processes": processes, "seconds": round(seconds, 2), "mb_per_s": round(mb / seconds, 2),
             "mb_per_s_per_process": round(mb / seconds / processes, 2)}
        results["rows"].append(r)
        print(f"{name:<34} {processes:>3} proc  {seconds:8.1f} s  {r['mb_per_s']:7.2f} MB/s  "
              f"{r['mb_per_s_per_process']:6.2f} MB/s/proc", flush=True)

    print(f"{mb:.1f} MB of cleaned text, vocabulary {dictionary.size:,}, seq_len {cfg.seq_len}")
    limit = sentencepiece_limit(layout, dictionary)
    row("SentencePiece encode (limit)", 1, limit)
    for p in cfg.processes:
        row("xlmr-prep encode+pack+shard", p, time_encode_stage(layout, prep, p, languages))
    if cfg.hf_baseline:
        for p in cfg.processes:
            row("HF datasets+tokenizers run_mlm", p, hf_run_mlm_path(layout, p, cfg.seq_len))
    by = {(r["path"].split()[0], r["processes"]): r["mb_per_s"] for r in results["rows"]}
    ours1 = by[("xlmr-prep", cfg.processes[0])]
    results["ours_vs_limit_per_process"] = round(ours1 / by[("SentencePiece", 1)], 3)
    print(f"\nxlmr-prep per process / SentencePiece limit: {results['ours_vs_limit_per_process']:.0%}")
    if len(cfg.processes) > 1:
        p_max = cfg.processes[-1]
        results["scaling"] = round(by[("xlmr-prep", p_max)] / ours1 / (p_max / cfg.processes[0]), 3)
        print(f"scaling efficiency {cfg.processes[0]} -> {p_max} processes: {results['scaling']:.0%}")
    if cfg.hf_baseline:
        results["ours_vs_hf"] = {p: round(by[("xlmr-prep", p)] / by[("HF", p)], 2) for p in cfg.processes}
        print("xlmr-prep / HF datasets+tokenizers: " + ", ".join(f"{v:.1f}x at {p} proc" for p, v in results["ours_vs_hf"].items()))
    if cfg.output:
        Path(cfg.output).write_text(json.dumps(results, indent=1) + "\n")
    return results


@hydra.main(config_path=CONF_DIR, config_name="prep_bench", version_base="1.3")
def _app(cfg) -> None:
    run_bench(OmegaConf.to_object(cfg))


def main() -> None:
    ConfigStore.instance().store(name="prep_bench_schema", node=BenchConfig)
    _app()


if __name__ == "__main__":
    main()
