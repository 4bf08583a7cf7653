"""Checkpoint averaging: the parameter mean of several checkpoints of one run, as one model
(mmBERT merges its decayed checkpoints; averaging the last few of a run is the older
"checkpoint averaging" of fairseq's average_checkpoints.py). `xlmr-export --average` writes it.

Every checkpoint must have the model config and vocabulary of the first. The mean is summed
in float64, one checkpoint at a time, so at most one checkpoint's weights besides the sum are
in memory, and the order of the checkpoints does not change the result beyond fp32 rounding.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from pretrain.checkpoint import CHECKPOINTS, complete_checkpoints, read_meta
from pretrain.config import PretrainError
from pretrain.interop.consolidate import TIED, LoadedModel, consolidated_state_dict, load_model, resolve_tag
from pretrain.model import ModelConfig


def average_tags(run_dir: Path, last: Optional[int] = None, steps: Optional[list[int]] = None) -> list[Path]:
    """The tags to average: the `last` newest complete checkpoints of RUN_DIR, or those of `steps`."""
    if steps:
        return [resolve_tag(run_dir, step) for step in steps]
    ckpt_dir = run_dir / CHECKPOINTS if (run_dir / CHECKPOINTS).is_dir() else run_dir
    found = complete_checkpoints(ckpt_dir)
    if last is None or last < 1 or len(found) < last:
        raise PretrainError(f"--average {last}: {ckpt_dir} holds {len(found)} complete checkpoint(s)")
    return found[-last:]


def load_average(tags: list[Path]) -> LoadedModel:
    """The last tag's model (its step, meta) with every parameter replaced by the mean over `tags`."""
    if len(tags) < 2:
        raise PretrainError("averaging needs at least two checkpoints")
    first = load_model(tags[-1])
    total = {name: tensor.double() for name, tensor in first.model.state_dict().items()}
    for tag in tags[:-1]:
        meta = read_meta(tag)
        if ModelConfig(**meta["model"]) != first.config or meta.get("vocab_sha256") != first.meta.get("vocab_sha256"):
            raise PretrainError(f"{tag}: another model config or vocabulary than {tags[-1]}: cannot average them")
        for name, tensor in consolidated_state_dict(tag).items():
            if name != TIED[0]:  # the tied decoder weight is the embedding, added once
                total[name] += tensor.double()
    mean = {name: (tensor / len(tags)).float() for name, tensor in total.items()}
    mean[TIED[0]] = mean[TIED[1]]
    first.model.load_state_dict(mean)
    first.source = f"the mean of {len(tags)} checkpoints: " + ", ".join(f"{t.name}" for t in tags) + f" of {tags[0].parent}"
    return first
