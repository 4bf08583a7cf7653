"""Checkpoints: DeepSpeed's sharded save plus our client state, made atomic and resumable.

Layout under RUN_DIR/checkpoints/ (documented in the README):

    step_00000100/            a DeepSpeed tag: mp_rank_00_model_states.pt (weights + client
                              state), *_optim_states.pt (one per rank under ZeRO), ...
    step_00000100/checkpoint.json
                              written by rank 0 after every rank finished saving: the tag is
                              complete. Also readable without torch: step, vocabulary and
                              manifest hashes, model config, the resolved run config.
    latest                    the newest complete tag's name, replaced atomically after
                              checkpoint.json (DeepSpeed's own tools read this file)

and RUN_DIR/sentencepiece.bpe.model, the SentencePiece model of the data's vocabulary (its
sha256 is every checkpoint's vocab_sha256): a run dir is usable without its data dir.

Every rank saves into `step_00000100.partial/`; rank 0 renames it to the tag once all are done,
then writes checkpoint.json. A run killed mid-save (SIGKILL after SLURM's KillWait) leaves a
`.partial` dir, or in the instant between rename and marker a tag without checkpoint.json:
neither is ever resumed from, and the next run removes them before it starts.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from data_prep.atomic import atomic_open, write_json
from pretrain.config import PretrainError
from pretrain.distributed import all_gather_object, barrier

CHECKPOINTS = "checkpoints"
MARKER = "checkpoint.json"
LATEST = "latest"
VOCAB_FILE = "sentencepiece.bpe.model"  # the name HF's XLMRobertaTokenizer looks for
PARTIAL = ".partial"
FORMAT = "xlmr-pretrain-checkpoint"
FORMAT_VERSION = 1
# The training state saved with every checkpoint (besides DeepSpeed's weights, optimizer and
# scheduler): steps, tokens seen, the data loader's position (micro-batches this rank consumed;
# the same on every rank), NaN-skipped steps, the W&B run id, the data fingerprint; plus "rng",
# every rank's RNG states.
CLIENT_KEYS = ("step", "tokens_seen", "consumed_micro_batches", "skipped_steps", "wandb_run_id",
               "vocab_sha256", "manifest_sha256", "data_plan", "damaged_shards")
META_KEYS = ("step", "vocab_sha256", "manifest_sha256")  # what resume reads first
UNIVERSAL = "universal"  # inside a tag: its DeepSpeed universal checkpoint, made on the first resized resume


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def data_fingerprint(manifest: dict) -> dict[str, str]:
    """What a checkpoint must match to resume: the vocabulary, and the manifest as a whole
    apart from its creation time (re-running the prep on the same input gives the same hash)."""
    stable = {k: v for k, v in manifest.items() if k != "created"}
    canonical = json.dumps(stable, sort_keys=True, ensure_ascii=False).encode()
    return {
        "vocab_sha256": manifest["vocab"]["sha256"],
        "manifest_sha256": hashlib.sha256(canonical).hexdigest(),
    }


def keep_vocabulary(run_dir: Path, data_dir: str, manifest: dict) -> None:
    """Copy the data's SentencePiece model into the run dir (rank 0, once)."""
    target = run_dir / VOCAB_FILE
    if not target.is_file():
        with open(Path(data_dir) / manifest["vocab"]["spm_model"], "rb") as src, atomic_open(target) as dst:
            shutil.copyfileobj(src, dst)


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Tags with a completion marker, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and (p / MARKER).is_file())


def remove_incomplete(ckpt_dir: Path) -> list[str]:
    """Delete what interrupted saves left (rank 0, before anything else is saved); return their names."""
    if not ckpt_dir.is_dir():
        return []
    incomplete = [p for p in ckpt_dir.iterdir()
                  if p.is_dir() and (p.name.endswith(PARTIAL) or not (p / MARKER).is_file())]
    for path in incomplete:
        shutil.rmtree(path)
    return sorted(p.name for p in incomplete)


