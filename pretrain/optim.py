"""The optimizer and learning-rate schedule: AdamW with RoBERTa/XLM-R settings and a linear
warmup followed by linear or polynomial decay (fairseq's `polynomial_decay`), by fairseq's
inverse square root, or by warmup-stable-decay (constant, then a decay of its own shape and
length: ModernBERT, mmBERT)."""
from __future__ import annotations

import math

import torch
from torch import nn

from pretrain import schedules
from pretrain.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases and LayerNorm weights (all 1-d) get none,
    as in RoBERTa/BERT. The embedding matrix is decayed, as in Hugging Face's run_mlm."""
    decay, no_decay = [], []
    for p in model.parameters():  # a tied weight is yielded once
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class AdamW(torch.optim.AdamW):
    """torch's AdamW plus what DeepSpeed's ZeRO optimizers do around it, for ZeRO stage 0:
    skip an update whose gradients hold NaN or inf, clip to max_grad_norm, and report the
    global norm. At stage 0 in fp32 DeepSpeed calls this optimizer directly: without the guard
    a NaN gradient would reach every weight. `overflow` and `_global_grad_norm` are the
    attributes DeepSpeed's engine reads (skipped-step count, get_global_grad_norm()).
    Under ZeRO >= 1 max_grad_norm is 0 (DeepSpeed clips) and the guard is a second check.
    The guard reads the norm on the host once per step: DeepSpeed's engine needs `overflow` as
    a bool to skip the LR scheduler's step. The update itself is torch's fused AdamW (one
    kernel for all parameters, on the GPU and the CPU).
    """

    def __init__(self, params, max_grad_norm: float = 0.0, **kwargs):
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm
        self.overflow = False
        self._global_grad_norm = None

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        if not grads:
            return super().step(closure)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        self._global_grad_norm = float(norm)  # the step's one host read
        self.overflow = not math.isfinite(self._global_grad_norm)
        if self.overflow:
            self._global_grad_norm = float("inf")
            return None
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, norm)
        return super().step(closure)


def build_optimizer(model: nn.Module, cfg: OptimConfig, max_grad_norm: float = 0.0) -> AdamW:
    return AdamW(
        param_groups(model, cfg.weight_decay), max_grad_norm=max_grad_norm, lr=cfg.lr, betas=tuple(cfg.betas),
        eps=cfg.eps, weight_decay=cfg.weight_decay, fused=True,
    )


def warmup_steps(cfg: OptimConfig, max_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(0.06 * max_steps)


def decay_window(cfg: OptimConfig, max_steps: int) -> tuple[int, int]:
    """(first step of the decay, its length) of the wsd schedule: decay_steps long (None: to
    max_steps from decay_start, or 10% of max_steps), starting at decay_start (None: so that it
    ends at max_steps). A decay branch sets decay_start to its checkpoint's step."""
    if cfg.decay_steps is not None:
        length = cfg.decay_steps
    elif cfg.decay_start is not None:
        length = max_steps - cfg.decay_start
    else:
        length = math.ceil(0.1 * max_steps)
    start = cfg.decay_start if cfg.decay_start is not None else max_steps - length
    return start, length


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of cfg.lr after `step` optimizer updates: 0 -> 1 over the warmup, then
    linear / polynomial: (1 - progress)^power down to end_lr at max_steps (power 1: linear);
    inverse_sqrt: sqrt(warmup / step); wsd: 1 until the decay window, along decay_shape down
    to end_lr over it, end_lr after it."""
    warmup = warmup_steps(cfg, max_steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)  # the first update already gets a small nonzero lr
    if cfg.schedule == "inverse_sqrt":
        return math.sqrt(max(1, warmup) / max(1, step))
    end = cfg.end_lr / cfg.lr if cfg.lr else 0.0  # lr=0 (a dry run) must not divide by zero
    if cfg.schedule == "wsd":
        start, length = decay_window(cfg, max_steps)
        if step < start:
            return 1.0
        return end + (1.0 - end) * schedules.decay(cfg.decay_shape, (step - start) / max(1, length))
    if step >= max_steps:
        return end
    progress = (step - warmup) / max(1, max_steps - warmup)
    power = cfg.power if cfg.schedule == "polynomial" else 1.0
    return end + (1.0 - end) * (1.0 - progress) ** power


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))
