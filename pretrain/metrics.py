"""Metrics: one interface, rank 0 only, writing RUN_DIR/metrics.jsonl always and W&B as
configured (offline by default). Also the FLOPs-per-token estimate behind MFU.

metrics.jsonl holds one JSON object per logged step: "step", "loss", "accuracy", "lr",
"grad_norm", "tokens_per_s", "samples_per_s", "data_wait_s", "skipped_steps", "tokens_seen", "damaged_shards",
"lang_loss/<lang>", the schedules' "phase", "alpha", "languages_in_play", "mask_prob",
"masked_fraction", "lang_share/<lang>", on GPU "mfu" and "gpu_memory_gb", after a validation pass
"valid/loss", "valid/accuracy", "valid_lang_loss/<lang>", and after a cross-lingual probe
the keys of evaluation.probes.metrics_record ("retrieval/mean", "transfer_gap/<lang>", ...).
"""
from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import Any, Optional

from pretrain.config import PretrainError, WandbConfig
from pretrain.model import ModelConfig

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"


def flops_per_token(model: ModelConfig, seq_len: int, masked_fraction: float) -> float:
    """Training FLOPs per input position (forward + backward), for MFU.

    A matmul with an [m, n] weight costs 2*m*n FLOPs per token forward and twice that
    backward (gradients of inputs and of weights): 6 per weight per token.
      * encoder weights (N_nonembedding = L * (4 d^2 attention + 2 d f feed-forward)):
        6 * N_nonembedding; embedding lookups cost no matmul.
      * attention scores QK^T and their use on V: 2 * 2 * s * d per token per layer
        forward, x3 with backward: 12 * L * s * d.
      * the LM head (dense d x d, decoder d x V) runs only at masked positions:
        6 * (d^2 + d * V) * masked_fraction.
    Biases, LayerNorms, softmax and GELU are left out (under 1% at base size), as in
    PaLM's and nanoGPT's estimates.
    """
    d, L, f, V = model.hidden_size, model.num_layers, model.ffn_size, model.vocab_size
    n_nonembedding = L * (4 * d * d + 2 * d * f)
    return 6 * n_nonembedding + 12 * L * seq_len * d + 6 * (d * d + d * V) * masked_fraction


def wandb_run_id(run_dir: Path, from_checkpoint: Optional[str]) -> str:
    """The W&B run id of this run dir: kept in RUN_DIR/wandb_run_id (and in every checkpoint),
    so a restarted or requeued run continues the same W&B run."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file():
        try:
            saved = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            saved = f"unreadable: {exc}"
        if saved and not re.fullmatch(r"[A-Za-z0-9_-]{1,128}", saved):
            raise PretrainError(f"{path} is damaged (it holds no W&B run id: {saved[:40]!r}): restore it (xlmr-status "
                                "and every checkpoint's client state know the id), or delete it to log to a new W&B run")
        if saved:
            return saved
    run_id = from_checkpoint or secrets.token_hex(6)  # not `random`: the training RNG stays untouched
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


class MetricsLogger:
    """Rank 0 writes; other ranks hold a no-op logger, so the loop needs no rank checks."""

    def __init__(self, run_dir: Path, cfg: WandbConfig, rank: int, run_id: Optional[str],
                 config: dict, resumed_step: Optional[int]):
        self.enabled = rank == 0
        self.run = None
        self.file = None
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / METRICS_FILE
        # A run killed after its last checkpoint logged steps the resumed run will log again.
        _truncate_after(path, resumed_step if resumed_step is not None else 0)
        self.file = open(path, "a", encoding="utf-8")
        if cfg.mode != "disabled":
            import wandb

            self.run = wandb.init(
                project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.resolve().name,
                id=run_id, resume="allow", dir=str(run_dir), mode=cfg.mode, config=config,
                tags=list(cfg.tags), settings=wandb.Settings(console="off", silent=True),
            )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.run is not None:
            self.run.log(metrics, step=step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.run is not None:
            self.run.finish()


def _truncate_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
