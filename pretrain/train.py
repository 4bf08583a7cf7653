"""The training loop of `xlmr-pretrain`, top to bottom: setup, data, model, optimizer, the
loop (masking, loss normalization, DeepSpeed step), logging, validation, checkpoints.

`train(cfg)` is the whole story; the helpers below it only compute numbers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import time
from pathlib import Path
from typing import Optional

import torch

from data_prep.state import sha256_file
from pretrain import checkpoint, faults, preemption
from pretrain.interop.consolidate import load_model
from pretrain.config import PretrainConfig, PretrainError, check_config
from pretrain.data import (
    ShardError, build_train_loader, build_valid_loaders, carry_over_plan, languages, load_manifest,
)
from pretrain.data.phases import Mixture
from pretrain.distributed import (
    all_reduce_sum, broadcast_object, build_engine, init_distributed, resolve_precision, shutdown_distributed,
)
from pretrain.evaluation.mlm import evaluate_mlm, summarize
from pretrain.evaluation.probes import Probes, metrics_record, progress_line
from pretrain.masking import load_word_starts, mask_batch, masking_generator
from pretrain.metrics import MetricsLogger, flops_per_token, wandb_run_id
from pretrain.model import IGNORE_INDEX, XLMR, ModelConfig, num_parameters
from pretrain.optim import build_lr_scheduler, build_optimizer
from pretrain.schedules import mask_prob_at


def train(cfg: PretrainConfig, resolved_config: Optional[dict] = None) -> None:
    check_config(cfg)
    tr, ds = cfg.trainer, cfg.deepspeed
    run_dir = Path(cfg.run_dir)

    # ---- the data and its vocabulary decide the model's vocabulary ----------------------
    manifest = _load_manifest(cfg.data_dir)
    init = _init_weights(cfg, manifest) if cfg.init_from else None  # continued pretraining of an HF model
    model_cfg = _model_config(init.config if init else cfg.model, manifest)
    langs = languages(manifest)
    fingerprint = checkpoint.data_fingerprint(manifest)

    env = init_distributed()
    preemption.install()  # SIGUSR1/SIGTERM (SLURM): checkpoint and exit at the next step
    rank, world, device = env.rank, env.world_size, env.device
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 matmuls on tensor cores
    say = print if rank == 0 else (lambda *args, **kwargs: None)  # progress lines: rank 0 only
    run_lock = faults.lock_run_dir(run_dir, rank, tr.lock_wait_s, say)  # one trainer per run dir, until the end

    # ---- where we start: fresh, or the newest complete and undamaged checkpoint ------------
    resume_from = checkpoint.find_resume_checkpoint(run_dir, cfg.resume, say)
    resume_meta = checkpoint.check_compatible(resume_from, fingerprint, dataclasses.asdict(model_cfg)) if resume_from else None
    if rank == 0:  # under the lock: nobody else is saving
        for name in checkpoint.remove_incomplete(run_dir / checkpoint.CHECKPOINTS):
            say(f"removed {name}: a checkpoint save that was interrupted")
        checkpoint.keep_vocabulary(run_dir, cfg.data_dir, manifest)
    # Another world size or ZeRO stage than the checkpoint's: load it as a universal checkpoint.
    if resume_from and checkpoint.needs_universal(resume_meta, world, ds.zero_stage):
        say(f"resuming a checkpoint of {resume_meta['world_size']} rank(s), ZeRO {resume_meta['zero_stage']}, "
            f"on {world} rank(s), ZeRO {ds.zero_stage}: through its universal checkpoint")
        resume_from = _collective(lambda: checkpoint.universal_checkpoint(resume_from), rank)
        ds = dataclasses.replace(ds, extra={**ds.extra, "checkpoint": {**ds.extra.get("checkpoint", {}), "load_universal": True}})

    # ---- model, optimizer, schedule, DeepSpeed ---------------------------------------------
    torch.manual_seed(tr.seed)  # the same initial weights on every rank
    model = XLMR(model_cfg)
    if init and not resume_from:
        model.load_state_dict(init.model.state_dict())
        say(f"initialized from {init.source}")
    del init
    n_params = num_parameters(model)  # before ZeRO-3 partitions the weights away
    optimizer = build_optimizer(model, cfg.optim, max_grad_norm=ds.gradient_clipping if ds.zero_stage == 0 else 0.0)
    scheduler = build_lr_scheduler(optimizer, cfg.optim, tr.max_steps)
    engine = build_engine(model, optimizer, scheduler, ds, world)
    if tr.compile:
        engine.compile()
    torch.manual_seed(_rank_seed(tr.seed, rank))  # dropout: a different stream per rank

    state = {"step": 0, "tokens_seen": 0, "consumed_micro_batches": 0, "skipped_steps": 0, "wandb_run_id": None,
             "data_plan": None, "damaged_shards": [], **fingerprint}
    if resume_from:
        state.update(checkpoint.load_checkpoint(engine, resume_from, rank, world))
        say(f"resuming from step {state['step']} ({resume_from})")
    if rank == 0:  # a branch (resume= another run's checkpoint) is a W&B run of its own
        own = resume_from is not None and run_dir.resolve() in resume_from.resolve().parents
        state["wandb_run_id"] = wandb_run_id(run_dir, state["wandb_run_id"] if own else None)
    state["wandb_run_id"] = broadcast_object(state["wandb_run_id"])

    # ---- data: this rank's endless stream, positioned after what it already consumed -------
    try:
        mixture = Mixture(manifest, cfg.data.phases, cfg.data.alpha)  # data.phases: alpha, languages per step
        _check_phase_resume(resume_meta, cfg)
        saved_plan = state["data_plan"]
        state["data_plan"] = carry_over_plan(cfg.data_dir, manifest, cfg.data, saved_plan,
                                             state["consumed_micro_batches"], world, ds.micro_batch_size,
                                             ds.gradient_accumulation_steps, state["damaged_shards"])
        if saved_plan is not None and state["data_plan"] is not saved_plan:
            say(f"data position carried over from {saved_plan['layout']} to {state['data_plan']['layout']}: "
                "the unread rest of every language is dealt anew, no sample repeated or skipped")
        loader = build_train_loader(cfg.data_dir, manifest, cfg.data, rank, world, ds.micro_batch_size,
                                    state["consumed_micro_batches"], state["data_plan"], ds.gradient_accumulation_steps,
                                    state["damaged_shards"])
        valid_loaders = build_valid_loaders(cfg.data_dir, manifest, cfg.data, rank, world, ds.micro_batch_size)
    except (OSError, ValueError, ShardError) as exc:
        raise PretrainError(str(exc)) from None
    with _rng_untouched(device):  # creating a DataLoader iterator draws from torch's RNG
        batches = iter(loader)

    config_dict = resolved_config or dataclasses.asdict(cfg)
    logger = MetricsLogger(run_dir, cfg.wandb, rank, state["wandb_run_id"], config_dict,
                           resumed_step=state["step"] if resume_from else None)
    meta = {**fingerprint, "model": dataclasses.asdict(model_cfg), "config": config_dict, "world_size": world,
            "zero_stage": ds.zero_stage, "precision": resolve_precision(ds), "languages": langs}
    gas, seq_len, V = ds.gradient_accumulation_steps, manifest["seq_len"], model_cfg.vocab_size
    stop_at = min(tr.max_steps, tr.stop_at_step or tr.max_steps)
    say(f"model {n_params / 1e6:.1f}M parameters ({model_cfg.num_layers} layers x "
        f"{model_cfg.hidden_size}, vocab {V}); {world} rank(s), ZeRO {ds.zero_stage}, {meta['precision']}; "
        f"{world * gas * ds.micro_batch_size} sequences x {seq_len} tokens per step; "
        f"{len(langs)} languages; run dir {run_dir}")

    # ---- the loop --------------------------------------------------------------------------
    word_start = load_word_starts(Path(cfg.data_dir) / manifest["vocab"]["spm_model"]) if cfg.masking.whole_word else None
    probes = Probes(cfg.probe, Path(cfg.data_dir) / manifest["vocab"]["spm_model"], model_cfg.num_layers,
                    say) if tr.probe_every else None  # cross-lingual probes: evaluation/probes.py
    interval = _Interval(len(langs))
    nonfinite_in_row = 0
    preempted = False
    shown_phase = None
    engine.train()
    while state["step"] < stop_at:
        step = state["step"]
        lr = engine.get_lr()[0]
        phase = mixture.phase_at(step)
        mask_prob = mask_prob_at(step, cfg.masking, tr.max_steps, mixture.phases[phase].mask_prob)
        if phase != shown_phase:
            shown_phase = phase
            say(f"step {step}: phase {phase}, alpha {mixture.alphas[phase]}, languages {' '.join(mixture.in_play(step))}")
        t0 = time.perf_counter()
        micro_batches = [next(batches) for _ in range(gas)]  # the whole step's data, ahead
        interval.data_wait += time.perf_counter() - t0
        faults.note_damaged_shards(micro_batches, state, step + 1, cfg.data.on_damaged_shard == "skip", say)
        # Masks depend only on (seed, step, rank, micro-batch): a resumed run masks the same.
        masked = [mask_batch(b["input_ids"], cfg.masking, masking_generator(tr.seed, step, rank, k), vocab_size=V,
                             word_start=word_start, mask_prob=mask_prob) for k, b in enumerate(micro_batches)]

        # The step's loss is the mean over every masked token of the accumulated batch on all
        # ranks, not a mean of per-micro-batch means. Each micro-batch contributes its loss SUM
        # times world / total: DeepSpeed averages gradients over ranks (/ world) and, with
        # scale_wrt_gas=False, does not divide by the accumulation steps again.
        local_masked = sum(int(labels.ne(IGNORE_INDEX).sum()) for _, labels in masked)
        total_masked = all_reduce_sum(torch.tensor([float(local_masked)], device=device))
        scale = world / total_masked.clamp(min=1.0)
        sums = torch.zeros(_Interval.width(len(langs)), dtype=torch.float64, device=device)
        for (input_ids, labels), batch in zip(masked, micro_batches):
            out = engine(input_ids.to(device), labels.to(device))
            engine.backward(out.loss_sum * scale, scale_wrt_gas=False)
            engine.step()  # DeepSpeed updates at the last micro-batch of the step only
            sums += _micro_batch_sums(out, batch, len(langs), model_cfg.pad_id, device)
        sums = all_reduce_sum(sums).cpu()

        state["step"] = step = step + 1
        state["consumed_micro_batches"] += gas
        state["tokens_seen"] += int(sums[3])
        if math.isfinite(float(sums[0])) and engine.was_step_applied():
            nonfinite_in_row = 0
            interval.add(sums, lr, engine.get_global_grad_norm())
        else:  # NaN/inf: DeepSpeed (or optim.AdamW at ZeRO 0) left weights and moments untouched
            interval.add(sums, lr, None, finite=False)
            state["skipped_steps"] += 1
            nonfinite_in_row += 1
            say(f"step {step}: loss or gradients not finite, update skipped ({nonfinite_in_row} in a row)")
            if nonfinite_in_row >= tr.max_nonfinite_steps:
                raise PretrainError(
                    f"the loss was NaN/inf for {nonfinite_in_row} steps in a row (up to step {step}): "
                    f"lower optim.lr, check the data, or raise trainer.max_nonfinite_steps")

        if step % tr.log_every == 0 or step == stop_at:
            record = interval.record(langs, state, model_cfg, seq_len, tr.peak_flops, world, device)
            record.update(phase=phase, alpha=mixture.alphas[phase], languages_in_play=len(mixture.in_play(step - 1)),
                          mask_prob=mask_prob, damaged_shards=len(state["damaged_shards"]))
            logger.log(step, record)
            say(_progress_line(step, tr.max_steps, record))
            interval = _Interval(len(langs))

        if (tr.eval_every and step % tr.eval_every == 0) or (tr.eval_at_end and step == tr.max_steps):
            if valid_loaders:
                with _rng_untouched(device):  # validation must not shift the training's dropout
                    record = _evaluate(engine, valid_loaders, cfg, V, word_start, device)
                logger.log(step, record)
                say(f"step {step:>6} | valid loss {record['valid/loss']:.4f} | valid acc {record['valid/accuracy']:.3f}")

        if probes and (step % tr.probe_every == 0 or step == tr.max_steps):
            with _rng_untouched(device):  # the probes draw no random numbers; this keeps it so
                record = metrics_record(probes.run(engine.module, device, rank, world, all_reduce_sum))
            logger.log(step, record)
            say(progress_line(step, record))

        preempted = preemption.stop_requested(device) and step < stop_at  # collective: all ranks agree
        if step % tr.save_every == 0 or step == stop_at or preempted:
            path = checkpoint.save_checkpoint(engine, run_dir, state, meta, tr.keep_last, rank)
            say(f"saved checkpoint {path}")
        if preempted:
            say(f"stopping at step {step} on a signal (exit code {preemption.EXIT_PREEMPTED}: requeue me)")
            break

    if resume_from and state["step"] == resume_meta["step"]:
        say(f"nothing to do: the checkpoint is at step {state['step']} (trainer.max_steps={tr.max_steps})")
    logger.close()  # rank 0 may still be closing W&B: the others wait in the shutdown's barrier
    shutdown_distributed()
    run_lock.release()
    if preempted:
        preemption.exit_preempted()


# ---- helpers: numbers for the loop ------------------------------------------------------


def _load_manifest(data_dir: str) -> dict:
    try:
        manifest = load_manifest(data_dir)
    except (OSError, ValueError) as exc:
        raise PretrainError(str(exc)) from None
    if not manifest.get("shards"):
        raise PretrainError(f"data dir {data_dir}: the manifest lists no shards: re-run xlmr-prep")
    return manifest


def _model_config(cfg: ModelConfig, manifest: dict) -> ModelConfig:
    """The model config with the vocabulary taken from (and checked against) the manifest."""
    vocab = manifest["vocab"]
    size, special = vocab["size"], vocab["special_ids"]
    if cfg.vocab_size not in (0, size):
        raise PretrainError(f"model.vocab_size={cfg.vocab_size} but the data's vocabulary has {size} ids: "
                            "set model.vocab_size=0 to take it from the manifest")
    if special.get("pad") != cfg.pad_id or special.get("mask") != size - 1:
        raise PretrainError(f"the data's special ids {special} do not match the model (pad {cfg.pad_id}, "
                            f"<mask> last = {size - 1}): re-run xlmr-prep with this version")
    if manifest["seq_len"] + cfg.pad_id + 1 > cfg.max_positions:
        raise PretrainError(f"the data's seq_len {manifest['seq_len']} needs model.max_positions >= "
                            f"{manifest['seq_len'] + cfg.pad_id + 1} (is {cfg.max_positions})")
    return dataclasses.replace(cfg, vocab_size=size)


def _init_weights(cfg: PretrainConfig, manifest: dict):
    """The HF-format model of init_from (architecture and weights; dropout and activation
    checkpointing stay model.*), checked to have the data's vocabulary."""
    init = load_model(cfg.init_from)
    if sha256_file(init.spm_model) != manifest["vocab"]["sha256"]:
        raise PretrainError(
            f"init_from={cfg.init_from}: its vocabulary ({init.spm_model}) is not the one data_dir was encoded "
            f"with: prepare the data with vocab.model={init.spm_model} to keep the model's vocabulary")
    keep = {k: getattr(cfg.model, k) for k in ("dropout", "attention_dropout", "activation_checkpointing")}
    init.config = dataclasses.replace(init.config, **keep)
    return init


