"""The edge between the training loop and the machines: process-group setup from torchrun's
or SLURM's environment, the DeepSpeed JSON built from the Hydra config, and the engine.

Same code on a laptop CPU (gloo, DS_ACCELERATOR=cpu), one GPU, or many GPUs on many nodes
(NCCL); only the environment differs.
"""
from __future__ import annotations

import logging
import os
import socket
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

# DeepSpeed picks its accelerator when imported; without a GPU it must be told to use the CPU.
if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"

import deepspeed  # noqa: E402
from deepspeed.utils import logger as deepspeed_logger  # noqa: E402

from pretrain.cluster.slurm import task_env  # noqa: E402
from pretrain.config import DeepSpeedConfig, PretrainError  # noqa: E402
from pretrain.opbuild import check_op_build  # noqa: E402


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rendezvous_env(env) -> dict[str, str]:
    """What init_distributed adds to the environment (see its docstring): nothing under
    torchrun, an srun task's variables, or a single process's."""
    if "RANK" in env:
        return {}
    if "SLURM_PROCID" in env:
        return task_env(env)
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}


def init_distributed() -> DistEnv:
    """Join the process group: torchrun's RANK/WORLD_SIZE/LOCAL_RANK, else SLURM's task
    variables (`srun` with one task per GPU), else a single process.

    The one rendezvous rule: a port two runs on one node never share. torchrun: its own
    (`--standalone` picks a free one); srun (direct, or through `pretrain.cluster.slurm launch`):
    the port derived from the job id and restart count (cluster/slurm.py master_port); a single
    process: a free port of its own, whatever MASTER_PORT the shell has."""
    env = os.environ
    env.update(rendezvous_env(env))
    if env["RANK"] == "0" or env.get("LOCAL_RANK") == "0":
        check_op_build(print if env["RANK"] == "0" else (lambda *args, **kwargs: None))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    deepspeed_logger.setLevel(logging.WARNING)  # its INFO lines would bury the progress lines
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def resolve_precision(cfg: DeepSpeedConfig) -> str:
    """auto: bf16 where the GPU has it and ZeRO >= 1 (see below), else fp32."""
    if cfg.precision == "auto":
        gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return "bf16" if gpu_bf16 and cfg.zero_stage >= 1 else "fp32"
    if cfg.precision == "bf16" and cfg.zero_stage == 0:
        # DeepSpeed accumulates bf16 gradients in fp32 only inside its ZeRO optimizers; at
        # stage 0 it would sum micro-batch gradients in bf16 and lose the small ones.
        raise PretrainError(
            "deepspeed.precision=bf16 needs deepspeed.zero_stage >= 1 (fp32 gradient accumulation): "
            "use deepspeed=zero1 (on one GPU it costs nothing)"
        )
    return cfg.precision


def deepspeed_config(cfg: DeepSpeedConfig, world_size: int) -> dict:
    """The DeepSpeed JSON for this run. The training loop calls backward() with
    scale_wrt_gas=False because it normalizes the loss itself (see train.py)."""
    bf16 = resolve_precision(cfg) == "bf16"
    config = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.micro_batch_size * cfg.gradient_accumulation_steps * world_size,
        # At ZeRO stage 0 optim.AdamW clips (and reports the norm, which DeepSpeed does not).
        "gradient_clipping": cfg.gradient_clipping if cfg.zero_stage > 0 else 0.0,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": bf16},
        # Our AdamW subclass (optim.AdamW) is torch's AdamW plus a NaN guard.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if bf16:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return _merge(config, cfg.extra)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in (extra or {}).items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build_engine(model, optimizer, lr_scheduler, cfg: DeepSpeedConfig, world_size: int):
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
        config=deepspeed_config(cfg, world_size), dist_init_required=False,
    )
    return engine


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown_distributed() -> None:
    """All ranks leave together and close the process group: a rank that exits while others
    still use the group can abort in the backend's teardown ("terminate called without an
    active exception"), and torchrun then kills the rest."""
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def all_gather_object(obj) -> list:
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def broadcast_object(obj):
    """Rank 0's obj on every rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj
