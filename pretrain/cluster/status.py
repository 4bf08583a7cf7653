"""The `xlmr-status RUN_DIR` command: where a training run stands, read from its files only
(no torch, no SLURM), so it works on a login node while the job runs, or after it.

Reads RUN_DIR/checkpoints (latest complete checkpoint: step, tokens seen, time saved),
RUN_DIR/metrics.jsonl (last and smoothed loss, throughput, the newest step logged), the run's
config (max_steps, W&B settings: RUN_DIR/hydra/.hydra/config.yaml, else the checkpoint's) and
RUN_DIR/wandb_run_id with RUN_DIR/wandb/ (the W&B run, or the offline folders to sync).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

CHECKPOINTS, MARKER, METRICS, WANDB_ID = "checkpoints", "checkpoint.json", "metrics.jsonl", "wandb_run_id"
LOCK_FILE = "run.lock"  # pretrain/runlock.py
SMOOTHING = 0.9  # EMA weight of the past, over logged records (as W&B's default smoothing)


def _read_json_lines(path: Path) -> list[dict]:
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written right now
                pass
    return records


def latest_checkpoint(run_dir: Path) -> Optional[dict]:
    """The newest checkpoint whose checkpoint.json reads, with the newer ones that do not
    (as the trainer's resume skips them) under "damaged"."""
    ckpts = sorted(p for p in (run_dir / CHECKPOINTS).glob("step_*") if (p / MARKER).is_file())
    damaged = []
    for tag in reversed(ckpts):
        try:
            meta = json.loads((tag / MARKER).read_text(encoding="utf-8"))
            if not isinstance(meta, dict) or "step" not in meta:
                raise ValueError("no step")
        except (OSError, ValueError) as exc:
            damaged.append(f"{tag} ({MARKER} unreadable: {exc})")
            continue
        return {"path": str(tag), "step": meta.get("step"), "tokens_seen": meta.get("tokens_seen"),
                "saved_at": meta.get("saved_at"), "config": meta.get("config") or {}, "damaged": damaged}
    return {"path": None, "damaged": damaged} if damaged else None


def lock_holder(run_dir: Path) -> Optional[dict]:
    """Who holds the run dir's lock (pretrain/runlock.py) now, from run.lock; None if nobody."""
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # ours for an instant: nobody holds it
            return None
        except OSError:
            pass
        try:
            return json.loads(os.pread(fd, 4096, 0).decode())
        except ValueError:
            return {}
    finally:
        os.close(fd)


def _run_config(run_dir: Path, ckpt: Optional[dict]) -> dict:
    path = run_dir / "hydra" / ".hydra" / "config.yaml"
    if path.is_file():
        from omegaconf import OmegaConf

        try:
            return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        except Exception:  # noqa: BLE001: fall back to the checkpoint's copy
            pass
    return (ckpt or {}).get("config") or {}


def smoothed(values: list[float], weight: float = SMOOTHING) -> Optional[float]:
    """Debiased exponential moving average (the last value weighs most)."""
    ema, norm = 0.0, 0.0
    for v in values:
        ema = weight * ema + (1 - weight) * v
        norm = weight * norm + (1 - weight)
    return ema / norm if norm else None


def wandb_info(run_dir: Path, config: dict) -> dict:
    wb = config.get("wandb") or {}
    mode = wb.get("mode", "offline")
    path = run_dir / WANDB_ID
    run_id = path.read_text().strip() if path.is_file() else None
    info: dict[str, Any] = {"mode": mode, "run_id": run_id}
    if run_id and mode == "online":
        entity, project = wb.get("entity"), wb.get("project") or "xlmr-pretrain"
        info["url"] = (f"https://wandb.ai/{entity}/{project}/runs/{run_id}" if entity
                       else f"https://wandb.ai/<your entity>/{project}/runs/{run_id}")
    offline = sorted(str(p) for p in (run_dir / "wandb").glob(f"offline-run-*-{run_id}")) if run_id else []
    if offline:
        info["offline_dirs"] = offline
        info["sync"] = "wandb sync " + " ".join(offline)
    return info


def run_status(run_dir: Path) -> dict:
    ckpt = latest_checkpoint(run_dir)
    config = _run_config(run_dir, ckpt)
    records = _read_json_lines(run_dir / METRICS)
    train = [r for r in records if r.get("loss") is not None]
    max_steps = (config.get("trainer") or {}).get("max_steps")
    status: dict[str, Any] = {"run_dir": str(run_dir), "max_steps": max_steps, "checkpoint": None,
                              "running": lock_holder(run_dir)}
    if ckpt and ckpt["path"]:
        status["checkpoint"] = {k: ckpt[k] for k in ("path", "step", "saved_at")}
    if ckpt and ckpt["damaged"]:
        status["damaged_checkpoints"] = ckpt["damaged"]
    last = train[-1] if train else None
    step = last["step"] if last else (ckpt or {}).get("step")
    tokens_seen = last.get("tokens_seen") if last else (ckpt or {}).get("tokens_seen")
    status.update(step=step, tokens_seen=tokens_seen)
    if last:
        recent = [r["tokens_per_s"] for r in train[-10:] if r.get("tokens_per_s")]
        tok_s = sum(recent) / len(recent) if recent else None
        status.update(loss=last["loss"], smoothed_loss=smoothed([r["loss"] for r in train]), tokens_per_s=tok_s)
        valid = [r for r in records if "valid/loss" in r]
        if valid:
            status["valid_loss"] = valid[-1]["valid/loss"]
        if tok_s and step and tokens_seen and max_steps:
            tokens_per_step = tokens_seen / step
            status["eta_s"] = max(0, max_steps - step) * tokens_per_step / tok_s
    status["wandb"] = wandb_info(run_dir, config)
    return status


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:d}:{m:02d}:{s:02d}"


