"""The `xlmr-submit` command: the whole pipeline as chained SLURM jobs.

    xlmr-submit input_dir=/data/cc100 output_dir=/data/xlmr run_dir=/runs/base model=base \\
        slurm.partition=gpu slurm.nodes=4 slurm.ntasks_per_node=8 slurm.gpus_per_node=8

submits slurm/prep_clean.sbatch, prep_dedup.sbatch and prep_apply.sbatch (three job arrays)
-> slurm/prep_vocab.sbatch -> slurm/prep_encode.sbatch (a job array) -> slurm/prep_merge.sbatch
-> slurm/pretrain.sbatch, each `--dependency=afterok:` on the one before, and prints the job
ids. Resources come from this command's config (conf/submit.yaml,
schema `SubmitConfig` below), never from editing the scripts: sbatch's command-line options
override the scripts' #SBATCH lines.

Every other `key=value` is an `xlmr-prep` or `xlmr-pretrain` override: it is checked against
both configs (Hydra composes them here, so a typo fails before anything is submitted) and
passed to the jobs whose config has the key. `output_dir` (prep) doubles as `data_dir`
(pretrain) when only one of them is given.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

REPO = Path(__file__).resolve().parents[2]
CONF_DIR = str(REPO / "conf")
SCRIPTS = REPO / "slurm"
JOBS = ("clean", "dedup", "apply", "vocab", "encode", "merge", "pretrain")
PREP_JOBS = JOBS[:6]
ARRAYS = {"clean": "clean_tasks", "dedup": "dedup_tasks", "apply": "apply_tasks", "encode": "encode_tasks"}  # job: its array size key


@dataclass
class PrepSlurmConfig:
    """Resources of the prep jobs (CPU only); array sizes: see the README's cluster workflow."""
    clean_tasks: int = 16        # array tasks of the clean job (each gets a share of the clean parts)
    dedup_tasks: int = 4         # array tasks of the dedup job (each gets a share of the buckets)
    apply_tasks: int = 16        # array tasks of the apply job (each filters a share of the clean parts)
    encode_tasks: int = 4        # array tasks of the encode job (each gets a share of the chunks)
    cpus_per_task: int = 8       # also xlmr-prep's workers
    time: str = "04:00:00"
    mem: Optional[str] = None    # e.g. 64G; null: the partition's default


@dataclass
class SlurmConfig:
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    nodes: int = 1
    ntasks_per_node: int = 1     # one task per GPU
    gpus_per_node: int = 0       # 0: CPU tasks, gloo
    cpus_per_task: int = 1       # data loader workers and CPU threads per rank
    mem: Optional[str] = None
    time: str = "24:00:00"       # per job; longer runs requeue themselves and resume
    signal_before_s: int = 120   # USR1 this long before the time limit: checkpoint, exit, requeue
    log_dir: Optional[str] = None  # job output files; null: RUN_DIR/slurm and OUTPUT_DIR/logs/slurm
    extra_args: List[str] = field(default_factory=list)  # more sbatch options, e.g. [--constraint=h100]
    prep: PrepSlurmConfig = field(default_factory=PrepSlurmConfig)


@dataclass
class SubmitConfig:
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    jobs: List[str] = field(default_factory=lambda: list(JOBS))  # a subset: e.g. [pretrain] on prepared data
    dry_run: bool = False        # print the sbatch commands, submit nothing
    overrides: List[str] = field(default_factory=list)  # filled by xlmr-submit: the prep/pretrain keys


class SubmitError(Exception):
    pass


def register_configs() -> None:
    ConfigStore.instance().store(name="submit_schema", node=SubmitConfig)


