"""The default GPU path on a CUDA machine (skipped elsewhere, see conftest.py): bf16 training
with ZeRO-1 on one rank over NCCL, and the export of that GPU-trained checkpoint, whose logits
in Hugging Face equal those of its fp32 master weights as DeepSpeed's engine loads them."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForMaskedLM

from tests.pretrain.test_export import export, fixed_batch, reference_logits
from tests.pretrain.test_train import REPO, pretrain_run, records

pytestmark = pytest.mark.gpu


def test_bf16_zero1_trains_on_one_gpu_and_exports(prepared_data, tmp_path, gpu_env):
    run = tmp_path / "run"
    proc = pretrain_run(prepared_data, run, "deepspeed=zero1", "deepspeed.precision=auto", "trainer.max_steps=3",
                        env={"DS_ACCELERATOR": "cuda"}, base_env=gpu_env)
    assert "ZeRO 1, bf16" in proc.stdout  # auto picks bf16 on a bf16 GPU
    assert "MFU" in proc.stdout  # the GPU-only metrics are logged
    losses = records(run)
    assert sorted(losses) == [1, 2, 3] and all(5 < v < 10 for v in losses.values()), losses

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