def _collective(make, rank: int):
    """make() on rank 0, its result (or its PretrainError) on every rank."""
    result, error = None, None
    if rank == 0:
        try:
            result = make()
        except PretrainError as exc:
            error = str(exc)
    result, error = broadcast_object((result, error))
    if error:
        raise PretrainError(error)
    return result


def _check_phase_resume(resume_meta: Optional[dict], cfg: PretrainConfig) -> None:
    """With phases, the loader finds a micro-batch's phase as its index // the accumulation
    steps: a resume with other accumulation steps would misplace the draws already made."""
    if not resume_meta or not cfg.data.phases:
        return
    saved = resume_meta["config"]["deepspeed"]["gradient_accumulation_steps"]
    if saved != cfg.deepspeed.gradient_accumulation_steps:
        raise PretrainError(f"deepspeed.gradient_accumulation_steps={cfg.deepspeed.gradient_accumulation_steps} but the "
                            f"checkpoint was made with {saved}: with data.phases keep it (change micro_batch_size or ranks instead)")


def _rank_seed(seed: int, rank: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"dropout/{seed}/{rank}".encode(), digest_size=7).digest(), "little")


@contextlib.contextmanager
def _rng_untouched(device: torch.device):
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield


class _Interval:
    """Sums between two metrics records. A step's all-reduced vector holds: loss sum, masked
    tokens, correct predictions, non-pad tokens, sequences, positions, then per language the
    loss sums, the masked tokens and the non-pad tokens."""

    def __init__(self, num_langs: int):
        self.sums, self.num_langs = torch.zeros(self.width(num_langs), dtype=torch.float64), num_langs
        self.steps, self.data_wait = 0, 0.0
        self.grad_norm: Optional[float] = None
        self.lr = 0.0
        self.started = time.perf_counter()

    @staticmethod
    def width(num_langs: int) -> int:
        return 6 + 3 * num_langs

    def add(self, sums: torch.Tensor, lr: float, grad_norm, finite: bool = True) -> None:
        """A skipped (non-finite) step counts for throughput, not for loss and accuracy."""
        if finite:
            self.sums += sums
            self.grad_norm = None if grad_norm is None else float(grad_norm)
        else:
            self.sums[3:6] += sums[3:6]
            self.sums[6 + 2 * self.num_langs:] += sums[6 + 2 * self.num_langs:]  # tokens per language
        self.steps += 1
        self.lr = lr

    def record(self, langs, state, model_cfg, seq_len, peak_flops, world, device) -> dict:
        elapsed = time.perf_counter() - self.started
        s = self.sums.tolist()
        loss_sum, masked, correct, tokens, samples, positions = s[:6]
        n = len(langs)
        record = {
            "loss": loss_sum / masked if masked else None,
            "accuracy": correct / masked if masked else None,
            "lr": self.lr,
            "grad_norm": self.grad_norm,
            "tokens_per_s": tokens / elapsed,
            "samples_per_s": samples / elapsed,
            "data_wait_s": self.data_wait / max(1, self.steps),
            "skipped_steps": state["skipped_steps"],
            "tokens_seen": state["tokens_seen"],
        }
        record["masked_fraction"] = masked / tokens if tokens else None  # measured: masked of non-pad tokens
        for lang, lang_loss, lang_masked, lang_tokens in zip(langs, s[6:6 + n], s[6 + n:6 + 2 * n], s[6 + 2 * n:]):
            if lang_masked:
                record[f"lang_loss/{lang}"] = lang_loss / lang_masked
            record[f"lang_share/{lang}"] = lang_tokens / tokens if tokens else 0.0  # of the interval's tokens
        if device.type == "cuda" and positions:
            achieved = flops_per_token(model_cfg, seq_len, masked / positions) * positions / elapsed
            record["mfu"] = achieved / (peak_flops * world)
            record["gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        return record


def _micro_batch_sums(out, batch, num_langs: int, pad_id: int, device) -> torch.Tensor:
    lang = batch["lang"].to(device)
    input_ids = batch["input_ids"]
    per_lang_loss = torch.zeros(num_langs, dtype=torch.float64, device=device).index_add_(
        0, lang, out.seq_loss_sum.double())
    per_lang_masked = torch.zeros(num_langs, dtype=torch.float64, device=device).index_add_(
        0, lang, out.seq_num_masked.double())
    per_lang_tokens = torch.zeros(num_langs, dtype=torch.float64, device=device).index_add_(
        0, lang, input_ids.ne(pad_id).sum(dim=1).double().to(device))
    head = torch.tensor([
        float(out.loss_sum.detach()), float(out.num_masked), float(out.num_correct),
        float(input_ids.ne(pad_id).sum()), float(input_ids.shape[0]), float(input_ids.numel()),
    ], dtype=torch.float64, device=device)
    return torch.cat([head, per_lang_loss, per_lang_masked, per_lang_tokens])


def _evaluate(engine, valid_loaders: dict, cfg: PretrainConfig, V: int, word_start, device) -> dict:
    """Per-language MLM loss on the held-out shards (pretrain/evaluation/mlm.py): masks fixed per
    sequence, so the numbers do not depend on the world size and equal `xlmr-eval` on this
    step's checkpoint. Every rank runs the same number of forwards, as ZeRO-3 needs."""
    engine.eval()
    sums = evaluate_mlm(engine, valid_loaders, cfg.masking, seed=cfg.trainer.seed, vocab_size=V, word_start=word_start,
                        device=device)
    engine.train()
    result = summarize(list(valid_loaders), all_reduce_sum(sums).cpu())
    record = {"valid/loss": result["all"]["loss"], "valid/accuracy": result["all"]["accuracy"]}
    for lang, row in result["languages"].items():
        if row["masked_tokens"]:
            record[f"valid_lang_loss/{lang}"] = row["loss"]
    return record


def _progress_line(step: int, max_steps: int, r: dict) -> str:
    parts = [f"step {step:>6}/{max_steps}"]
    if r["loss"] is not None:
        parts += [f"loss {r['loss']:.4f}", f"acc {r['accuracy']:.3f}"]
    parts += [f"lr {r['lr']:.2e}"]
    if r["grad_norm"] is not None:
        parts.append(f"grad norm {r['grad_norm']:.3f}")
    parts += [f"{r['tokens_per_s']:,.0f} tok/s", f"data wait {r['data_wait_s'] * 1000:.0f} ms/step"]
    if "mfu" in r:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    return " | ".join(parts)
