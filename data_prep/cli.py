"""The `xlmr-prep` command: a Hydra app over conf/prep.yaml (schema: config.PrepConfig)."""
from __future__ import annotations

import errno
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from .atomic import remove_stale_tmp_files
from .config import PrepConfig, register_configs
from .errors import PrepError
from .pipeline import run_prep

SAMPLE_CORPUS = Path(__file__).parent / "sample_corpus"
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


@hydra.main(config_path=CONF_DIR, config_name="prep", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    prep_cfg: PrepConfig = OmegaConf.to_object(cfg)
    try:
        run_prep(prep_cfg)
    except PrepError as exc:
        logging.getLogger("xlmr-prep").error("%s", exc)
        print(f"xlmr-prep: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        if exc.errno not in _DISK_FULL:
            raise
        if prep_cfg.task.count == 1:  # workers stopped mid-write leave them (array tasks: see shards.py)
            remove_stale_tmp_files(Path(prep_cfg.output_dir))
        print(f"xlmr-prep: error: the disk is full ({exc.strerror}: {exc.filename or prep_cfg.output_dir}). "
              "Partial files were removed and completed stages are kept: free space and rerun to resume.",
              file=sys.stderr)
        sys.exit(3)


def main() -> None:
    register_configs()
    if not OmegaConf.has_resolver("sample_corpus"):
        OmegaConf.register_new_resolver("sample_corpus", lambda: str(SAMPLE_CORPUS))
    _app()


if __name__ == "__main__":
    main()
