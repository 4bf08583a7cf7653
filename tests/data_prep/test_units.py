"""Units that finish one by one: kill -9 inside each stage, then a rerun that does only the
rest and gives the uninterrupted output byte for byte; the bucketed dedup against a plain
in-memory dedup; the dedup memory budget; the vocabulary sample's shares."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.clean import run_clean
from data_prep.config import CleanConfig, PrepConfig, TaskConfig
from data_prep.dedup import run_dedup
from data_prep.inputs import discover
from data_prep.state import Layout
from tests.conftest import REPO, run_prep
from tests.data_prep.corpus import SMALL_ARGS, cc100_text, sample_docs, write_corpus

# Many small units in every stage, so that a kill lands inside each one.
UNIT_ARGS = [*SMALL_ARGS, "workers=1", "clean.chunk_mb=0.02", "dedup.memory_mb=0.002",
             "clean.index_every_mb=0.005", "pack.chunk_mb=0.01"]
MARKERS = {"clean": "state/clean/*/*.json", "dedup": "state/dedup/*/bucket-*.json", "apply": "state/dedup/*/part-*.json",
           "vocab": "state/vocab/*/*.json", "encode": "state/encode/*/*.json"}  # apply: the dedup stage's second half


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("units")
    langs = {lang: sample_docs(lang, max_bytes=150_000) for lang in ("en", "de", "ru")}
    langs["en"] += langs["en"][:40]  # duplicates across parts
    inp = write_corpus(root / "in", langs)
    ref = root / "ref"
    run_prep(f"input_dir={inp}", f"output_dir={ref}", *UNIT_ARGS)
    return inp, ref


def files(out: Path) -> dict:
    """Every output file (state/ markers and logs aside) by path: its sha256."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.parts[len(out.parts)] not in ("state", "logs", "manifest.json")}