def _own_key(override: str) -> bool:
    key = override.lstrip("+~").split("=", 1)[0]
    return key.split(".", 1)[0] in {"slurm", "jobs", "dry_run", "overrides", "hydra"}


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside xlmr-submit's app: the same conf/ dir
        return compose(config_name=config_name, overrides=overrides)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def _register_app_configs() -> None:
    from data_prep import cli as prep_cli
    from data_prep.config import register_configs as register_prep
    from pretrain.config import register_configs as register_pretrain

    register_prep()
    register_pretrain()
    if not OmegaConf.has_resolver("sample_corpus"):
        OmegaConf.register_new_resolver("sample_corpus", lambda: str(prep_cli.SAMPLE_CORPUS))


def route_overrides(overrides: list[str]) -> tuple[list[str], list[str], str, str]:
    """Split pass-through overrides into (prep, pretrain) by which config accepts each; an
    override neither accepts is an error with Hydra's reasons. Also returns the resolved
    output_dir and run_dir."""
    _register_app_configs()
    fixed = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in ("stages", "task.index", "task.count")]
    if fixed:
        raise SubmitError(f"{fixed}: the jobs set the prep stages and array tasks themselves "
                          "(choose jobs with jobs=[...], the array sizes with slurm.prep.clean_tasks=, dedup_tasks=, apply_tasks=, encode_tasks=)")
    prep, pretrain = [], []
    for override in overrides:
        errors = []
        for name, bucket in (("prep", prep), ("pretrain", pretrain)):
            try:
                _compose(name, [override])
                bucket.append(override)
            except Exception as exc:  # Hydra's ConfigCompositionException, omegaconf's errors
                errors.append(f"{name}: {str(exc).splitlines()[0]}")
        if override not in prep and override not in pretrain:
            raise SubmitError(f"{override!r} is neither an xlmr-prep nor an xlmr-pretrain key ({'; '.join(errors)})")
    keys = {o.split("=", 1)[0] for o in overrides}
    if "output_dir" in keys and "data_dir" not in keys:
        pretrain.append("data_dir=" + next(o for o in overrides if o.startswith("output_dir=")).split("=", 1)[1])
    if "data_dir" in keys and "output_dir" not in keys:
        prep.append("output_dir=" + next(o for o in overrides if o.startswith("data_dir=")).split("=", 1)[1])
    # Check the whole set together too (interpolations, groups), and learn the dirs.
    prep_cfg, pretrain_cfg = _compose("prep", prep), _compose("pretrain", pretrain)
    return prep, pretrain, str(prep_cfg.output_dir), str(pretrain_cfg.run_dir)


def _common_args(s: SlurmConfig) -> list[str]:
    args = []
    for flag, value in (("--partition", s.partition), ("--account", s.account), ("--qos", s.qos)):
        if value:
            args.append(f"{flag}={value}")
    return args + list(s.extra_args)


