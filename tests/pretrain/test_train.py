"""End-to-end runs of `xlmr-pretrain` in one process on the real prepared sample: training
lowers the loss, metrics and plots, NaN handling, refusing other data, bad-input messages.

The helpers here (`pretrain_run`, `records`) are shared with test_train_distributed.py.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

# Small and quick, every real code path: tiny model, few steps, one loader worker.
FAST = [
    "model=tiny", "deepspeed.micro_batch_size=4", "trainer.max_steps=4", "trainer.log_every=1",
    "trainer.save_every=100", "trainer.eval_at_end=false", "data.num_workers=1", "wandb.mode=disabled",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain_run(data_dir: Path, run_dir: Path, *overrides: str, nproc: int = 1, script: Path | None = None,
                 check: bool = True, env: dict | None = None, timeout: int = 600,
                 base_env: dict | None = None) -> subprocess.CompletedProcess:
    """Run xlmr-pretrain (or a driver `script` that patches it) in `nproc` real processes:
    plain python for one, torchrun with gloo for more. On the CPU (CUDA hidden, conftest.py)
    unless `base_env` (a `gpu` test's gpu_env) shows the GPUs."""
    target = [str(script)] if script else ["-m", "pretrain.cli"]
    if nproc == 1:
        cmd = [sys.executable, *target]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), *target]
    cmd += [f"data_dir={data_dir}", f"run_dir={run_dir}", *FAST, *overrides]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
        env={**(os.environ if base_env is None else base_env), "DS_ACCELERATOR": "cpu", "HYDRA_FULL_ERROR": "0",
             "OMP_NUM_THREADS": "1",
             "PYTHONPATH": str(REPO), "WANDB_SILENT": "true", **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"xlmr-pretrain failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def records(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """step -> value of `key` from RUN_DIR/metrics.jsonl."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if key in r:
            out[r["step"]] = r[key]
    return out


def error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("xlmr-pretrain: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def test_demo_trains_loss_falls_metrics_and_plots(prepared_data, tmp_path):
    run = tmp_path / "run"
    pretrain_run(prepared_data, run, "trainer.max_steps=30", "trainer.log_every=5", "deepspeed.micro_batch_size=8",
                 "trainer.eval_at_end=true", "data.valid_max_sequences_per_lang=8")
    loss = records(run)
    assert sorted(loss) == [5, 10, 15, 20, 25, 30]
    assert loss[30] < loss[5] - 0.3, loss  # ln(2002) = 7.6 at init; a tiny model learns unigram stats fast
    full = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rec = full[-2]
    for key in ("accuracy", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "data_wait_s", "tokens_seen"):
        assert train_rec[key] is not None and train_rec[key] >= 0, key
    assert any(k.startswith("lang_loss/") for k in train_rec)
    assert "mfu" not in train_rec  # CPU: only what applies
    assert "valid/loss" in full[-1] and any(k.startswith("valid_lang_loss/") for k in full[-1])

    plots = subprocess.run([sys.executable, "-c", "from pretrain.cli import plot_main; plot_main()", str(run)],
                           capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert plots.returncode == 0, plots.stderr
    for name in ("loss.png", "lang_loss.png", "lr.png", "throughput.png"):
        png = run / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


# A driver that turns the training loss of chosen forward calls into NaN (as a bf16
# overflow would), then runs the real CLI.
NAN_DRIVER = """
import os
import pretrain.model as M
nan_calls = {int(c) for c in os.environ["NAN_CALLS"].split(",")}
original, calls = M.XLMR.forward, [0]
def forward(self, *args, **kwargs):
    out = original(self, *args, **kwargs)
    if self.training:
        calls[0] += 1
        if calls[0] - 1 in nan_calls:
            out = out._replace(loss_sum=out.loss_sum * float("nan"))
    return out
M.XLMR.forward = forward
from pretrain.cli import main
main()
"""


def test_nan_loss_step_is_skipped_and_too_many_stop_the_run(prepared_data, tmp_path):
    driver = tmp_path / "nan_driver.py"
    driver.write_text(NAN_DRIVER)
    # One NaN step (the 3rd; stage 0, where our AdamW must guard): skipped, training goes on.
    run = tmp_path / "one"
    pretrain_run(prepared_data, run, "trainer.max_steps=5", "deepspeed=zero0", "trainer.save_every=1",
                 "trainer.keep_last=10", script=driver, env={"NAN_CALLS": "2"})
    loss = records(run)
    assert loss[3] is None and all(loss[s] is not None and loss[s] < 10 for s in (1, 2, 4, 5)), loss
    assert records(run, "skipped_steps")[5] == 1
    # The skipped step left every weight as it was after step 2; step 4 changed them again.
    weights = {s: torch.load(run / f"checkpoints/step_{s:08d}/mp_rank_00_model_states.pt", weights_only=False)["module"]
               for s in (2, 3, 4)}
    assert all(torch.equal(weights[2][k], weights[3][k]) for k in weights[2])
    assert all(torch.isfinite(v).all() for v in weights[4].values())
    assert not all(torch.equal(weights[3][k], weights[4][k]) for k in weights[3])
    # Three in a row with max_nonfinite_steps=3: a clear one-line error, exit code 2.
    proc = pretrain_run(prepared_data, tmp_path / "many", "trainer.max_steps=6", "trainer.max_nonfinite_steps=3",
                        script=driver, env={"NAN_CALLS": "1,2,3"}, check=False)
    assert proc.returncode == 2
    assert "NaN/inf for 3 steps in a row" in error_line(proc)


def _copy_data(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    manifest = json.loads((dst / "manifest.json").read_text())
    edit(manifest)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_resume_refuses_other_vocabulary_or_manifest(prepared_data, tmp_path):
    run = tmp_path / "run"
    pretrain_run(prepared_data, run, "trainer.max_steps=2")

    def other_vocab(m):
        m["vocab"]["sha256"] = "0" * 64

    proc = pretrain_run(_copy_data(prepared_data, tmp_path / "vocab", other_vocab), run, "trainer.max_steps=4", check=False)
    assert proc.returncode == 2
    assert "vocabulary" in error_line(proc) and "step_00000002" in error_line(proc)

    def other_manifest(m):
        m["languages"]["en"]["train"]["sequences"] += 1

    proc = pretrain_run(_copy_data(prepared_data, tmp_path / "manifest", other_manifest), run, "trainer.max_steps=4",
                        check=False)
    assert proc.returncode == 2 and "manifest" in error_line(proc)
    # The same data (re-read) still resumes.
    proc = pretrain_run(prepared_data, run, "trainer.max_steps=3")
    assert "resuming from step 2" in proc.stdout


def test_bad_inputs_fail_with_one_line(prepared_data, tmp_path):
    proc = pretrain_run(tmp_path / "missing", tmp_path / "r1", check=False)
    assert proc.returncode == 2 and "does not exist" in error_line(proc)
    (tmp_path / "empty").mkdir()
    proc = pretrain_run(tmp_path / "empty", tmp_path / "r2", check=False)
    assert proc.returncode == 2 and "is empty" in error_line(proc)
    proc = pretrain_run(prepared_data, tmp_path / "r3", "model.vocab_size=1234", check=False)
    assert proc.returncode == 2 and "vocab_size=1234" in error_line(proc)
    proc = pretrain_run(prepared_data, tmp_path / "r4", "deepspeed=zero0", "deepspeed.precision=bf16", check=False)
    assert proc.returncode == 2 and "zero_stage" in error_line(proc)
    # deepspeed.extra must not undo what precision and zero_stage decide (checkpoints record those)
    for n, (extra, message) in enumerate([
        ("+deepspeed.extra.fp16.enabled=true", "fp16: not supported"),
        ("+deepspeed.extra.zero_optimization.stage=2", "set deepspeed.zero_stage instead"),
        ("+deepspeed.extra.bf16.enabled=true", "set deepspeed.precision instead"),
    ]):
        proc = pretrain_run(prepared_data, tmp_path / f"r5-{n}", "deepspeed=zero1", "deepspeed.precision=fp32", extra,
                            check=False)
        assert proc.returncode == 2 and message in error_line(proc), proc.stderr[-2000:]
    proc = pretrain_run(prepared_data, tmp_path / "r6", "deepspeed=zero1", "deepspeed.precision=bf16",
                        "+deepspeed.extra.data_types.grad_accum_dtype=bf16", check=False)
    assert proc.returncode == 2 and "grad_accum_dtype='bf16'" in error_line(proc)


def _tiny_hf_model(out: Path, spm_model: Path, vocab_size: int) -> dict:
    """A random tiny XLMRobertaForMaskedLM saved by HF itself, with our vocabulary; its state dict."""
    import transformers

    torch.manual_seed(123)
    config = transformers.XLMRobertaConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=130, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        layer_norm_eps=1e-5)
    model = transformers.XLMRobertaForMaskedLM(config)
    model.save_pretrained(out)
    shutil.copyfile(spm_model, out / "sentencepiece.bpe.model")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_continued_pretraining_starts_from_an_hf_model(prepared_data, tmp_path):
    manifest = json.loads((prepared_data / "manifest.json").read_text())
    hf_dir = tmp_path / "hf"
    hf_state = _tiny_hf_model(hf_dir, prepared_data / manifest["vocab"]["spm_model"], manifest["vocab"]["size"])

    # lr=0: one step leaves the weights as loaded; ZeRO 0 saves them whole in the model-states file.
    run = tmp_path / "run"
    out = pretrain_run(prepared_data, run, f"init_from={hf_dir}", "optim.lr=0", "trainer.max_steps=1",
                       "deepspeed=zero0", "deepspeed.precision=fp32").stdout
    assert f"initialized from Hugging Face model {hf_dir}" in out and "(2 layers x 32," in out
    saved = torch.load(run / "checkpoints" / "step_00000001" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    from pretrain.interop.hf_convert import from_hf_state_dict
    expected = from_hf_state_dict(hf_state)
    assert sorted(saved) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(saved[key], value), key
    # Resuming that run takes its checkpoint, not the HF weights again.
    out = pretrain_run(prepared_data, run, f"init_from={hf_dir}", "trainer.max_steps=2", "deepspeed=zero0",
                       "deepspeed.precision=fp32").stdout
    assert "resuming from step 1" in out and "initialized from" not in out

    # Data encoded with another vocabulary is refused: the model's ids would mean other pieces.
    def other_vocab(m):
        m["vocab"]["sha256"] = "0" * 64

    other = _copy_data(prepared_data, tmp_path / "other_data", other_vocab)
    proc = pretrain_run(other, tmp_path / "other", f"init_from={hf_dir}", check=False)
    assert proc.returncode == 2 and "vocab.model=" in error_line(proc)


def test_whole_word_masking_trains_and_evaluates_alike(prepared_data, tmp_path):
    """masking.whole_word=true: the trainer and xlmr-eval both build the word-start table from
    the vocabulary, and agree on the validation loss of the final checkpoint."""
    run = tmp_path / "run"
    pretrain_run(prepared_data, run, "masking.whole_word=true", "trainer.max_steps=2", "trainer.eval_at_end=true",
                 "data.valid_max_sequences_per_lang=4", "deepspeed.precision=fp32")
    assert sorted(records(run)) == [1, 2]
    valid = records(run, "valid/loss")[2]
    proc = subprocess.run([sys.executable, "-m", "pretrain.evaluation.cli", str(run), "--no-fill-mask", "--no-probes"], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run / "eval" / "step_00000002.json").read_text())
    assert report["settings"]["masking"]["whole_word"] is True
    assert abs(report["all"]["loss"] - valid) <= 1e-5 * valid
