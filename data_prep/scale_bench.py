"""`xlmr-prep-scale`: how the prep grows with the corpus and the processes (README "Data prep at
scale").

It generates single-language corpora of the given sizes: unique lines of real words (the
words of a real corpus, by default the English manual pages), and runs the real `xlmr-prep`
on each, and on the manpages corpus itself, one stage at a time (`stages=[STAGE]`, for every
stage of data_prep.config.STAGES in order), with each `workers` count. Per stage it records
the wall time and the peak RSS of every process of the stage's process tree (VmHWM from
/proc, polled every poll_s: a process that lives shorter than that can be missed), and
throughput per busy process (a pool's workers, or the one process that ran the stage): MB of input text for the stages before encode (clean, and
dedup where the prep has it), MB of cleaned text from encode on.

Language identification's cost: the clean stage also runs once more with
clean.lid.enabled=false on the same text (stage "clean-no-lid"), so each run compares clean's
throughput per process with and without LID (not when `prep` already turns LID off).

Generated lines are unique by construction, also after the clean stage's dedup normalization
(lowercase, digits as 0): each line starts with its own number written in base W with three
words of the W-word list (lowercase letters only, distinct), then 4-24 random words.
Documents are 1-12 lines. The generator is seeded: the same size and seed give the same bytes.
"""
from __future__ import annotations

import json
import lzma
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from .cli import CONF_DIR
from .config import STAGES

REPO = Path(__file__).resolve().parent.parent
CLEANING = [s for s in STAGES[: STAGES.index("encode")] if s != "vocab"]  # clean (and dedup, where there is one)
NO_LID = "clean-no-lid"  # the clean stage again with language identification off: what LID costs
INDEX_WORDS = 3  # words that spell a line's number: W^3 lines (W ~ 10^4: 10^12) before any repeat


@dataclass
class ScaleBenchConfig:
    words_from: str = "../shared/corpora/manpages/en.txt.xz"  # a CC100-layout file: the word list
    manpages: str = "../shared/corpora/manpages"  # also run on this corpus; "" to leave out
    sizes_gb: List[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])
    workers: List[int] = field(default_factory=lambda: [1, 2])
    work_dir: str = "data/prep_scale"
    seed: int = 0
    prep: List[str] = field(default_factory=lambda: ["vocab.size=8000", "vocab.sample_lines=100000"])
    poll_s: float = 0.05
    keep_outputs: bool = False  # keep each run's output_dir (the generated corpora are always kept)
    output: str = ""  # also write the results as JSON here


def real_words(path: Path) -> List[str]:
    """The distinct lowercase all-letter words (2+ letters) of a text file, sorted."""
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    return sorted({w.lower() for w in re.findall(r"[^\W\d_]{2,}", text)} - {""})


