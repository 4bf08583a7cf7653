"""Weights out of a training checkpoint or a Hugging Face dir: the one place that reads them.

`load_model(path)` gives an `XLMR` in eval mode, fp32, on the CPU, with its config, its
SentencePiece model and where it came from; `xlmr-export`, `xlmr-eval` and continued
pretraining all start here. `path` is any of

    RUN_DIR, RUN_DIR/checkpoints, RUN_DIR/checkpoints/step_XXXXXXXX
                      a tag of xlmr-pretrain (checkpoint.json: `model` = the ModelConfig,
                      `config` = the resolved run config, `zero_stage`, `vocab_sha256`)
    an HF dir         config.json + model.safetensors or pytorch_model.bin +
                      sentencepiece.bpe.model, as xlmr-export or HF's save_pretrained of an
                      XLMRobertaForMaskedLM writes it

What a DeepSpeed tag holds, by ZeRO stage (as written by 1 to N ranks):

    stage 0           mp_rank_00_model_states.pt: `module` is the full state dict in the
                      model's dtype (beside torch AdamW's moments), always fp32 from
                      xlmr-pretrain (its bf16 needs ZeRO >= 1);
                      a bf16 stage-0 file from plain DeepSpeed keeps its fp32 masters in
                      unnamed optimizer groups, and is refused rather than upcast.
    stages 1, 2       the module file holds the working weights (bf16 in bf16 runs); the fp32
                      master weights are flat partitions in each rank's *_optim_states.pt.
    stage 3           the module files hold empty placeholders; the fp32 masters are flat
                      partitions in each rank's *_optim_states.pt.

For stages >= 1 DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint(lazy_mode=True)`
reassembles the masters; it memory-maps the optimizer shards (the Adam moments, twice the
weights, are never read into memory). bf16 at stage 1 is the exception: DeepSpeed trains it
with its BF16_Optimizer, whose `bf16_zero_pp_rank_*_optim_states.pt` zero_to_fp32 refuses
("is not a zero checkpoint"); `_bf16_optimizer_fp32_state_dict` reads those (issue 10).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from data_prep.state import sha256_file
from pretrain.checkpoint import (
    CHECKPOINTS, MARKER, PARTIAL, VOCAB_FILE, complete_checkpoints, damage, read_meta, tag_for,
)
from pretrain.config import PretrainError
from pretrain.interop.hf_convert import from_hf_state_dict, model_config_from_hf
from pretrain.model import XLMR, ModelConfig

HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # in order of preference
PROVENANCE = "xlmr_export.json"  # written by xlmr-export beside the HF files
TIED = ("lm_head.decoder.weight", "tok_emb.weight")  # one tensor under two names
OPTIMIZER_SHARDS = "*_optim_states.pt"  # one per rank (bf16_zero_pp_rank_*_... in bf16 runs, any stage)


@dataclass
class LoadedModel:
    model: XLMR  # eval mode, fp32, CPU
    config: ModelConfig
    spm_model: Path  # the SentencePiece model of its vocabulary (our Dictionary / HF tokenizer read it)
    step: Optional[int]  # the training step, when known
    data_dir: Optional[str]  # the data it was trained on, when known (as the run config wrote it)
    source: str  # what was loaded, for logs and reports
    tag: Optional[Path] = None  # the checkpoint tag dir (None for an HF dir)
    meta: dict = field(default_factory=dict)  # its checkpoint.json ({} for an HF dir)


def resolve_tag(path: Union[str, Path], step: Optional[int] = None) -> Path:
    """The checkpoint tag dir for a run dir, its checkpoints/ dir or a tag dir: the one of
    `step` if given, else the newest complete one."""
    path = Path(path)
    if not path.is_dir():
        raise PretrainError(f"{path} does not exist (or is not a directory)")
    if (path / MARKER).is_file() or path.name.startswith("step_"):  # a tag dir
        if step is not None and path.name != tag_for(step):
            raise PretrainError(f"{path} is the checkpoint {path.name}, not step {step}: give its run dir to pick a step")
        _check_complete(path)
        return _undamaged(path)
    ckpt_dir = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    found = complete_checkpoints(ckpt_dir)
    if step is None:
        for tag in reversed(found):
            why = damage(tag)
            if why is None:
                return tag
            print(f"skipping damaged checkpoint {tag}: {why}", file=sys.stderr)
        if found:
            raise PretrainError(f"every checkpoint in {ckpt_dir} is damaged (the newest: {damage(found[-1])})")
        raise PretrainError(f"no complete checkpoint in {ckpt_dir} (a checkpoint is a step_* dir holding {MARKER})")
    tag = ckpt_dir / tag_for(step)
    if tag in found:
        return _undamaged(tag)
    if tag.is_dir() or tag.with_name(tag.name + PARTIAL).is_dir():
        _check_complete(tag)
    available = ", ".join(str(read_meta(t).get("step", t.name)) for t in found) or "none"
    raise PretrainError(f"no checkpoint of step {step} in {ckpt_dir}; complete checkpoints: steps {available}")


def _undamaged(tag: Path) -> Path:
    why = damage(tag)
    if why is not None:
        raise PretrainError(f"the checkpoint {tag} is damaged: {why}; use another step")
    return tag


def _check_complete(tag: Path) -> None:
    if not (tag / MARKER).is_file():
        raise PretrainError(f"{tag} is an incomplete checkpoint (no {MARKER}: its save was interrupted); "
                            "use another step")


def consolidated_state_dict(tag_dir: Union[str, Path]) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a checkpoint tag under XLMR's parameter names, on the CPU.

    At most one copy of the weights is ever held in memory, however many ranks wrote the tag:
    - stage 0: the module file is memory-mapped (torch.load(mmap=True)); its fp32 tensors are
      returned as they lie in the file, backed by the page cache, not copied;
    - stages 1 and 2: DeepSpeed concatenates the ranks' memory-mapped flat partitions into one
      fp32 vector (the one copy); the returned tensors are views into it;
    - stage 3: DeepSpeed's lazy entries are materialized one at a time, each gathering one
      parameter from the ranks' memory-mapped partitions into a tensor of its own.
    The tied `lm_head.decoder.weight` is the `tok_emb.weight` tensor itself.
    """
    tag_dir = Path(tag_dir)
    meta = read_meta(tag_dir)
    stage = meta.get("zero_stage")
    if stage == 0:
        module = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", mmap=True,
                            weights_only=False)["module"]
        not_fp32 = sorted({str(t.dtype) for t in module.values() if t.dtype != torch.float32})
        if not_fp32:
            raise PretrainError(f"{tag_dir}: a ZeRO stage 0 checkpoint with {', '.join(not_fp32)} weights has no "
                                "named fp32 master weights to export (xlmr-pretrain trains bf16 with ZeRO >= 1 only)")
        state = dict(module)
    elif stage in (1, 2, 3):
        # The shards' fp32 partitions are saved as Parameters: without no_grad every gathered
        # tensor would carry an autograd graph back to them, keeping every mapped shard alive.
        with torch.no_grad():
            lazy = _bf16_optimizer_fp32_state_dict(tag_dir) or _deepspeed_fp32_state_dict(tag_dir)
            lazy.pop(TIED[0], None)  # DeepSpeed lists the tied weight twice: gathering it again would copy it
            # ZeRO-3: each .contiguous() gathers one parameter; ZeRO 1/2: it returns the view as is.
            state = {name: lazy_tensor.contiguous() for name, lazy_tensor in lazy.items()}
    else:
        raise PretrainError(f"{tag_dir}: unknown zero_stage {stage!r} in {MARKER}")
    state[TIED[0]] = state[TIED[1]]
    return state