@pytest.mark.parametrize("stage", list(MARKERS))
def test_kill_9_inside_a_stage_loses_only_units_in_flight(corpus, tmp_path, stage):
    inp, ref = corpus
    out = tmp_path / "out"
    n = len(list(ref.glob(MARKERS[stage])))
    assert n >= 8, f"the corpus should give {stage} several units"
    args = [f"input_dir={inp}", f"output_dir={out}", *UNIT_ARGS]
    proc = subprocess.Popen([sys.executable, "-m", "data_prep.cli", *args], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(list(out.glob(MARKERS[stage]))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p: p.stat().st_mtime_ns for p in out.glob(MARKERS[stage])}
    assert 2 <= len(done) < n, f"killed after {len(done)} of {n} {stage} units"

    rerun = run_prep(*args)
    after = {p: p.stat().st_mtime_ns for p in out.glob(MARKERS[stage])}
    assert len(after) == n
    assert all(after[p] == t for p, t in done.items()), "a unit done before the kill was redone"
    logged = re.search(rf"{stage}[a-z ]*: {n} units, (\d+) done before, (\d+) to do", rerun.stdout + rerun.stderr)
    if stage != "encode":  # encode logs nothing of its units; its markers tell
        assert logged and (int(logged[1]), int(logged[2])) == (len(done), n - len(done)), rerun.stdout
    assert files(out) == files(ref)
    manifest, expected = (json.loads((d / "manifest.json").read_text()) for d in (out, ref))
    assert manifest["shards"] == expected["shards"] and manifest["languages"] == expected["languages"]


def reference_dedup(text: str):
    """Sequential exact dedup as the README defines it, in memory: (kept text, duplicates,
    documents left empty). Keys are the lowercased text with digits as 0 (no hashing)."""
    seen, kept_docs, duplicates, empty = set(), [], 0, 0
    for block in text.split("\n\n")[:-1]:
        kept = []
        for line in block.split("\n"):
            key = re.sub(r"\d", "0", line.lower())
            if key in seen:
                duplicates += 1
            else:
                seen.add(key)
                kept.append(line)
        if kept:
            kept_docs.append(kept)
        else:
            empty += 1
    return cc100_text(kept_docs), duplicates, empty


def run_clean_and_dedup(inp: Path, out: Path, tasks: int, **clean):
    """Each stage as a job array of `tasks` tasks, then the per-language stats and text."""
    cfg = PrepConfig(input_dir=str(inp), output_dir=str(out), clean=CleanConfig(**clean))
    cfg.dedup.memory_mb = 0.001
    layout = Layout(out)
    for stage in ("clean", "dedup", "dedup"):  # the second dedup round: apply units left by the buckets' round
        for index in range(tasks):
            cfg.task = TaskConfig(index, tasks)
            cleaned = run_clean(discover(inp), cfg.clean, layout, 2, False, task=cfg.task)
            if stage == "dedup":
                run_dedup(layout, cleaned, cfg, 2, False)
    cfg.task = TaskConfig()
    stats = run_dedup(layout, run_clean(discover(inp), cfg.clean, layout, 1, False, allowed=False), cfg, 1, False, allowed=False)
    text = {lang: "".join((out / p["path"]).read_text(encoding="utf-8") for p in st["parts"]) for lang, st in stats.items()}
    return stats, text


def test_bucketed_dedup_over_parts_and_tasks_keeps_what_a_set_keeps(tmp_path):
    docs = sample_docs("en", max_bytes=120_000)
    # Duplicates everywhere: whole documents again at the end, lines in other case and with
    # other digits in other documents, and documents made only of earlier lines.
    mixed = docs + docs[:30] + [[p.upper() for p in d] for d in docs[5:25]]
    mixed += [[re.sub(r"\d", "7", p) + " 2024" for p in d] for d in docs[::3]]
    mixed += [[d[0] for d in docs[i:i + 4]] for i in range(0, 60, 4)]
    inp = write_corpus(tmp_path / "in", {"en": mixed})
    _, plain = run_clean_and_dedup(inp, tmp_path / "plain", 1, dedup=False)
    stats, text = run_clean_and_dedup(inp, tmp_path / "dedup", 3, chunk_mb=0.01)
    expected, duplicates, empty = reference_dedup(plain["en"])
    assert duplicates > 500 and empty > 20
    assert len(stats["en"]["parts"]) > 10 and len(list((tmp_path / "dedup" / "dedup" / "en").iterdir())) > 10
    assert text["en"] == expected
    assert stats["en"]["removed"]["duplicate"] == duplicates
    assert stats["en"]["removed"]["empty_docs"] == empty
    assert stats["en"]["lines"] == sum(1 for line in expected.split("\n") if line)


def test_vocab_sample_shares_follow_the_temperature_formula(tmp_path):
    langs = {"en": sample_docs("en", max_bytes=200_000), "de": sample_docs("de", max_bytes=60_000),
             "sl": sample_docs("sl", max_bytes=3_000)}
    inp = write_corpus(tmp_path / "in", langs)
    args = [f"input_dir={inp}", *SMALL_ARGS, "clean.chunk_mb=0.02", "vocab.sample_lines=2500", "sampling.alpha=0.3",
            "stages=[clean,dedup,vocab]", "clean.lid.enabled=false"]  # LID would drop sl's few pages
    run_prep(f"output_dir={tmp_path / 'a'}", "workers=1", *args)
    run_prep(f"output_dir={tmp_path / 'b'}", "workers=2", *args)
    out = tmp_path / "a"
    assert (out / "vocab" / "sample.txt").read_bytes() == (tmp_path / "b" / "vocab" / "sample.txt").read_bytes()

    clean = {lang: [line for p in sorted((out / "clean" / lang).glob("*.txt"))
                    for line in p.read_text(encoding="utf-8").split("\n") if line] for lang in langs}
    n = {lang: len(lines) for lang, lines in clean.items()}
    total = sum(n.values())
    weights = {lang: (n[lang] / total) ** 0.3 for lang in n}
    quota = {lang: round(weights[lang] / sum(weights.values()) * min(2500, total)) for lang in n}
    assert n["en"] > quota["en"] and n["sl"] < quota["sl"]  # en subsampled, sl up-sampled
    sample = {lang: [line for p in sorted((out / "vocab" / "sample" / lang).glob("*.txt"))
                     for line in p.read_text(encoding="utf-8").split("\n") if line] for lang in langs}
    assert {lang: len(lines) for lang, lines in sample.items()} == quota
    for lang in langs:  # each line k // n or k // n + 1 times
        reps = quota[lang] // n[lang]
        counts = {line: 0 for line in clean[lang]}
        for line in sample[lang]:
            counts[line] += 1
        assert set(counts.values()) <= {reps, reps + 1}
    assert len(list((out / "state" / "vocab" / "en").glob("*.json"))) > 3  # drawn in parts


def peak_rss_mb(args) -> float:
    proc = subprocess.Popen([sys.executable, "-m", "data_prep.cli", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    assert status == 0, proc.stderr.read().decode()[-3000:]
    return usage.ru_maxrss / 1024


def unique_lines_corpus(path: Path, mb: float) -> int:
    """Documents of distinct lines of real words (a counter spelled in words, never digits,
    which the dedup key maps to 0)."""
    words = sorted({w for d in sample_docs("en", max_bytes=200_000) for p in d for w in p.split() if w.isalpha()})
    lines = 0
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < mb * 1e6:
            i, name = lines, []
            while True:
                i, r = divmod(i, len(words))
                name.append(words[r])
                if not i:
                    break
            line = f"{' '.join(name)} {words[lines * 7 % len(words)]} {words[lines * 13 % len(words)]}\n"
            f.write(line + ("\n" if lines % 10 == 9 else ""))
            written += len(line)
            lines += 1
    return lines


@pytest.mark.slow
def test_dedup_memory_stays_within_its_budget(tmp_path):
    """Peak RSS of clean+dedup in one process: a 100 MB corpus of unique lines (≈ 3.5M lines; an
    in-memory set of their keys alone would take hundreds of MB) against a 3 MB one, with a
    16 MB budget: the difference stays within the budget and a margin for the parts."""
    (tmp_path / "big").mkdir()
    (tmp_path / "small").mkdir()
    lines = unique_lines_corpus(tmp_path / "big" / "en.txt", 100)
    unique_lines_corpus(tmp_path / "small" / "en.txt", 3)
    common = ["workers=1", "progress=false", "stages=[clean,dedup]", "dedup.memory_mb=16", "clean.chunk_mb=8"]
    small = peak_rss_mb([f"input_dir={tmp_path / 'small'}", f"output_dir={tmp_path / 'o1'}", *common])
    big = peak_rss_mb([f"input_dir={tmp_path / 'big'}", f"output_dir={tmp_path / 'o2'}", *common])
    buckets = len(list((tmp_path / "o2" / "dedup" / "en").iterdir()))
    print(f"peak RSS {big:.0f} MB (100 MB corpus, {buckets} buckets) vs {small:.0f} MB (3 MB corpus)")
    assert buckets >= 8
    assert lines > 2_500_000
    # budget + the biggest part's keys and sort (8 MB of text: ≈ 300k lines × 24 B) + slack
    assert big - small < 16 + 10 + 16, f"peak RSS {big:.0f} MB vs {small:.0f} MB on a tiny corpus"