def generate_corpus(path: Path, size_bytes: int, words: List[str], seed: int) -> int:
    """Write a CC100-layout file of at least size_bytes of unique lines; returns its lines."""
    rng = np.random.default_rng([seed, 9])
    vocab = np.array(words, dtype=object)[rng.permutation(len(words))]  # line numbers not in alphabetical words
    w = len(vocab)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = line = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_bytes:
            n = int(np.clip((size_bytes - written) // 200 + 1, 1, 20_000))  # lines average ~130 bytes: no big overshoot
            lengths = rng.integers(4, 25, n)
            ids = rng.integers(0, w, int(lengths.sum()))
            doc_ends = rng.random(n) < 1 / 6.5  # documents of 6.5 lines on average
            number = line + np.arange(n)
            index = np.stack([number // w ** k % w for k in range(INDEX_WORDS - 1, -1, -1)], axis=1)
            out, at = [], 0
            for i in range(n):
                out.append(" ".join([*vocab[index[i]], *vocab[ids[at: at + lengths[i]]]]))
                out.append("\n\n" if doc_ends[i] else "\n")
                at += lengths[i]
            block = "".join(out)
            f.write(block)
            written += len(block.encode("utf-8"))
            line += n
    return line


def _tree(root: int) -> List[int]:
    """root and its descendants, from /proc (children of each process's threads)."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return pids


def _hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(argv: List[str], poll_s: float, log: Path) -> Dict:
    """Run argv; its wall time, and the peak RSS of each process of its tree."""
    start = time.perf_counter()
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        peaks: Dict[int, int] = {}
        while True:
            for pid in _tree(proc.pid):
                peaks[pid] = max(peaks.get(pid, 0), _hwm_kb(pid))
            done, status = os.waitpid(proc.pid, os.WNOHANG)
            if done:
                break
            time.sleep(poll_s)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({code}); see {log}")
    rss = [kb for kb in peaks.values() if kb]
    # Not wait4's ru_maxrss: Linux carries a process's high-water mark across exec, so it would
    # count this (big) benchmark process, of which the prep is a fork.
    return {"seconds": round(seconds, 2), "processes": len(rss), "peak_rss_mb": round(max(rss) / 1024, 1),
            "peak_rss_mb_each": sorted((round(kb / 1024, 1) for kb in rss), reverse=True)}


def bench_corpus(name: str, input_dir: Path, input_mb: float, workers: int, cfg: ScaleBenchConfig) -> List[Dict]:
    out = Path(cfg.work_dir).resolve() / "runs" / f"{name}-w{workers}"
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    rows = []
    lid_off = "clean.lid.enabled=false" in cfg.prep
    runs = [] if lid_off else [(NO_LID, out.with_name(out.name + "-no-lid"), ["stages=[clean]", "clean.lid.enabled=false"])]
    runs += [(stage, out, [f"stages=[{stage}]"]) for stage in STAGES]
    for stage, output_dir, args in runs:
        argv = [sys.executable, "-m", "data_prep.cli", f"input_dir={input_dir}", f"output_dir={output_dir}",
                f"workers={workers}", "progress=false", *cfg.prep, *args]
        row = {"corpus": name, "input_mb": round(input_mb, 1), "workers": workers, "stage": stage,
               **run_measured(argv, cfg.poll_s, out.parent / f"{name}-w{workers}.log")}
        text_mb = input_mb if stage in CLEANING + [NO_LID] else sum(p.stat().st_size for p in (out / "clean").glob("*/*.txt")) / 1e6
        # The processes that did the work: a pool's workers (the parent waits; a stage may run
        # pools one after the other, each of at most `workers`), or the one process when the
        # stage had a single unit.
        row["busy_processes"] = min(workers, max(1, row["processes"] - 1))
        row["mb_per_s_per_process"] = round(text_mb / row["seconds"] / row["busy_processes"], 2)
        rows.append(row)
        print(f"{name:>14} {workers} proc {stage:>9} {row['seconds']:8.1f} s  peak RSS {row['peak_rss_mb']:7.1f} MB"
              f" ({row['processes']} processes)  {row['mb_per_s_per_process']:6.2f} MB/s/proc", flush=True)
    subprocess.run(["rm", "-rf", str(out.with_name(out.name + "-no-lid"))], check=True)
    if not cfg.keep_outputs:
        subprocess.run(["rm", "-rf", str(out)], check=True)
    return rows


def summarize(rows: List[Dict]) -> List[Dict]:
    """Per run: clean(+dedup) vs encode throughput per process on the same text (issue target:
    clean+dedup at least as fast as encode+pack+shard)."""
    runs = {}
    for r in rows:
        runs.setdefault((r["corpus"], r["workers"]), []).append(r)
    out = []
    for (corpus, workers), rs in runs.items():
        by = {r["stage"]: r for r in rs}
        clean_s = sum(by[s]["seconds"] * by[s]["busy_processes"] for s in CLEANING)  # process-seconds
        input_mb = rs[0]["input_mb"]
        encode = by["encode"]
        clean_rate = input_mb / clean_s
        out.append({"corpus": corpus, "workers": workers, "input_mb": input_mb, "total_s": round(sum(r["seconds"] for r in rs if r["stage"] != NO_LID), 1),
                    "clean_dedup_mb_per_s_per_process": round(clean_rate, 2),
                    "encode_mb_per_s_per_process": encode["mb_per_s_per_process"],
                    "clean_vs_encode": round(clean_rate / encode["mb_per_s_per_process"], 2),
                    "clean_mb_per_s_per_process": by["clean"]["mb_per_s_per_process"],
                    "clean_no_lid_mb_per_s_per_process": by.get(NO_LID, by["clean"])["mb_per_s_per_process"],
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)})
    return out


def growth(rows: List[Dict], summary: List[Dict]) -> List[Dict]:
    """Per process count, over the generated corpora from the smallest to the largest (issue
    targets: peak RSS per process of each stage grows by at most 20 %, total time per GB within
    20 %): each stage's peak RSS at every size and its ratio largest/smallest, total s/GB."""
    out = []
    for workers in sorted({r["workers"] for r in rows}):
        sizes = sorted({r["input_mb"] for r in rows if r["workers"] == workers and r["corpus"].startswith("gen-")})
        if len(sizes) < 2:
            continue
        rss = {}
        for r in rows:
            if r["workers"] == workers and r["input_mb"] in sizes and r["corpus"].startswith("gen-"):
                rss.setdefault(r["stage"], {})[r["input_mb"]] = r["peak_rss_mb"]
        per_gb = {s["corpus"]: round(s["total_s"] / s["input_mb"] * 1000, 1)
                  for s in summary if s["workers"] == workers and s["corpus"].startswith("gen-")}
        out.append({"workers": workers, "sizes_mb": sizes,
                    "peak_rss_mb": {stage: [by[mb] for mb in sizes] for stage, by in rss.items()},
                    "peak_rss_growth": {stage: round(by[sizes[-1]] / by[sizes[0]], 2) for stage, by in rss.items()},
                    "total_s_per_gb": per_gb,
                    "total_s_per_gb_spread": round(max(per_gb.values()) / min(per_gb.values()), 2)})
    return out


def run_scale_bench(cfg: ScaleBenchConfig) -> Dict:
    work = Path(cfg.work_dir).resolve()
    words = real_words(Path(cfg.words_from))
    corpora = []
    for gb in cfg.sizes_gb:
        name = f"gen-{gb:g}GB"
        path = work / "corpora" / name / "en.txt"
        size = int(gb * 1e9)
        if not path.exists() or path.stat().st_size < size:
            start = time.perf_counter()
            generate_corpus(path, size, words, cfg.seed)
            print(f"generated {path} ({path.stat().st_size / 1e6:,.1f} MB) in {time.perf_counter() - start:.0f} s", flush=True)
        corpora.append((name, path.parent, path.stat().st_size / 1e6))
    if cfg.manpages:
        mp = Path(cfg.manpages).resolve()
        mb = sum(len(lzma.open(p).read()) for p in sorted(mp.glob("*.txt.xz"))) / 1e6
        corpora.append(("manpages", mp, mb))
    rows = []
    for name, path, mb in corpora:
        for workers in cfg.workers:
            rows += bench_corpus(name, path, mb, workers, cfg)
            summary = summarize(rows)
            result = {"words": len(words), "stages": list(STAGES), "rows": rows, "summary": summary,
                      "growth": growth(rows, summary)}
            if cfg.output:  # after every run: a long benchmark stopped early keeps what it measured
                Path(cfg.output).write_text(json.dumps(result, indent=1) + "\n")
    for s in result["summary"]:
        print(f"{s['corpus']:>14} {s['workers']} proc: total {s['total_s']:7.1f} s, clean+dedup "
              f"{s['clean_dedup_mb_per_s_per_process']:.2f} vs encode {s['encode_mb_per_s_per_process']:.2f} MB/s/proc "
              f"({s['clean_vs_encode']:.2f}x), clean {s['clean_mb_per_s_per_process']:.2f} with LID vs "
              f"{s['clean_no_lid_mb_per_s_per_process']:.2f} without, peak RSS {s['peak_rss_mb']:.0f} MB")
    for g in result["growth"]:
        print(f"{g['workers']} proc, {g['sizes_mb'][0]:g} -> {g['sizes_mb'][-1]:g} MB: peak RSS x "
              + ", ".join(f"{stage} {ratio:.2f}" for stage, ratio in g["peak_rss_growth"].items())
              + f"; total s/GB spread {g['total_s_per_gb_spread']:.2f}")
    return result


@hydra.main(config_path=CONF_DIR, config_name="prep_scale", version_base="1.3")
def _app(cfg) -> None:
    run_scale_bench(OmegaConf.to_object(cfg))


def main() -> None:
    ConfigStore.instance().store(name="prep_scale_schema", node=ScaleBenchConfig)
    _app()


if __name__ == "__main__":
    main()
