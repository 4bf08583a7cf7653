"""Typed configuration of `xlmr-pretrain`, mirrored by conf/pretrain.yaml and its groups
(conf/model/*.yaml, conf/deepspeed/*.yaml).

`PretrainConfig` is registered in Hydra's ConfigStore as the schema of the YAML tree, so a
misspelled key, on the command line or in a YAML file, fails at load time with Hydra's message
("Key 'max_step' is not in struct") instead of deep inside the trainer. Model, masking and data
settings are the dataclasses of the modules that own them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

from pretrain.data import DataConfig
from pretrain.masking import MaskingConfig
from pretrain.model import ModelConfig
from pretrain.schedules import MASK_SCHEDULES, SHAPES


class PretrainError(Exception):
    """Bad input, config or state a user can fix; the CLI prints it as one line and exits 2."""


@dataclass
class DeepSpeedConfig:
    """What goes into the DeepSpeed JSON (distributed.deepspeed_config builds it)."""

    zero_stage: int = 1  # 0: plain data parallel; 1: shard optimizer state; 2: + gradients; 3: + weights
    precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp32) | bf16 | fp32
    micro_batch_size: int = 8  # sequences per rank per forward/backward
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    gradient_clipping: float = 1.0  # max global grad norm; 0 turns clipping off
    # Merged last into the generated JSON, for DeepSpeed options without a key of their own,
    # e.g. +deepspeed.extra.zero_optimization.overlap_comm=true
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """AdamW with the RoBERTa/XLM-R defaults; linear warmup, then one of the schedules of optim.lr_factor."""

    lr: float = 6e-4  # peak learning rate, reached at the end of warmup
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.01  # not applied to biases and LayerNorm weights
    warmup_steps: Optional[int] = None  # None: 6% of trainer.max_steps
    schedule: str = "linear"  # linear | polynomial (fairseq's polynomial_decay with `power`) | inverse_sqrt | wsd
    power: float = 1.0  # exponent of the polynomial decay (1.0 is linear)
    end_lr: float = 0.0  # learning rate reached at trainer.max_steps (wsd: at the decay's end)
    # wsd (warmup-stable-decay): the decay's first step (None: decay_steps before max_steps),
    # its length (None: to max_steps from decay_start, or 10% of max_steps) and shape.
    decay_start: Optional[int] = None
    decay_steps: Optional[int] = None
    decay_shape: str = "linear"  # linear | cosine | sqrt (1 - sqrt(progress))


@dataclass
class TrainerConfig:
    max_steps: int = 300  # optimizer steps; the learning-rate schedule ends here
    stop_at_step: Optional[int] = None  # stop early (with a checkpoint), schedule unchanged: time-sliced jobs
    seed: int = 0  # weight init, masking and dropout
    log_every: int = 10  # steps per metrics record; keep save_every a multiple of it
    save_every: int = 100  # steps between checkpoints (one is also written at the end)
    keep_last: int = 2  # checkpoints kept on disk, the newest ones
    eval_every: int = 0  # steps between per-language validation passes; 0: only at the end
    eval_at_end: bool = True
    probe_every: int = 0  # steps between cross-lingual probes (also at max_steps); 0: never
    max_nonfinite_steps: int = 5  # stop after this many NaN/inf losses in a row (each is skipped)
    peak_flops: float = 989e12  # per device, for MFU (H100 SXM, dense bf16); ignored on CPU
    compile: bool = False  # torch.compile the model (DeepSpeed's engine.compile()): faster steps after a warm-up
    # A requeued SLURM job waits this long for its earlier instance to release the run dir's
    # lock (runlock.py); any other second trainer on the run dir is refused at once.
    lock_wait_s: float = 300.0


@dataclass
class ProbeConfig:
    """The cross-lingual probes (pretrain/evaluation/probes.py), run every trainer.probe_every steps."""

    retrieval_dir: Optional[str] = None  # LANG.tsv files of (English, translation) pairs; None: the bundled set
    transfer_dir: Optional[str] = None  # train.tsv + test.tsv of (text, label, language); None: the bundled set
    layer: Optional[int] = None  # hidden states after this many blocks (0: the embeddings); None: num_layers // 2
    max_tokens: int = 128  # a sentence's tokens beyond this are cut (<s> and </s> included)
    batch_size: int = 64  # sentences per forward


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline (no network; `wandb sync RUN_DIR/wandb/offline-run-*`) | online | disabled
    project: str = "xlmr-pretrain"
    entity: Optional[str] = None
    name: Optional[str] = None  # default: the run dir's name
    tags: List[str] = field(default_factory=list)


@dataclass
class PretrainConfig:
    data_dir: str = "data/sample"  # what `xlmr-prep` wrote (its default output_dir)
    run_dir: str = "runs/sample"  # checkpoints, metrics.jsonl, wandb/, hydra/; fixed, so a requeued job resumes
    resume: str = "auto"  # auto: the newest complete checkpoint in run_dir, if any | never | PATH
    # An HF-format XLM-R dir (xlmr-export's or save_pretrained's) to start from: continued
    # pretraining. Its architecture replaces model.* (not dropout); data_dir must use its vocabulary.
    init_from: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def register_configs() -> None:
    ConfigStore.instance().store(name="pretrain_schema", node=PretrainConfig)


def _rules(cfg: PretrainConfig) -> list[tuple[str, Any, bool, str]]:
    """(key, value, ok, what it must be) for every setting with a range: checked at start,
    before anything is read or written, so a typo in a value fails in a second, not hours in."""
    m, ms, d, ds, opt, tr, pr = cfg.model, cfg.masking, cfg.data, cfg.deepspeed, cfg.optim, cfg.trainer, cfg.probe
    probability = "in [0, 1]"
    return [
        ("model.vocab_size", m.vocab_size, m.vocab_size >= 0, ">= 0 (0: from the data)"),
        ("model.hidden_size", m.hidden_size, m.hidden_size >= 1, ">= 1"),
        ("model.num_layers", m.num_layers, m.num_layers >= 1, ">= 1"),
        ("model.num_heads", m.num_heads, m.num_heads >= 1 and m.hidden_size % m.num_heads == 0,
         f">= 1 and divide model.hidden_size={m.hidden_size}"),
        ("model.ffn_size", m.ffn_size, m.ffn_size >= 1, ">= 1"),
        ("model.max_positions", m.max_positions, m.max_positions >= m.pad_id + 2, ">= model.pad_id + 2"),
        ("model.dropout", m.dropout, 0 <= m.dropout < 1, "in [0, 1)"),
        ("model.attention_dropout", m.attention_dropout, 0 <= m.attention_dropout < 1, "in [0, 1)"),
        ("model.layer_norm_eps", m.layer_norm_eps, m.layer_norm_eps > 0, "> 0"),
        ("model.init_std", m.init_std, m.init_std > 0, "> 0"),
        ("model.pad_id", m.pad_id, m.pad_id >= 0, ">= 0"),
        ("masking.mask_prob", ms.mask_prob, 0 <= ms.mask_prob <= 1, probability),
        ("masking.end_mask_prob", ms.end_mask_prob, 0 <= ms.end_mask_prob <= 1, probability),
        ("masking.mask_token_prob", ms.mask_token_prob, 0 <= ms.mask_token_prob <= 1, probability),
        ("masking.random_token_prob", ms.random_token_prob,
         0 <= ms.random_token_prob <= 1 and ms.mask_token_prob + ms.random_token_prob <= 1,
         "in [0, 1] and at most 1 - masking.mask_token_prob"),
        ("masking.schedule", ms.schedule, ms.schedule in MASK_SCHEDULES, f"one of {', '.join(MASK_SCHEDULES)}"),
        ("masking.schedule_start", ms.schedule_start, ms.schedule_start >= 0, ">= 0"),
        ("masking.schedule_end", ms.schedule_end, ms.schedule_end is None or ms.schedule_end >= ms.schedule_start,
         ">= masking.schedule_start (or null)"),
        ("data.alpha", d.alpha, d.alpha >= 0, ">= 0"),
        ("data.seed", d.seed, d.seed >= 0, ">= 0"),
        ("data.num_workers", d.num_workers, d.num_workers >= 0, ">= 0"),
        ("data.prefetch_factor", d.prefetch_factor, d.prefetch_factor >= 1, ">= 1"),
        ("data.shuffle_block", d.shuffle_block, d.shuffle_block >= 1, ">= 1"),
        ("data.valid_max_sequences_per_lang", d.valid_max_sequences_per_lang,
         d.valid_max_sequences_per_lang is None or d.valid_max_sequences_per_lang >= 0, ">= 0 (or null)"),
        ("data.on_damaged_shard", d.on_damaged_shard, d.on_damaged_shard in ("fail", "skip"), "fail or skip"),
        ("deepspeed.zero_stage", ds.zero_stage, ds.zero_stage in (0, 1, 2, 3), "0, 1, 2 or 3"),
        ("deepspeed.precision", ds.precision, ds.precision in ("auto", "bf16", "fp32"), "auto, bf16 or fp32"),
        ("deepspeed.micro_batch_size", ds.micro_batch_size, ds.micro_batch_size >= 1, ">= 1"),
        ("deepspeed.gradient_accumulation_steps", ds.gradient_accumulation_steps, ds.gradient_accumulation_steps >= 1,
         ">= 1"),
        ("deepspeed.gradient_clipping", ds.gradient_clipping, ds.gradient_clipping >= 0, ">= 0 (0: off)"),
        ("optim.lr", opt.lr, 0 <= opt.lr < math.inf, ">= 0 (0: the weights stay as they are)"),
        ("optim.betas", list(opt.betas), len(opt.betas) == 2 and all(0 <= b < 1 for b in opt.betas),
         "two numbers in [0, 1)"),
        ("optim.eps", opt.eps, opt.eps > 0, "> 0"),
        ("optim.weight_decay", opt.weight_decay, opt.weight_decay >= 0, ">= 0"),
        ("optim.warmup_steps", opt.warmup_steps, opt.warmup_steps is None or opt.warmup_steps >= 0, ">= 0 (or null)"),
        ("optim.schedule", opt.schedule, opt.schedule in ("linear", "polynomial", "inverse_sqrt", "wsd"),
         "linear, polynomial, inverse_sqrt or wsd"),
        ("optim.power", opt.power, opt.power > 0, "> 0"),
        ("optim.end_lr", opt.end_lr, 0 <= opt.end_lr and (opt.end_lr <= opt.lr or not 0 <= opt.lr < math.inf),
         "in [0, optim.lr]"),
        ("optim.decay_start", opt.decay_start, opt.decay_start is None or opt.decay_start >= 0, ">= 0 (or null)"),
        ("optim.decay_steps", opt.decay_steps, opt.decay_steps is None or opt.decay_steps >= 0, ">= 0 (or null)"),
        ("optim.decay_shape", opt.decay_shape, opt.decay_shape in SHAPES, f"one of {', '.join(SHAPES)}"),
        ("trainer.max_steps", tr.max_steps, tr.max_steps >= 1, ">= 1"),
        ("trainer.stop_at_step", tr.stop_at_step, tr.stop_at_step is None or tr.stop_at_step >= 1, ">= 1 (or null)"),
        ("trainer.seed", tr.seed, tr.seed >= 0, ">= 0"),
        ("trainer.log_every", tr.log_every, tr.log_every >= 1, ">= 1"),
        ("trainer.save_every", tr.save_every, tr.save_every >= 1, ">= 1"),
        ("trainer.keep_last", tr.keep_last, tr.keep_last >= 1, ">= 1"),
        ("trainer.eval_every", tr.eval_every, tr.eval_every >= 0, ">= 0 (0: only at the end)"),
        ("trainer.probe_every", tr.probe_every, tr.probe_every >= 0, ">= 0 (0: no probes)"),
        ("trainer.max_nonfinite_steps", tr.max_nonfinite_steps, tr.max_nonfinite_steps >= 1, ">= 1"),
        ("trainer.peak_flops", tr.peak_flops, tr.peak_flops > 0, "> 0"),
        ("trainer.lock_wait_s", tr.lock_wait_s, tr.lock_wait_s >= 0, ">= 0"),
        ("probe.layer", pr.layer, pr.layer is None or 0 <= pr.layer <= m.num_layers,
         f"in [0, model.num_layers={m.num_layers}] (or null)"),
        ("probe.max_tokens", pr.max_tokens, pr.max_tokens >= 3, ">= 3"),
        ("probe.batch_size", pr.batch_size, pr.batch_size >= 1, ">= 1"),
        ("wandb.mode", cfg.wandb.mode, cfg.wandb.mode in ("offline", "online", "disabled"), "offline, online or disabled"),
        ("resume", cfg.resume, cfg.resume != "", "auto, never or a checkpoint path"),
    ]


def check_config(cfg: PretrainConfig) -> None:
    """Range checks Hydra's types cannot express; raises PretrainError naming every bad key."""
    problems = [f"{key}={value}: must be {rule}" for key, value, ok, rule in _rules(cfg) if not ok]
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        problems.append(f"run_dir={run_dir}: is a file, not a directory")
    if problems:
        raise PretrainError("; ".join(problems))