def _shard_rank(path: Path) -> int:
    return int(re.search(r"_rank_(\d+)_", path.name).group(1))


def _bf16_optimizer_fp32_state_dict(tag_dir: Path) -> Optional[dict[str, torch.Tensor]]:
    """The fp32 masters of a checkpoint written by DeepSpeed's BF16_Optimizer (bf16, ZeRO 1),
    None for the shards of DeepSpeed's ZeRO optimizers (they record their `zero_stage`).

    Each rank's file holds, per parameter group, its equal partition of the group's flat fp32
    vector (`single_partition_of_fp32_groups`): the group's parameters flattened in the order
    of the module file's `param_shapes`, padded at the end (the last rank's `group_paddings`)
    to split evenly.
    The files are memory-mapped; the concatenated groups are the one copy of the weights, and
    the returned tensors are views into them (as zero_to_fp32 does for ZeRO 1 and 2)."""
    shards = sorted(tag_dir.glob(OPTIMIZER_SHARDS), key=_shard_rank)
    optim = [torch.load(f, map_location="cpu", mmap=True, weights_only=False)["optimizer_state_dict"]
             for f in shards]
    if not optim or "zero_stage" in optim[0]:
        return None
    module = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", mmap=True, weights_only=False)
    counts = {c for o in optim for c in (o["partition_count"] if isinstance(o["partition_count"], list)
                                         else [o["partition_count"]])}
    if counts != {len(shards)} or [_shard_rank(f) for f in shards] != list(range(len(shards))):
        raise PretrainError(f"{tag_dir}: {len(shards)} bf16 optimizer shards, but they were written by "
                            f"{sorted(counts)} rank(s): a shard is missing or foreign")
    state = {}
    for group, shapes in enumerate(module["param_shapes"]):
        flat = torch.cat([o["single_partition_of_fp32_groups"][group] for o in optim])
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            state[name] = flat.narrow(0, offset, numel).view(shape)
            offset += numel
        needed = offset + optim[-1]["group_paddings"][group]
        if needed != flat.numel():
            raise PretrainError(f"{tag_dir}: parameter group {group} holds {flat.numel()} values, but its "
                                f"parameters and padding need {needed}")
    return state


