"""`xlmr-bench` on the CPU: the tiny model end to end through the real CLI, its numbers checked
against the trainer's own metrics.jsonl and against each other, and bad settings refused in one
line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pretrain.test_train import records

REPO = Path(__file__).resolve().parents[2]
KEYS = ("tokens_per_s", "samples_per_s", "mfu", "peak_gb", "data_wait_ms", "timed_tokens", "timed_seconds",
        "loader_samples_per_s", "loader_headroom", "hf_tokens_per_s", "hf_peak_gb", "ours_vs_hf", "run_dir")


def bench_run(data_dir: Path, work_dir: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    """The real `xlmr-bench` (pretrain.evaluation.bench:main) in a subprocess, on the CPU."""
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.evaluation.bench", f"data_dir={data_dir}", f"work_dir={work_dir}", *overrides],
        capture_output=True, text=True, timeout=600, cwd=REPO,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu", "HYDRA_FULL_ERROR": "0",
             "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"xlmr-bench failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def test_tiny_model_end_to_end_agrees_with_the_trainers_metrics(prepared_data, tmp_path):
    out = tmp_path / "result.json"
    proc = bench_run(prepared_data, tmp_path / "work", "steps=4", "warmup_steps=2", "micro_batch_size.tiny=4",
                     "loader_batches=10", f"out={out}")
    result = json.loads(out.read_text())
    manifest = json.loads((prepared_data / "manifest.json").read_text())
    assert result["device"].startswith("CPU") and result["precision"] == "fp32"
    assert (result["seq_len"], result["vocab_size"]) == (manifest["seq_len"], manifest["vocab"]["size"])
    (row,) = result["rows"]  # on a CPU: the tiny model only
    assert (row["model"], row["micro_batch_size"], row["out_of_memory"]) == ("tiny", 4, [])
    assert set(KEYS) <= set(row)
    assert row["mfu"] is None and row["peak_gb"] is None and row["hf_peak_gb"] is None  # GPU numbers
    for key in ("tokens_per_s", "samples_per_s", "loader_samples_per_s", "hf_tokens_per_s"):
        assert row[key] > 0, key

    # The run it trained: records every gcd(2, 4) = 2 steps, so the warmup (steps 1-2, with the
    # loader's start-up) has a record of its own and steps 3-6 are timed; no checkpoint kept.
    run = Path(row["run_dir"])
    tokens_per_s, tokens_seen = records(run, "tokens_per_s"), records(run, "tokens_seen")
    assert sorted(tokens_per_s) == [2, 4, 6]
    assert not (run / "checkpoints").exists()
    assert row["timed_tokens"] == tokens_seen[6] - tokens_seen[2]
    # Tokens over the time of two intervals lies between the two intervals' rates; the warmup's
    # record, far slower, would pull it out of that range.
    assert min(tokens_per_s[4], tokens_per_s[6]) * 0.999 <= row["tokens_per_s"] <= max(tokens_per_s[4], tokens_per_s[6]) * 1.001
    assert row["tokens_per_s"] == pytest.approx(row["timed_tokens"] / row["timed_seconds"], rel=1e-9)
    # Every step consumes one micro batch: 4 timed steps x 4 sequences.
    assert row["samples_per_s"] * row["timed_seconds"] == pytest.approx(16, rel=1e-6)
    assert row["loader_headroom"] == pytest.approx(row["loader_samples_per_s"] / row["samples_per_s"], rel=1e-9)
    assert row["ours_vs_hf"] == pytest.approx(row["tokens_per_s"] / row["hf_tokens_per_s"], rel=1e-9)

    # The printed table shows the same numbers.
    assert "| model | micro batch | tokens/s |" in proc.stdout
    cells = next(line for line in proc.stdout.splitlines() if line.startswith("| tiny |")).strip("| ").split(" | ")
    assert cells[1:4] == ["4", f"{row['tokens_per_s']:,.0f}", f"{row['samples_per_s']:,.1f}"]
    assert cells[4:6] == ["n/a", "n/a"] and cells[-1] == f"{row['ours_vs_hf']:.2f}x"


def test_bad_settings_fail_with_one_line(prepared_data, tmp_path):
    def error(*overrides: str) -> str:
        proc = bench_run(prepared_data, tmp_path, *overrides, check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        lines = [line for line in proc.stderr.splitlines() if line.startswith("xlmr-bench: error: ")]
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        return lines[0]

    line = error("steps=0", "models=[tiny,huge]", "precision=bf16")
    assert "steps=0" in line and "unknown model 'huge'" in line and "precision=bf16 needs a GPU" in line
    assert "micro_batch_size.tiny=0" in error("micro_batch_size.tiny=0")
    assert "Key 'max_step' not in 'TrainerConfig'" in error("pretrain_overrides=['trainer.max_step=3']")
    assert "does not exist" in error(f"data_dir={tmp_path / 'missing'}")
