"""`xlmr-bench`: training throughput of the real `xlmr-pretrain` path on one device, against
its data loader and against HF transformers.

For each model size (base and large on a GPU; the tiny model on a CPU, as a smoke test):
  1. ours    the real trainer, `pretrain.train.train` (DeepSpeed engine, our model, dynamic
             masking, the shard loader), for warmup_steps + steps steps in a fresh run dir.
             Tokens/s, samples/s, MFU and peak memory come from its metrics.jsonl records of
             the timed steps: log_every divides warmup_steps, so no record mixes the two.
  2. loader  the real train loader alone, same micro batch and workers: samples/s, and the
             headroom = loader samples/s / samples/s the training step consumed (< 1: the
             loader is the bottleneck).
  3. HF      `transformers.XLMRobertaForMaskedLM` of the same size, vocabulary, micro batch and
             sequence length (sdpa attention, torch AdamW, bf16 autocast on a GPU, fp32 on a
             CPU, the same gradient clipping), on batches of the same loader masked by the
             same `mask_batch`, made ahead so its timed loop does no data work; timed over the
             same steps after the same warmup.
ours and HF each run in a fresh process (in_fresh_process). Prints one table and writes it
as JSON. docs/performance.md explains the numbers.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from data_prep.atomic import write_json
from pretrain.cli import CONF_DIR
from pretrain.config import PretrainConfig, PretrainError, check_config, register_configs
from pretrain.data import build_train_loader, load_manifest
from pretrain.interop.hf_convert import hf_config_kwargs
from pretrain.masking import mask_batch, masking_generator
from pretrain.metrics import METRICS_FILE, read_metrics


@dataclass
class BenchConfig:
    data_dir: str = "data/sample"  # xlmr-prep output: seq_len and vocabulary come from its manifest
    work_dir: str = "runs/bench"
    models: Optional[List[str]] = None  # None: [base, large] on a GPU, [tiny] on a CPU
    micro_batch_size: Dict[str, int] = field(default_factory=lambda: {"tiny": 8, "base": 32, "large": 16})
    steps: int = 100  # timed optimizer steps
    warmup_steps: int = 10  # untimed steps before them
    precision: str = "auto"  # auto | bf16 | fp32, as deepspeed.precision
    zero_stage: int = 1
    hf_baseline: bool = True
    loader_headroom: bool = True
    loader_batches: int = 200
    compile: bool = False
    pretrain_overrides: List[str] = field(default_factory=list)  # more xlmr-pretrain key=value
    out: str = "${work_dir}/bench.json"


# The printed table: (header, JSON key, format).
COLUMNS = [
    ("model", "model", "{}"),
    ("micro batch", "micro_batch_size", "{}"),
    ("tokens/s", "tokens_per_s", "{:,.0f}"),
    ("samples/s", "samples_per_s", "{:,.1f}"),
    ("MFU", "mfu", "{:.1%}"),
    ("peak GB", "peak_gb", "{:.1f}"),
    ("loader headroom", "loader_headroom", "{:.1f}x"),
    ("HF tokens/s", "hf_tokens_per_s", "{:,.0f}"),
    ("ours/HF", "ours_vs_hf", "{:.2f}x"),
]


def check_bench_config(cfg: BenchConfig, models: List[str]) -> None:
    """Value checks before anything heavy starts; raises PretrainError naming the key."""
    problems = []
    if cfg.steps < 1 or cfg.warmup_steps < 1 or cfg.loader_batches < 1:
        problems.append(f"steps={cfg.steps}, warmup_steps={cfg.warmup_steps}, loader_batches={cfg.loader_batches}: "
                        "each must be >= 1 (the first step allocates and picks kernels: never time it)")
    if cfg.precision not in ("auto", "bf16", "fp32"):
        problems.append(f"precision={cfg.precision}: must be auto, bf16 or fp32")
    elif cfg.precision == "bf16" and not torch.cuda.is_available():
        problems.append("precision=bf16 needs a GPU (the CPU smoke test runs in fp32: precision=auto)")
    known = sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml"))
    if not models:
        problems.append("models is empty: name at least one of " + ", ".join(known))
    for name in models:
        if name not in known:
            problems.append(f"models: unknown model {name!r} (conf/model/ has {', '.join(known)})")
        elif cfg.micro_batch_size.get(name, 0) < 1:
            problems.append(f"micro_batch_size.{name}={cfg.micro_batch_size.get(name)}: must be >= 1")
    if problems:
        raise PretrainError("; ".join(problems))


def pretrain_config(cfg: BenchConfig, model: str, run_dir: Path) -> tuple[PretrainConfig, dict]:
    """xlmr-pretrain's own config (conf/pretrain.yaml) for a short, fresh, timed run: records
    every gcd(warmup, steps) steps (so one ends exactly at the warmup), no validation, no
    W&B, no checkpoint before the one the trainer always writes at the end (after the timed
    steps' last record)."""
    max_steps = cfg.warmup_steps + cfg.steps
    overrides = [
        f"model={model}", f"data_dir={cfg.data_dir}", f"run_dir={run_dir}", "resume=never",
        f"deepspeed.zero_stage={cfg.zero_stage}", f"deepspeed.precision={cfg.precision}",
        f"deepspeed.micro_batch_size={cfg.micro_batch_size[model]}", "deepspeed.gradient_accumulation_steps=1",
        f"trainer.max_steps={max_steps}", "trainer.stop_at_step=null",
        f"trainer.log_every={math.gcd(cfg.warmup_steps, cfg.steps)}", f"trainer.save_every={max_steps + 1}",
        "trainer.eval_every=0", "trainer.eval_at_end=false", f"trainer.compile={cfg.compile}", "wandb.mode=disabled",
        *cfg.pretrain_overrides,
    ]
    try:
        composed = hydra.compose(config_name="pretrain", overrides=overrides)
    except HydraException as exc:  # Hydra says what failed, its cause (OmegaConf's) says why
        why = [str(e).splitlines()[0].rstrip(".") for e in (exc, exc.__cause__) if e is not None and str(e)]
        raise PretrainError("pretrain_overrides: " + ": ".join(why)) from None
    pcfg: PretrainConfig = OmegaConf.to_object(composed)
    check_config(pcfg)
    return pcfg, OmegaConf.to_container(composed, resolve=True)


def run_ours(pcfg: PretrainConfig, resolved: dict, warmup: int) -> dict:
    """Train for real, then sum the records after the warmup. A record holds rates over its
    interval; its seconds are its tokens (the rise of tokens_seen) over its tokens/s."""
    from pretrain.train import train  # imports DeepSpeed

    train(pcfg, resolved_config=resolved)
    run_dir = Path(pcfg.run_dir)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the final save of a benchmark: useless, GBs
    records = [r for r in read_metrics(run_dir / METRICS_FILE) if "tokens_per_s" in r]
    start = next(r for r in records if r["step"] == warmup)
    prev_step, prev_tokens = warmup, start["tokens_seen"]
    seconds = samples = wait = mfu_seconds = 0.0
    peak = None
    for r in records:
        if r["step"] <= warmup:
            continue
        t = (r["tokens_seen"] - prev_tokens) / r["tokens_per_s"]
        seconds += t
        samples += r["samples_per_s"] * t
        wait += r["data_wait_s"] * (r["step"] - prev_step)
        if "mfu" in r:  # GPU only: MFU and memory are meaningless on a CPU
            mfu_seconds += r["mfu"] * t
            peak = max(peak or 0.0, r["gpu_memory_gb"])
        prev_step, prev_tokens = r["step"], r["tokens_seen"]
    tokens = prev_tokens - start["tokens_seen"]
    return {
        "tokens_per_s": tokens / seconds, "samples_per_s": samples / seconds,
        "mfu": mfu_seconds / seconds if peak is not None else None, "peak_gb": peak,
        "data_wait_ms": 1000 * wait / (prev_step - warmup),
        "timed_steps": prev_step - warmup, "timed_tokens": tokens, "timed_seconds": seconds,
    }


def loader_samples_per_s(pcfg: PretrainConfig, manifest: dict, batches: int) -> float:
    """The real train loader alone, as the trainer builds it (rank 0 of 1). Timing starts once
    the workers are up and the batches they prefetched meanwhile are taken."""
    loader = build_train_loader(pcfg.data_dir, manifest, pcfg.data, 0, 1, pcfg.deepspeed.micro_batch_size)
    stream = iter(loader)
    for _ in range(pcfg.data.num_workers * pcfg.data.prefetch_factor + 1):
        next(stream)
    start, samples = time.perf_counter(), 0
    for batch in itertools.islice(stream, batches):
        samples += batch["input_ids"].shape[0]
    elapsed = time.perf_counter() - start
    del stream  # shuts the workers down
    return samples / elapsed


def run_hf(pcfg: PretrainConfig, manifest: dict, precision: str, warmup: int, steps: int, compile_model: bool) -> dict:
    """HF XLMRobertaForMaskedLM as a user of HF's Trainer would train it, same shapes and masks."""
    import transformers

    m, tr, opt = pcfg.model, pcfg.trainer, pcfg.optim
    vocab, pad = manifest["vocab"]["size"], m.pad_id
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Batches of the same loader (read in this process), masked as the trainer masks step k.
    data = dataclasses.replace(pcfg.data, num_workers=0)
    loader = build_train_loader(pcfg.data_dir, manifest, data, 0, 1, pcfg.deepspeed.micro_batch_size)
    batches = [mask_batch(b["input_ids"], pcfg.masking, masking_generator(tr.seed, k, 0), vocab_size=vocab)
               for k, b in enumerate(itertools.islice(loader, warmup + steps))]
    timed_tokens = sum(int(ids.ne(pad).sum()) for ids, _ in batches[warmup:])

    torch.manual_seed(tr.seed)
    config = transformers.XLMRobertaConfig(**hf_config_kwargs(dataclasses.replace(m, vocab_size=vocab)),
                                           attn_implementation="sdpa")
    model = transformers.XLMRobertaForMaskedLM(config).to(device).train()
    if m.activation_checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
                                  weight_decay=opt.weight_decay, fused=device.type == "cuda")
    forward = torch.compile(model) if compile_model else model
    clip = pcfg.deepspeed.gradient_clipping

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for k, (input_ids, labels) in enumerate(batches):
        if k == warmup:
            sync()
            start = time.perf_counter()
        input_ids, labels = input_ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = forward(input_ids=input_ids, attention_mask=input_ids.ne(pad), labels=labels).loss
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync()
    seconds = time.perf_counter() - start
    return {
        "hf_tokens_per_s": timed_tokens / seconds,
        "hf_peak_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def in_fresh_process(measure: Callable[..., dict], *args) -> Optional[dict]:
    """measure(*args) in a new (spawned) process; None if it ran out of GPU memory. A fresh
    process per measurement is what makes peak memory honest: DeepSpeed keeps its engine,
    with the weights and optimizer state, alive after train() returns."""
    ctx = multiprocessing.get_context("spawn")  # fork is unsafe once CUDA is initialized
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(send, measure, args))
    process.start()
    send.close()
    try:
        status, value = receive.recv()
    except EOFError:  # it crashed: its traceback is on stderr
        process.join()
        raise PretrainError(f"{measure.__name__} failed (exit code {process.exitcode}): see above") from None
    process.join()
    if status == "error":
        raise PretrainError(value)
    return value if status == "ok" else None