def _deepspeed_fp32_state_dict(tag_dir: Path) -> dict:
    # DeepSpeed picks its accelerator when first imported: tell it there is no GPU (as
    # pretrain.distributed does) rather than let it warn.
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # It prints progress lines and bars; a command's output should be its own.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name, lazy_mode=True)
        except (OSError, ValueError) as exc:  # a missing or foreign shard
            raise PretrainError(f"{tag_dir}: cannot read its ZeRO shards: {exc}") from None


def load_model(path: Union[str, Path], step: Optional[int] = None) -> LoadedModel:
    """The model of a checkpoint (run dir, checkpoints dir or tag dir; `step` picks a tag,
    default the newest complete one) or of an HF dir."""
    path = Path(path)
    if (path / HF_CONFIG).is_file() and not (path / MARKER).is_file():
        if step is not None:
            raise PretrainError(f"{path} is a Hugging Face model dir: a step applies to checkpoints only")
        return _load_hf(path)
    tag = resolve_tag(path, step)
    meta = read_meta(tag)
    cfg = ModelConfig(**meta["model"])
    spm_model = _vocabulary(tag, meta)
    model = _build(cfg, consolidated_state_dict(tag), tag)
    source = (f"checkpoint {tag} (step {meta['step']}, ZeRO {meta['zero_stage']}, "
              f"{meta.get('world_size', '?')} rank(s), {meta.get('precision', '?')})")
    return LoadedModel(model, cfg, spm_model, meta["step"], (meta.get("config") or {}).get("data_dir"), source,
                       tag, meta)


