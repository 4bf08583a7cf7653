"""Typed configuration of `xlmr-pretrain`, mirrored by conf/pretrain.yaml and its groups
(conf/model/*.yaml, conf/deepspeed/*.yaml).

`PretrainConfig` is registered in Hydra's ConfigStore as the schema of the YAML tree, so a
misspelled key, on the command line or in a YAML file, fails at load time with Hydra's message
("Key 'max_step' is not in struct") instead of deep inside the trainer. Model, masking and data
settings are the dataclasses of the modules that own them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
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


def check_config(cfg: PretrainConfig) -> None:
    """Value checks Hydra's types cannot express; raises PretrainError with the key's name."""
    ds, opt, tr = cfg.deepspeed, cfg.optim, cfg.trainer
    problems = []
    if ds.zero_stage not in (0, 1, 2, 3):
        problems.append(f"deepspeed.zero_stage={ds.zero_stage}: must be 0, 1, 2 or 3")
    if ds.precision not in ("auto", "bf16", "fp32"):
        problems.append(f"deepspeed.precision={ds.precision}: must be auto, bf16 or fp32")
    if ds.micro_batch_size < 1 or ds.gradient_accumulation_steps < 1:
        problems.append("deepspeed.micro_batch_size and deepspeed.gradient_accumulation_steps must be >= 1")
    if opt.schedule not in ("linear", "polynomial", "inverse_sqrt", "wsd"):
        problems.append(f"optim.schedule={opt.schedule}: must be linear, polynomial, inverse_sqrt or wsd")
    if opt.decay_shape not in SHAPES:
        problems.append(f"optim.decay_shape={opt.decay_shape}: must be one of {', '.join(SHAPES)}")
    if (opt.decay_start is not None and opt.decay_start < 0) or (opt.decay_steps is not None and opt.decay_steps < 0):
        problems.append("optim.decay_start and optim.decay_steps must be >= 0")
    m = cfg.masking
    if m.schedule not in MASK_SCHEDULES:
        problems.append(f"masking.schedule={m.schedule}: must be one of {', '.join(MASK_SCHEDULES)}")
    if not (0 <= m.mask_prob <= 1 and 0 <= m.end_mask_prob <= 1):
        problems.append("masking.mask_prob and masking.end_mask_prob must be in [0, 1]")
    if m.mask_token_prob < 0 or m.random_token_prob < 0 or m.mask_token_prob + m.random_token_prob > 1:
        problems.append("masking.mask_token_prob and random_token_prob must be >= 0 and add up to at most 1")
    if len(opt.betas) != 2:
        problems.append(f"optim.betas={list(opt.betas)}: must be two numbers")
    if tr.probe_every < 0:
        problems.append(f"trainer.probe_every={tr.probe_every}: must be >= 0 (0: no probes)")
    if tr.max_steps < 1 or tr.save_every < 1 or tr.log_every < 1 or tr.keep_last < 1:
        problems.append("trainer.max_steps, save_every, log_every and keep_last must be >= 1")
    if cfg.resume == "":
        problems.append("resume is empty: use auto, never or a checkpoint path")
    if cfg.wandb.mode not in ("offline", "online", "disabled"):
        problems.append(f"wandb.mode={cfg.wandb.mode}: must be offline, online or disabled")
    if problems:
        raise PretrainError("; ".join(problems))
