"""The config tree: YAML mirrors the typed schema, typos fail with Hydra's message, and the
pieces built from it (DeepSpeed JSON, AdamW groups, LR schedule) say what the issue asks."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pretrain.config import DeepSpeedConfig, OptimConfig, PretrainConfig, PretrainError, register_configs

REPO = Path(__file__).resolve().parents[2]
CONF = str(REPO / "conf")


def _compose(*overrides: str) -> PretrainConfig:
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return OmegaConf.to_object(compose("pretrain", overrides=list(overrides)))


def test_yaml_tree_matches_schema_and_presets():
    cfg = _compose()
    assert isinstance(cfg, PretrainConfig)
    assert (cfg.data_dir, cfg.run_dir, cfg.resume) == ("data/sample", "runs/sample", "auto")
    sizes = {name: _compose(f"model={name}").model for name in ("tiny", "base", "large")}
    assert [(m.num_layers, m.hidden_size, m.num_heads, m.ffn_size) for m in sizes.values()] == [
        (2, 64, 2, 256), (12, 768, 12, 3072), (24, 1024, 16, 4096)]
    assert all(m.vocab_size == 0 for m in sizes.values())  # from the manifest
    for stage in range(4):
        assert _compose(f"deepspeed=zero{stage}").deepspeed.zero_stage == stage
    assert _compose("trainer.max_steps=7").trainer.max_steps == 7


def _cli(*args: str, config_dir: Path | None = None) -> subprocess.CompletedProcess:
    extra = ["--config-dir", str(config_dir)] if config_dir else []
    return subprocess.run([sys.executable, "-m", "pretrain.cli", *extra, *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "HYDRA_FULL_ERROR": "0"}, timeout=300)


def test_typo_on_command_line_fails_with_hydras_message(tmp_path):
    proc = _cli("trainer.max_step=5", f"run_dir={tmp_path}/run")
    assert proc.returncode != 0
    assert "Could not override 'trainer.max_step'" in proc.stderr and "Key 'max_step' not in" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # failed before doing anything


def test_typo_in_a_yaml_file_fails_with_hydras_message(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("hidden_size: 64\nnum_layer: 2\n")
    proc = _cli("model=mine", config_dir=tmp_path)
    assert proc.returncode != 0
    assert "num_layer" in proc.stderr and "Traceback" not in proc.stderr


def test_deepspeed_json_from_config():
    from pretrain.distributed import deepspeed_config

    ds = deepspeed_config(DeepSpeedConfig(zero_stage=2, precision="bf16", micro_batch_size=4,
                                          gradient_accumulation_steps=3, gradient_clipping=0.5,
                                          extra={"zero_optimization": {"overlap_comm": True}}), world_size=2)
    assert ds["train_batch_size"] == 24 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True} and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    fp32 = deepspeed_config(DeepSpeedConfig(zero_stage=0, precision="fp32"), world_size=1)
    assert fp32["bf16"] == {"enabled": False} and "data_types" not in fp32
    assert fp32["gradient_clipping"] == 0.0  # stage 0: optim.AdamW clips and reports the norm
    with pytest.raises(PretrainError, match="zero_stage >= 1"):
        deepspeed_config(DeepSpeedConfig(zero_stage=0, precision="bf16"), world_size=1)


def test_adamw_groups_and_guard():
    from pretrain.model import XLMR, ModelConfig
    from pretrain.optim import build_optimizer

    model = XLMR(ModelConfig(vocab_size=50, hidden_size=8, num_layers=1, num_heads=2, ffn_size=16))
    opt = build_optimizer(model, OptimConfig(), max_grad_norm=1.0)
    decay, no_decay = opt.param_groups
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("bias") or ".ln" in names[id(p)] or "_ln" in names[id(p)]
               for p in no_decay["params"])
    assert any(names[id(p)] == "tok_emb.weight" for p in decay["params"])
    # A NaN gradient: no update, weights untouched, overflow reported.
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    opt.step()
    assert opt.overflow and all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    # Clipping to max_grad_norm, with the pre-clip norm reported.
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    opt.step()
    n = sum(p.numel() for p in model.parameters())
    assert not opt.overflow and opt._global_grad_norm == pytest.approx(3.0 * n ** 0.5, rel=1e-5)


def test_lr_schedule_warmup_then_decay():
    from pretrain.optim import lr_factor

    cfg = OptimConfig(lr=1.0, warmup_steps=10)
    f = [lr_factor(s, cfg, 110) for s in range(111)]
    assert f[0] == pytest.approx(1 / 11) and f[9] == pytest.approx(10 / 11)
    assert all(a < b for a, b in zip(f[:10], f[1:11]))  # rising over the warmup
    assert f[10] == 1.0 and f[60] == pytest.approx(0.5) and f[110] == 0.0  # then linear to 0
    poly = OptimConfig(lr=1.0, warmup_steps=10, schedule="polynomial", power=2.0, end_lr=0.1)
    assert lr_factor(60, poly, 110) == pytest.approx(0.1 + 0.9 * 0.25)
    assert lr_factor(110, poly, 110) == pytest.approx(0.1)
    assert lr_factor(0, OptimConfig(), 100) == pytest.approx(1 / 7)  # default warmup: 6% of max_steps


def test_mfu_flops_formula():
    from pretrain.metrics import flops_per_token
    from pretrain.model import ModelConfig

    base = ModelConfig(vocab_size=250_002)  # XLM-R base
    d, L, s = 768, 12, 512
    expected = 6 * 12 * L * d * d + 12 * L * s * d + 6 * (d * d + d * 250_002) * 0.15  # f = 4d: 12 d^2 per layer
    assert flops_per_token(base, s, 0.15) == pytest.approx(expected)
