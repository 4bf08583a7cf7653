"""`xlmr-prep-scale` at a tiny size: the generated corpus is what it promises, and the benchmark
runs every stage of the real prep and measures it."""
import json
import re
import subprocess
import sys
from pathlib import Path

from data_prep.config import STAGES
from data_prep.scale_bench import generate_corpus, real_words
from tests.conftest import MANPAGES, REPO


def test_generated_corpus_has_unique_lines_of_real_words(tmp_path):
    words = real_words(MANPAGES / "en.txt.xz")
    assert len(words) > 10_000 and all(re.fullmatch(r"[^\W\d_]{2,}", w) and w == w.lower() for w in words)
    a, b = tmp_path / "a" / "en.txt", tmp_path / "b" / "en.txt"
    lines = generate_corpus(a, 3_000_000, words, seed=0)
    generate_corpus(b, 3_000_000, words, seed=0)
    assert a.read_bytes() == b.read_bytes()  # deterministic
    text = a.read_text(encoding="utf-8")
    assert 3_000_000 <= len(text.encode()) < 3_000_000 + 20_000
    paragraphs = [line for line in text.split("\n") if line]
    assert len(paragraphs) == lines and "\n\n\n" not in text and text.endswith("\n")
    # unique as the clean stage's dedup sees them (lowercase, digits as 0), and only real words
    assert len({re.sub(r"\d", "0", p.lower()) for p in paragraphs}) == len(paragraphs)
    known = set(words)
    assert all(w in known for p in paragraphs[:5000] for w in p.split(" "))
    assert text.count("\n\n") > len(paragraphs) / 20  # documents of several lines


def test_scale_bench_runs_every_stage_and_measures_it(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep.scale_bench", "sizes_gb=[0.002]", "workers=[2]", "manpages=",
         f"work_dir={tmp_path}", f"output={out}",
         'prep=["vocab.size=500","vocab.sample_lines=5000","pack.seq_len=64","shard.target_mb=0.2",'
         '"pack.chunk_mb=0.3","clean.index_every_mb=0.05"]'],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert [r["stage"] for r in result["rows"]] == ["clean-no-lid", *STAGES]
    for row in result["rows"]:
        assert row["corpus"] == "gen-0.002GB" and row["workers"] == 2
        assert row["seconds"] > 0 and row["peak_rss_mb"] > 10 and row["processes"] >= 1
    encode = next(r for r in result["rows"] if r["stage"] == "encode")
    assert encode["processes"] >= 3  # the prep and its two encode workers (several chunks)
    [summary] = result["summary"]
    assert summary["clean_dedup_mb_per_s_per_process"] > 0 and summary["encode_mb_per_s_per_process"] > 0
    assert summary["clean_mb_per_s_per_process"] > 0 and summary["clean_no_lid_mb_per_s_per_process"] > 0
    assert not (tmp_path / "runs" / "gen-0.002GB-w2").exists()  # outputs removed, corpus kept
    assert not (tmp_path / "runs" / "gen-0.002GB-w2-no-lid").exists()
    assert Path(tmp_path / "corpora" / "gen-0.002GB" / "en.txt").stat().st_size >= 2_000_000
