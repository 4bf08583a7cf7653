"""The `xlmr-pretrain` command (a Hydra app over conf/pretrain.yaml, schema
config.PretrainConfig) and `xlmr-plot` (metrics.jsonl -> PNG plots)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pretrain.config import PretrainConfig, PretrainError, check_config, register_configs

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


class RunDirCheck(Callback):
    """Hydra calls this before it creates ${run_dir}/hydra: a run_dir that is a file or cannot
    be created is one line here, not a traceback out of Hydra's makedirs."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        run_dir = Path(str(config.run_dir))
        problem = "is a file, not a directory" if run_dir.exists() and not run_dir.is_dir() else None
        if problem is None:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                probe = run_dir / f".write-test-{os.getpid()}"
                probe.touch()
                probe.unlink()
            except OSError as exc:
                problem = f"cannot write there ({exc.strerror})"
        if problem:
            print(f"xlmr-pretrain: error: run_dir={run_dir} {problem}: give a writable directory", file=sys.stderr,
                  flush=True)
            sys.exit(2)


@hydra.main(config_path=CONF_DIR, config_name="pretrain", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    config: PretrainConfig = OmegaConf.to_object(cfg)
    try:
        check_config(config)  # before DeepSpeed is imported: a bad value fails in a second
    except PretrainError as exc:
        print(f"xlmr-pretrain: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    from pretrain.data.shards import ShardError
    from pretrain.faults import shard_error_line
    from pretrain.train import train  # imports DeepSpeed: after Hydra has checked the config

    try:
        train(config, resolved_config=OmegaConf.to_container(cfg, resolve=True))
    except PretrainError as exc:
        # Every rank meets the same error; one line from rank 0 is enough.
        if os.environ.get("RANK", "0") == "0":
            print(f"xlmr-pretrain: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    except ShardError as exc:  # met by this rank's loader alone: it says so itself
        print(f"xlmr-pretrain: error: {shard_error_line(exc, config.data_dir)}", file=sys.stderr, flush=True)
        sys.exit(2)


def main() -> None:
    register_configs()
    _app()


def plot_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="xlmr-plot", description="Plot RUN_DIR/metrics.jsonl as PNG files.")
    parser.add_argument("run_dir", type=Path, help="a run dir of xlmr-pretrain (or a metrics.jsonl file)")
    parser.add_argument("--out", type=Path, default=None, help="output dir (default: RUN_DIR/plots)")
    args = parser.parse_args(argv)
    from pretrain.plot import plot_metrics

    metrics = args.run_dir if args.run_dir.is_file() else args.run_dir / "metrics.jsonl"
    if not metrics.is_file():
        print(f"xlmr-plot: error: {metrics} not found: is {args.run_dir} a run dir of xlmr-pretrain?", file=sys.stderr)
        sys.exit(2)
    out = args.out or metrics.parent / "plots"
    try:
        paths = plot_metrics(metrics, out)
    except ValueError as exc:
        print(f"xlmr-plot: error: {exc}", file=sys.stderr)
        sys.exit(2)
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