def format_status(st: dict) -> str:
    lines = [f"run dir      {st['run_dir']}"]
    c = st["checkpoint"]
    h = st.get("running")
    if h is not None:
        job = f", SLURM job {h['slurm_job_id']}" if h.get("slurm_job_id") else ""
        lines.append(f"running      pid {h.get('pid')} on {h.get('host')}{job}, since {h.get('started')}")
    lines.append(f"checkpoint   {c['path']} (step {c['step']}, saved {c['saved_at']})" if c else "checkpoint   none yet")
    for damaged in st.get("damaged_checkpoints", []):
        lines.append(f"damaged      {damaged}: resume skips it")
    if st.get("step") is not None:
        of = f" of {st['max_steps']}" if st.get("max_steps") else ""
        done = f" ({100 * st['step'] / st['max_steps']:.1f}%)" if st.get("max_steps") else ""
        lines.append(f"step         {st['step']}{of}{done}")
    if st.get("tokens_seen") is not None:
        lines.append(f"tokens seen  {st['tokens_seen']:,}")
    if st.get("loss") is not None:
        lines.append(f"loss         {st['loss']:.4f} (smoothed {st['smoothed_loss']:.4f})"
                     + (f", valid {st['valid_loss']:.4f}" if "valid_loss" in st else ""))
    if st.get("tokens_per_s"):
        lines.append(f"throughput   {st['tokens_per_s']:,.0f} tokens/s (last 10 records)")
    if "eta_s" in st and math.isfinite(st["eta_s"]):
        lines.append(f"ETA          {_duration(st['eta_s'])} to step {st['max_steps']}" if st["eta_s"] else "ETA          done")
    wb = st["wandb"]
    if wb.get("url"):
        lines.append(f"W&B          {wb['url']}")
    elif wb.get("run_id"):
        lines.append(f"W&B          run id {wb['run_id']} ({wb['mode']})")
    if wb.get("sync"):
        lines.append(f"W&B sync     {wb['sync']}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="xlmr-status", description="Where an xlmr-pretrain run stands.")
    parser.add_argument("run_dir", type=Path, help="the run_dir of xlmr-pretrain")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        print(f"xlmr-status: error: {args.run_dir} is not a directory", file=sys.stderr)
        sys.exit(2)
    if not any((args.run_dir / name).exists() for name in (METRICS, CHECKPOINTS, LOCK_FILE)):
        print(f"xlmr-status: error: {args.run_dir} holds no metrics.jsonl or checkpoints/: "
              "not a run dir of xlmr-pretrain, or the run has not logged yet", file=sys.stderr)
        sys.exit(2)
    st = run_status(args.run_dir)
    print(json.dumps(st, indent=1) if args.json else format_status(st))


if __name__ == "__main__":
    main()