def sbatch_commands(cfg: SubmitConfig, prep: list[str], pretrain: list[str], output_dir: str,
                    run_dir: str) -> list[tuple[str, list[str]]]:
    """(job, sbatch argv) in submission order; "{dep}" stands for the previous job's id."""
    s, p = cfg.slurm, cfg.slurm.prep
    unknown = [j for j in cfg.jobs if j not in JOBS]
    if unknown:
        raise SubmitError(f"jobs={list(cfg.jobs)}: unknown {unknown}; choose from {list(JOBS)}")
    if s.nodes < 1 or s.ntasks_per_node < 1 or s.gpus_per_node < 0 or min(getattr(p, k) for k in ARRAYS.values()) < 1:
        raise SubmitError("slurm.nodes, slurm.ntasks_per_node and slurm.prep.{clean,dedup,apply,encode}_tasks must be >= 1, "
                          "slurm.gpus_per_node >= 0")
    if s.gpus_per_node and s.ntasks_per_node != s.gpus_per_node:
        raise SubmitError(f"one task per GPU: slurm.ntasks_per_node={s.ntasks_per_node} but "
                          f"slurm.gpus_per_node={s.gpus_per_node}")
    prep_logs = Path(s.log_dir or Path(output_dir) / "logs" / "slurm")
    run_logs = Path(s.log_dir or Path(run_dir) / "slurm")
    prep_res = [f"--cpus-per-task={p.cpus_per_task}", f"--time={p.time}"] + ([f"--mem={p.mem}"] if p.mem else [])
    commands = []
    for job in JOBS:
        if job not in cfg.jobs:
            continue
        argv = ["sbatch", "--parsable", *_common_args(s)]
        if commands:
            argv.append("--dependency=afterok:{dep}")
        if job in ARRAYS:
            argv += [*prep_res, f"--array=0-{getattr(p, ARRAYS[job]) - 1}", f"--output={prep_logs}/%x-%A_%a.out",
                     str(SCRIPTS / f"prep_{job}.sbatch"), *prep]
        elif job in PREP_JOBS:
            argv += [*prep_res, f"--output={prep_logs}/%x-%j.out", str(SCRIPTS / f"prep_{job}.sbatch"), *prep]
        else:
            argv += [f"--nodes={s.nodes}", f"--ntasks-per-node={s.ntasks_per_node}",
                     f"--cpus-per-task={s.cpus_per_task}", f"--time={s.time}",
                     f"--signal=B:USR1@{s.signal_before_s}", f"--output={run_logs}/%x-%j.out"]
            if s.gpus_per_node:
                argv.append(f"--gpus-per-node={s.gpus_per_node}")
            if s.mem:
                argv.append(f"--mem={s.mem}")
            argv += [str(SCRIPTS / "pretrain.sbatch"), *pretrain]
        commands.append((job, argv))
    return commands


def _request_keys(cfg: SubmitConfig, job: str) -> list[tuple[str, object, str]]:
    s, p = cfg.slurm, cfg.slurm.prep
    if job in PREP_JOBS:
        return [("cpus per task", p.cpus_per_task, "slurm.prep.cpus_per_task"), ("memory", p.mem, "slurm.prep.mem"),
                ("time", p.time, "slurm.prep.time")]
    return [("nodes", s.nodes, "slurm.nodes"), ("tasks per node", s.ntasks_per_node, "slurm.ntasks_per_node"),
            ("cpus per task", s.cpus_per_task, "slurm.cpus_per_task"), ("GPUs per node", s.gpus_per_node,
                                                                         "slurm.gpus_per_node"),
            ("memory", s.mem, "slurm.mem"), ("time", s.time, "slurm.time")]


def _largest_node(partition: Optional[str], env: dict) -> Optional[dict]:
    """CPUs, memory (MB), GPUs and node count of the partition's nodes (sinfo), for the message."""
    argv = ["sinfo", "-h", "-N", "-o", "%c %m %G"] + ([f"--partition={partition}"] if partition else [])
    try:
        out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return None
    nodes = []
    for line in filter(None, (line.split() for line in out)):
        gpus = sum(int(g.split(":")[-1].split("(")[0]) for g in line[2].split(",") if g.startswith("gpu") and
                   g.split(":")[-1].split("(")[0].isdigit())
        nodes.append((int(line[0].rstrip("+")), int(line[1].rstrip("+")), gpus))
    if not nodes:
        return None
    return {"cpus": max(n[0] for n in nodes), "mem_mb": max(n[1] for n in nodes), "gpus": max(n[2] for n in nodes),
            "nodes": len(nodes)}