def find_resume_checkpoint(run_dir: Path, resume: str, say=None) -> Optional[Path]:
    """The tag to resume from: resume=auto -> the newest complete, undamaged one in run_dir
    (or None; each damaged one is reported through ``say`` and skipped), never -> None
    (refusing a run_dir that already has checkpoints), else a path to a tag, a checkpoints
    dir or a run dir, which must not be damaged."""
    own = complete_checkpoints(run_dir / CHECKPOINTS)
    if resume == "auto":
        for tag in reversed(own):
            why = damage(tag)
            if why is None:
                return tag
            if say:
                say(f"skipping damaged checkpoint {tag}: {why}")
        if own:  # starting over would throw the run away: the user decides
            raise PretrainError(f"every checkpoint in {run_dir / CHECKPOINTS} is damaged (the newest: "
                                f"{damage(own[-1])}): restore one from a copy, or move them away to start over")
        return None
    if resume == "never":
        if own:
            raise PretrainError(
                f"resume=never but {run_dir} already holds checkpoints ({own[-1].name}): "
                "use another run_dir, or resume=auto to continue"
            )
        return None
    path = Path(resume)
    if (path / MARKER).is_file():
        found = [path]
    else:
        found = complete_checkpoints(path) or complete_checkpoints(path / CHECKPOINTS)
    if not found:
        raise PretrainError(f"resume={resume}: no complete checkpoint there (a tag dir holds {MARKER})")
    why = damage(found[-1])
    if why is not None:
        raise PretrainError(f"resume={resume}: the checkpoint {found[-1]} is damaged: {why}; "
                            "give an older tag, or resume=auto to take the newest undamaged one")
    return found[-1]