def _child(send, measure: Callable[..., dict], args) -> None:
    try:
        send.send(("ok", measure(*args)))
    except torch.cuda.OutOfMemoryError:
        send.send(("out_of_memory", None))
    except PretrainError as exc:
        send.send(("error", str(exc)))


def format_table(rows: List[dict]) -> str:
    """A Markdown table, n/a where a number does not apply (MFU and memory on a CPU) or a side
    ran out of memory (listed under the table)."""
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "n/a" for _, key, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [f"out of memory: {row['model']} ({', '.join(row['out_of_memory'])})" for row in rows if row["out_of_memory"]]
    return "\n".join(lines)


def run_bench(cfg: BenchConfig) -> dict:
    on_gpu = torch.cuda.is_available()
    models = list(cfg.models) if cfg.models is not None else (["base", "large"] if on_gpu else ["tiny"])
    check_bench_config(cfg, models)
    try:
        manifest = load_manifest(cfg.data_dir)
    except (OSError, ValueError) as exc:
        raise PretrainError(str(exc)) from None
    work_dir = Path(cfg.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # Every config is composed (and checked) before the first model trains.
    configs = {name: pretrain_config(cfg, name, Path(tempfile.mkdtemp(prefix=f"{name}-{stamp}-", dir=work_dir)))
               for name in models}

    from pretrain.config import DeepSpeedConfig
    from pretrain.distributed import resolve_precision  # imports DeepSpeed

    precision = resolve_precision(DeepSpeedConfig(zero_stage=cfg.zero_stage, precision=cfg.precision))
    device = torch.cuda.get_device_name() if on_gpu else f"CPU ({os.cpu_count()} cores, no GPU)"
    results = {
        "device": device, "date": time.strftime("%Y-%m-%d"), "seq_len": manifest["seq_len"],
        "vocab_size": manifest["vocab"]["size"], "precision": precision, "zero_stage": cfg.zero_stage,
        "steps": cfg.steps, "warmup_steps": cfg.warmup_steps, "compile": cfg.compile, "rows": [],
    }
    print(f"xlmr-bench on {device}: seq_len {results['seq_len']}, vocabulary {results['vocab_size']:,}, "
          f"{precision}, ZeRO {cfg.zero_stage}, {cfg.steps} timed steps after {cfg.warmup_steps}", flush=True)

    for name, (pcfg, resolved) in configs.items():
        row = {"model": name, "micro_batch_size": pcfg.deepspeed.micro_batch_size, "run_dir": pcfg.run_dir,
               "out_of_memory": []}
        measurements = [("ours", run_ours, (pcfg, resolved, cfg.warmup_steps))]
        if cfg.hf_baseline:
            measurements.append(("hf", run_hf, (pcfg, manifest, precision, cfg.warmup_steps, cfg.steps, cfg.compile)))
        for side, measure, args in measurements:
            result = in_fresh_process(measure, *args)
            if result is None:
                print(f"{name}: {side} ran out of GPU memory at micro batch {row['micro_batch_size']}", flush=True)
                row["out_of_memory"].append(side)
            row.update(result or {})
        if cfg.loader_headroom:
            row["loader_samples_per_s"] = loader_samples_per_s(pcfg, manifest, cfg.loader_batches)
            if "samples_per_s" in row:
                row["loader_headroom"] = row["loader_samples_per_s"] / row["samples_per_s"]
        if "tokens_per_s" in row and "hf_tokens_per_s" in row:
            row["ours_vs_hf"] = row["tokens_per_s"] / row["hf_tokens_per_s"]
        results["rows"].append(row)

    print("\n" + format_table(results["rows"]), flush=True)
    if cfg.out:
        write_json(Path(cfg.out), results)
        print(f"\nwrote {cfg.out}")
    return results


@hydra.main(config_path=CONF_DIR, config_name="bench", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    try:
        run_bench(OmegaConf.to_object(cfg))
    except PretrainError as exc:
        print(f"xlmr-bench: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


def main() -> None:
    register_configs()  # the trainer's schema: each model's run is composed from conf/pretrain.yaml
    ConfigStore.instance().store(name="bench_schema", node=BenchConfig)
    _app()


if __name__ == "__main__":
    main()