def _keys_to_change(cfg: SubmitConfig, job: str, node: Optional[dict]) -> str:
    s = cfg.slurm
    if node is None:
        return "check " + ", ".join(key for _, _, key in _request_keys(cfg, job))
    if job in PREP_JOBS:
        if s.prep.cpus_per_task > node["cpus"]:
            return f"lower slurm.prep.cpus_per_task={s.prep.cpus_per_task} to at most {node['cpus']}"
        return "check slurm.prep.mem, slurm.prep.time and slurm.partition"
    keys = []
    if s.nodes > node["nodes"]:
        keys.append(f"slurm.nodes={s.nodes} (the partition has {node['nodes']})")
    if s.ntasks_per_node * s.cpus_per_task > node["cpus"]:
        keys.append(f"slurm.ntasks_per_node x slurm.cpus_per_task = {s.ntasks_per_node * s.cpus_per_task} "
                    f"(a node has {node['cpus']} CPUs)")
    if s.gpus_per_node > node["gpus"]:
        keys.append(f"slurm.gpus_per_node={s.gpus_per_node} (a node has {node['gpus']})")
    return "lower " + "; ".join(keys) if keys else "check slurm.mem, slurm.time and slurm.partition"


def check_can_run(cfg: SubmitConfig, commands: list[tuple[str, list[str]]], env: dict) -> None:
    """Ask SLURM whether each job could ever start (`sbatch --test-only`, which queues nothing)
    before submitting any: a request no node of the partition meets is refused here, naming the
    key to change, instead of a job PENDING forever."""
    for job, argv in commands:
        test = [a for a in argv if a not in ("--parsable", "--dependency=afterok:{dep}")]
        proc = subprocess.run([test[0], "--test-only", *test[1:]], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            said = next((line.split("error:", 1)[-1].strip() for line in reversed(proc.stderr.splitlines())
                         if "error" in line), proc.stderr.strip())
            where = f"partition {cfg.slurm.partition}" if cfg.slurm.partition else "the default partition"
            raise SubmitError(f"the {job} job cannot run on {where} ({said}): "
                              f"{_keys_to_change(cfg, job, _largest_node(cfg.slurm.partition, env))}; nothing was submitted")


def submit(cfg: SubmitConfig) -> dict[str, str]:
    """Submit the chain; returns {job: id}. Prints one line per job."""
    prep, pretrain, output_dir, run_dir = route_overrides(list(cfg.overrides))
    commands = sbatch_commands(cfg, prep, pretrain, output_dir, run_dir)
    # The jobs run the commands of the environment that submits them (sbatch --export=ALL):
    # put this interpreter's bin dir (xlmr-prep, xlmr-pretrain) first on their PATH.
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if not cfg.dry_run:
        check_can_run(cfg, commands, env)
    ids: dict[str, str] = {}
    dep = None
    for job, argv in commands:
        argv = [a.replace("{dep}", str(dep)) for a in argv]
        if cfg.dry_run:
            print(f"{job}: {shlex.join(argv)}")
            dep = f"<{job}>"
            continue
        for a in argv:
            if a.startswith("--output="):
                Path(a.split("=", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(argv, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            done = ", ".join(f"{j} {i}" for j, i in ids.items()) or "none"
            raise SubmitError(f"sbatch for the {job} job failed ({proc.stderr.strip()}); submitted before it: {done}")
        dep = proc.stdout.strip().split(";")[0]
        ids[job] = dep
        print(f"{job:<9}{dep}", flush=True)
    return ids


@hydra.main(config_path=CONF_DIR, config_name="submit", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    config: SubmitConfig = OmegaConf.to_object(cfg)
    try:
        submit(config)
    except SubmitError as exc:
        print(f"xlmr-submit: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except FileNotFoundError as exc:
        print(f"xlmr-submit: error: {exc.filename} not found: run it on a SLURM login node", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    register_configs()
    own = [a for a in sys.argv[1:] if a.startswith("-") or _own_key(a)]
    passed = [a for a in sys.argv[1:] if a not in own]
    # The pass-through overrides travel as one list-valued key, quoted for Hydra's parser.
    if passed:
        quoted = ",".join("'" + a.replace("\\", "\\\\").replace("'", "\\'") + "'" for a in passed)
        own.append(f"overrides=[{quoted}]")
    sys.argv = [sys.argv[0], *own]
    _app()


if __name__ == "__main__":
    main()