def read_meta(tag_dir: Path) -> dict:
    """A tag's checkpoint.json; PretrainError naming the file if it is not one."""
    path = tag_dir / MARKER
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise PretrainError(f"{path} is damaged (not JSON: {exc}): use another checkpoint") from None
    except OSError as exc:
        raise PretrainError(f"{path}: cannot read it ({exc.strerror}): use another checkpoint") from None
    missing = [k for k in META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise PretrainError(f"{path} is damaged (no {', '.join(missing)}): use another checkpoint")
    return meta


def damage(tag_dir: Path) -> Optional[str]:
    """Why a tag with a completion marker cannot be resumed from, or None: a marker that is
    not JSON or lacks keys, or a file of the save missing, of another size than the marker
    recorded, or (older markers without sizes) a torch file cut short."""
    try:
        meta = read_meta(tag_dir)
    except PretrainError as exc:
        return str(exc).split(": use another checkpoint")[0].replace(f"{tag_dir / MARKER} is ", f"{MARKER} is ")
    if meta["step"] != _tag_step(tag_dir):
        return f"{MARKER} says step {meta['step']}, its dir is {tag_dir.name}"
    files = meta.get("files")
    if files is None:  # written before sizes were recorded
        files = {p.name: None for p in tag_dir.glob("*.pt")}
        if not files:
            return "no DeepSpeed files (*.pt)"
    for name, size in sorted(files.items()):
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if size is not None and path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {MARKER} says {size}"
        if size is None and not zipfile.is_zipfile(path):  # torch.save writes a zip; a cut one has no end record
            return f"{name} is cut short (not a complete torch file)"
    return None


def _tag_step(tag_dir: Path) -> Optional[int]:
    try:
        return int(tag_dir.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return None


def check_compatible(tag_dir: Path, fingerprint: dict, model: dict) -> dict:
    """Refuse to resume against other data or another architecture, before loading anything."""
    meta = read_meta(tag_dir)
    if meta.get("vocab_sha256") != fingerprint["vocab_sha256"]:
        raise PretrainError(
            f"cannot resume from {tag_dir}: it was trained with vocabulary sha256 "
            f"{str(meta.get('vocab_sha256'))[:12]}…, but data_dir's vocabulary is "
            f"{fingerprint['vocab_sha256'][:12]}…; use the data it was trained on, or a new run_dir"
        )
    if meta.get("manifest_sha256") != fingerprint["manifest_sha256"]:
        raise PretrainError(
            f"cannot resume from {tag_dir}: data_dir's manifest.json differs from the one it was trained on "
            f"(sha256 {fingerprint['manifest_sha256'][:12]}… vs {str(meta.get('manifest_sha256'))[:12]}…): "
            "the data order would not continue; use the same data_dir, or a new run_dir"
        )
    saved = meta.get("model") or {}
    changed = {k: (saved.get(k), v) for k, v in model.items()
               if k not in ("dropout", "attention_dropout", "activation_checkpointing") and saved.get(k) != v}
    if changed:
        diff = ", ".join(f"model.{k}={new} (checkpoint: {old})" for k, (old, new) in changed.items())
        raise PretrainError(f"cannot resume from {tag_dir}: the model differs: {diff}")
    return meta


def needs_universal(meta: dict, world_size: int, zero_stage: int) -> bool:
    """Whether resuming from a checkpoint with ``meta`` goes through a universal checkpoint.

    ZeRO >= 1 shards the optimizer state by rank: another world size (or stage) needs
    DeepSpeed's universal format, which stores every parameter's fp32 weights and Adam moments
    whole. A ZeRO-0 checkpoint holds the whole optimizer state already and loads on any world
    size. DeepSpeed loads a universal checkpoint of stage 1 or 2 into stage 1 or 2, and one of
    stage 3 into stage 3; across those it fails with a bare assertion: refused here first."""
    old_stage, old_world = meta.get("zero_stage"), meta.get("world_size")
    if (old_stage, old_world) == (zero_stage, world_size) or old_stage == zero_stage == 0:
        return False
    if old_stage in (1, 2) and zero_stage in (1, 2) or old_stage == zero_stage == 3:
        return True
    raise PretrainError(
        f"cannot resume a ZeRO-{old_stage} checkpoint with deepspeed.zero_stage={zero_stage}: on resume the "
        "stage can change between 1 and 2 only (DeepSpeed converts a universal checkpoint of stage 1 or 2 "
        f"into stage 1 or 2, and of stage 3 into stage 3); use deepspeed.zero_stage={old_stage}")


def universal_checkpoint(tag_dir: Path) -> Path:
    """The tag's universal checkpoint (TAG/universal), converted once by DeepSpeed's
    ds_to_universal (rank 0; CPU only) and kept next to the shards it came from."""
    target = tag_dir / UNIVERSAL
    if not target.is_dir():
        partial = tag_dir / (UNIVERSAL + PARTIAL)
        shutil.rmtree(partial, ignore_errors=True)
        proc = subprocess.run(
            [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
             "--output_folder", str(partial), "--inject_missing_state",
             "--num_extract_workers", "1", "--num_merge_workers", "1"],
            capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise PretrainError(f"converting {tag_dir} to a universal checkpoint failed: {last}")
        os.replace(partial, target)
    return target


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, run_dir: Path, state: dict, meta: dict, keep_last: int, rank: int) -> Path:
    """Save on all ranks, then (rank 0) mark the tag complete, point `latest` at it and drop
    the oldest complete tags beyond keep_last. `state` is the client state (every rank passes
    the same); each rank's RNG states are gathered into it."""
    ckpt_dir = run_dir / CHECKPOINTS
    tag = tag_for(state["step"])
    if rank == 0:
        for stale in (ckpt_dir / tag, ckpt_dir / (tag + PARTIAL)):  # an abandoned branch's save of this step
            if stale.exists():
                shutil.rmtree(stale)
    barrier()
    client_state = dict(state, rng=all_gather_object(_rng_state()))
    engine.save_checkpoint(str(ckpt_dir), tag=tag + PARTIAL, client_state=client_state, save_latest=False)
    barrier()  # every rank's shards are written
    if rank == 0:
        os.replace(ckpt_dir / (tag + PARTIAL), ckpt_dir / tag)
        files = {p.name: p.stat().st_size for p in sorted((ckpt_dir / tag).iterdir()) if p.is_file()}
        meta = dict(meta, format=FORMAT, format_version=FORMAT_VERSION, step=state["step"],
                    tokens_seen=state["tokens_seen"], saved_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    files=files)  # what resume checks (damage()) on file systems without atomic rename
        write_json(ckpt_dir / tag / MARKER, meta)
        with atomic_open(ckpt_dir / LATEST, "w", encoding="utf-8") as f:
            f.write(tag)
        for old in complete_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return ckpt_dir / tag


def load_checkpoint(engine, tag_dir: Path, rank: int, world_size: int) -> dict:
    """Load weights, optimizer and scheduler into the engine; return the client state.
    ``tag_dir`` may be a tag's universal checkpoint (for an engine configured to load one).
    RNG states are restored when the world size is unchanged."""
    # DeepSpeed 0.19's universal load into ZeRO-3 gives every param group group 0's settings
    # (weight decay on biases and LayerNorms too) and one `step` tensor to every group's state,
    # which AdamW then increments once per group (wrong bias correction from the second group
    # on). Both are put right after the load; on every other path they change nothing.
    optimizer = engine.optimizer
    torch_optimizer = getattr(optimizer, "optimizer", optimizer)
    made = [(group["params"], group["weight_decay"]) for group in torch_optimizer.param_groups]
    try:
        _, client_state = engine.load_checkpoint(
            str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True, load_lr_scheduler_states=True,
        )
    except RuntimeError as exc:  # e.g. the model code changed its parameter names
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        raise PretrainError(f"cannot resume from {tag_dir}: its weights do not fit this model ({first})") from None
    if client_state is None:
        raise PretrainError(f"cannot resume from {tag_dir}: DeepSpeed found no checkpoint there")
    for group, (params, weight_decay) in zip(torch_optimizer.param_groups, made):
        group["params"], group["weight_decay"] = params, weight_decay
    for param_state in torch_optimizer.state.values():
        if torch.is_tensor(param_state.get("step")):
            param_state["step"] = param_state["step"].clone()
    rng = client_state.get("rng")
    if rng is not None and len(rng) == world_size:
        _set_rng_state(rng[rank])
    # DeepSpeed hands back its own metadata too; keep the keys we saved.
    return {k: client_state[k] for k in CLIENT_KEYS if k in client_state}
