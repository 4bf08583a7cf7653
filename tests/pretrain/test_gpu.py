"""The default GPU path on a CUDA machine (skipped elsewhere, see conftest.py): bf16 training
with ZeRO-1 on one rank over NCCL, the export of that GPU-trained checkpoint (its logits in
Hugging Face equal those of its fp32 master weights as DeepSpeed's engine loads them),
`xlmr-eval` on the GPU (the numbers of the CPU), and a training micro-batch whose copy,
forward and metric sums never synchronize with the host (torch.cuda.set_sync_debug_mode).

Every test here runs torch in subprocesses started with `gpu_env`: this process hides CUDA."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForMaskedLM

from tests.pretrain.test_export import export, fixed_batch, reference_logits
from tests.pretrain.test_train import REPO, pretrain_run, records

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_run(prepared_data, tmp_path_factory, gpu_env):
    """A 3-step bf16 ZeRO-1 run on one GPU (precision=auto), and its stdout."""
    run = tmp_path_factory.mktemp("gpu") / "run"
    proc = pretrain_run(prepared_data, run, "deepspeed=zero1", "deepspeed.precision=auto", "trainer.max_steps=3",
                        env={"DS_ACCELERATOR": "cuda"}, base_env=gpu_env)
    return run, proc.stdout


def test_bf16_zero1_trains_on_one_gpu_over_nccl(gpu_run):
    run, stdout = gpu_run
    assert "1 rank(s) (cuda, nccl), ZeRO 1, bf16" in stdout  # auto picks bf16 on a bf16 GPU; one NCCL rank
    assert "MFU" in stdout  # the GPU-only metrics are logged
    losses = records(run)
    assert sorted(losses) == [1, 2, 3] and all(5 < v < 10 for v in losses.values()), losses


def test_gpu_trained_checkpoint_exports(gpu_run, tmp_path, gpu_env):
    run, _ = gpu_run
    out = tmp_path / "hf"
    export(run, out)
    # The reference loads the tag into a DeepSpeed engine on the GPU, over NCCL (one rank).
    expected = reference_logits(run / "checkpoints" / "step_00000003", tmp_path,
                                env={**gpu_env, "DS_ACCELERATOR": "cuda", "PYTHONPATH": str(REPO)})
    hf = AutoModelForMaskedLM.from_pretrained(out, local_files_only=True).eval()
    ids, mask = fixed_batch(hf.config.vocab_size)
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits[mask.bool()], expected[mask.bool()], atol=1e-3, rtol=1e-3)


def test_xlmr_eval_runs_on_the_gpu_with_the_cpus_numbers(gpu_run, tmp_path, gpu_env):
    run, _ = gpu_run
    results = {}
    for device in ("auto", "cpu"):
        out = tmp_path / f"{device}.json"
        proc = subprocess.run([sys.executable, "-m", "pretrain.evaluation.cli", str(run), "--out", str(out),
                               "--device", device, "--max-sequences", "8", "--no-fill-mask"],
                              capture_output=True, text=True, cwd=REPO, env={**gpu_env, "PYTHONPATH": str(REPO)},
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[device] = json.loads(out.read_text())
    assert results["auto"]["device"].startswith("cuda") and results["cpu"]["device"] == "cpu"
    assert results["auto"]["all"]["masked_tokens"] == results["cpu"]["all"]["masked_tokens"] > 0
    assert results["auto"]["all"]["loss"] == pytest.approx(results["cpu"]["all"]["loss"], rel=1e-4)
    gpu_probes, cpu_probes = results["auto"]["probes"], results["cpu"]["probes"]
    assert json.dumps(sorted(gpu_probes)) == json.dumps(sorted(cpu_probes))


NO_SYNC_DRIVER = """
import torch
from pretrain.masking import MaskingConfig, TrainMasking
from pretrain.model import XLMR, ModelConfig
from pretrain.train import _Interval, _micro_batch_sums, _to_device

device = torch.device("cuda")
V, B, T = 2002, 8, 64
model = XLMR(ModelConfig(vocab_size=V, hidden_size=64, num_layers=2, num_heads=2, ffn_size=256)).to(device).train()
masking = TrainMasking(MaskingConfig(), seed=0, rank=0, vocab_size=V, micro_batches_per_step=1, max_steps=10)
g = torch.Generator().manual_seed(0)
for padded in (False, True):
    tokens = torch.randint(4, V - 1, (B, T), generator=g)
    if padded:
        tokens[1, 40:] = 1
    batch = masking({"input_ids": tokens, "lang": torch.arange(B) % 3}, 0, 0.15)
    batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}  # as the loader pins
    interval = _Interval(3, device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
    micro = _to_device(batch, device)
    out = model(micro["input_ids"], micro["labels"], positions=micro["positions"], padded=micro["padded"])
    interval.add(_micro_batch_sums(out, micro, 3), 1e-3, True, torch.ones((), device=device))
    torch.cuda.set_sync_debug_mode("default")
    # The backward is torch's own kernels (the embedding's may count on the host): not checked.
    out.loss_sum.backward()
    print("no sync", padded, interval.flush())
"""


def test_a_training_micro_batch_never_synchronizes(tmp_path, gpu_env):
    driver = tmp_path / "no_sync.py"
    driver.write_text(NO_SYNC_DRIVER)
    proc = subprocess.run([sys.executable, str(driver)], capture_output=True, text=True, cwd=REPO,
                          env={**gpu_env, "PYTHONPATH": str(REPO)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("no sync") == 2