def _vocabulary(tag: Path, meta: dict) -> Path:
    """The SentencePiece model the checkpoint was trained with: the trainer's copy in the run
    dir, else the data dir's; refused unless its sha256 is the checkpoint's vocab_sha256."""
    spm_model = tag.parent.parent / VOCAB_FILE
    if not spm_model.is_file():
        data_dir = (meta.get("config") or {}).get("data_dir")
        try:
            manifest = json.loads((Path(data_dir) / "manifest.json").read_text(encoding="utf-8"))
            spm_model = Path(data_dir) / manifest["vocab"]["spm_model"]
        except (TypeError, OSError, ValueError, KeyError):
            raise PretrainError(f"the run dir {tag.parent.parent} has no {VOCAB_FILE}, and the data dir it was "
                                f"trained on ({data_dir}) has no readable manifest.json: copy the data's "
                                f"vocab/spm.model to {tag.parent.parent / VOCAB_FILE}") from None
    if sha256_file(spm_model) != meta["vocab_sha256"]:
        raise PretrainError(f"{spm_model} (sha256 {sha256_file(spm_model)[:12]}…) is not the vocabulary {tag} was "
                            f"trained with (sha256 {meta['vocab_sha256'][:12]}…)")
    return spm_model


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise PretrainError(f"{path} is damaged (not JSON: {exc}): export or download the model again") from None
    if not isinstance(value, dict):
        raise PretrainError(f"{path} is damaged (not a JSON object): export or download the model again")
    return value


def _load_hf(path: Path) -> LoadedModel:
    config = _read_json(path / HF_CONFIG)
    try:
        cfg = model_config_from_hf(config)
    except ValueError as exc:
        raise PretrainError(f"{path / HF_CONFIG}: {exc}") from None
    except KeyError as exc:
        raise PretrainError(f"{path / HF_CONFIG}: no {exc.args[0]!r}: not an XLM-R config") from None
    spm_model = path / VOCAB_FILE
    if not spm_model.is_file():
        raise PretrainError(f"{path} has no {VOCAB_FILE} (the SentencePiece model of its vocabulary)")
    import sentencepiece

    try:
        pieces = sentencepiece.SentencePieceProcessor(model_file=str(spm_model)).get_piece_size()
    except (OSError, RuntimeError) as exc:
        raise PretrainError(f"{spm_model}: not a readable SentencePiece model ({exc})") from None
    if cfg.vocab_size != pieces + 2:  # <pad> and <mask> around the pieces (data_prep.dictionary)
        raise PretrainError(f"{path}: the model has {cfg.vocab_size} ids but {VOCAB_FILE} has {pieces} pieces "
                            f"(an XLM-R vocabulary is pieces + 2 = {pieces + 2})")
    weights = next((path / name for name in HF_WEIGHTS if (path / name).is_file()), None)
    if weights is None:
        raise PretrainError(f"{path} has no {' or '.join(HF_WEIGHTS)}")
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            hf_state = load_file(weights)
        else:
            hf_state = torch.load(weights, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001: safetensors' and torch's errors for a cut or foreign file
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise PretrainError(f"{weights} is damaged or not a weights file ({first[:200]}): export or download the "
                            "model again") from None
    try:
        state = from_hf_state_dict(hf_state)
    except KeyError as exc:
        raise PretrainError(f"{weights}: not the weights of an XLMRobertaForMaskedLM ({exc.args[0]})") from None
    del hf_state  # the q/k/v parts were copied into our fused qkv; everything else is shared
    model = _build(cfg, state, weights)
    provenance = path / PROVENANCE  # our own export knows its step and data
    info = _read_json(provenance) if provenance.is_file() else {}
    return LoadedModel(model, cfg, spm_model, info.get("step"), info.get("data_dir"), f"Hugging Face model {path}")


def _build(cfg: ModelConfig, state: dict[str, torch.Tensor], source: Path) -> XLMR:
    """An XLMR whose parameters are the given tensors, not copies of them: built on the meta
    device (no memory), then assigned."""
    with torch.device("meta"):
        model = XLMR(cfg)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]  # [0] is "Error(s) in ..."
        raise PretrainError(f"{source}: its weights do not fit the model config ({lines[-1][:300]})") from None
    # assign=True wrapped the one tied tensor in two Parameters; make them one again, as XLMR does.
    model.lm_head.decoder.weight = model.tok_emb.weight
    return model.float().eval()
