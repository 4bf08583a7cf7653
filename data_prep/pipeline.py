"""`xlmr-prep` top to bottom: clean -> dedup -> vocab -> encode+pack+shard -> manifest -> report.

Every stage is a set of units, each recorded complete by its marker the moment it is done
(units.py, state.py), so a rerun after a crash, kill -9 or full disk continues where the last
one stopped, losing only the units in flight; `force=STAGE` deletes that stage's outputs and
everything after it and rebuilds them. As job array tasks (task.index of task.count), clean,
dedup and encode each do their share of the units; a task stops after its share while other
tasks' units of the stage are missing.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict

from . import parallel
from .atomic import remove_stale_tmp_files
from .clean import run_clean
from .config import STAGES, PrepConfig
from .dedup import run_dedup
from .encode import run_encode
from .errors import PrepError
from .inputs import UNLABELLED, discover
from .lid import LID_ACTIONS, LID_UNITS
from .manifest import build_manifest, dropped_records
from .report import write_report
from .state import Layout, apply_force
from .vocab import run_vocab

log = logging.getLogger("xlmr-prep")


def check_config(cfg: PrepConfig) -> None:
    if not 0 <= cfg.sampling.alpha <= 1:
        raise PrepError(f"sampling.alpha must be in [0, 1], got {cfg.sampling.alpha}")
    if cfg.pack.seq_len < 2:
        raise PrepError(f"pack.seq_len must be >= 2, got {cfg.pack.seq_len}")
    if cfg.vocab.size < 8:
        raise PrepError(f"vocab.size must be >= 8, got {cfg.vocab.size}")
    if not 0 <= cfg.split.valid_fraction < 1:
        raise PrepError(f"split.valid_fraction must be in [0, 1), got {cfg.split.valid_fraction}")
    if cfg.shard.target_mb <= 0 or cfg.pack.chunk_mb <= 0 or cfg.clean.chunk_mb <= 0 or cfg.dedup.memory_mb <= 0:
        raise PrepError("shard.target_mb, pack.chunk_mb, clean.chunk_mb and dedup.memory_mb must be > 0")
    if cfg.pack.chunk_mb < cfg.clean.index_every_mb:  # chunks are cut only at the index's points
        raise PrepError(f"pack.chunk_mb={cfg.pack.chunk_mb} is below clean.index_every_mb={cfg.clean.index_every_mb}, "
                        "the spacing of the points encode chunks are cut at: raise pack.chunk_mb or lower clean.index_every_mb")
    if unknown := set(cfg.stages) - set(STAGES):
        raise PrepError(f"unknown stage(s) {sorted(unknown)} in stages=; stages are {', '.join(STAGES)}")
    lid = cfg.clean.lid
    if not 0 <= lid.threshold <= 1:
        raise PrepError(f"clean.lid.threshold must be in [0, 1], got {lid.threshold}")
    if lid.action not in LID_ACTIONS:
        raise PrepError(f"clean.lid.action must be one of {', '.join(LID_ACTIONS)}, got {lid.action!r}")
    if lid.unit not in LID_UNITS:
        raise PrepError(f"clean.lid.unit must be one of {', '.join(LID_UNITS)}, got {lid.unit!r}")
    if not 0 <= cfg.task.index < cfg.task.count:
        raise PrepError(f"task.index must be in [0, task.count), got {cfg.task.index} of {cfg.task.count}")


def split_excluded(clean_stats: Dict[str, Dict]):
    """Languages with nothing left after cleaning are excluded, with the reason recorded."""
    kept, excluded = {}, {}
    for lang, st in clean_stats.items():
        if st["lines"] > 0:
            kept[lang] = st
            continue
        if lang == UNLABELLED:
            reason = "unlabelled input: each document filed under the language LID detected, or dropped"
        else:
            reason = "empty input" if st["input_lines"] == 0 else "nothing left after filtering"
        excluded[lang] = {"reason": reason, "input_lines": st["input_lines"], "removed": st["removed"], "lid": st["lid"]}
        log.warning("language %s excluded: %s (input lines %d, removed %s)", lang, reason, st["input_lines"],
                    {k: v for k, v in st["removed"].items() if v})
    if not kept:
        raise PrepError("no language has any text left after cleaning; see the counts above")
    return kept, excluded


def task_done(cfg: PrepConfig, stage: str) -> Dict:
    """An array task whose share of a stage is done while other tasks' units are missing."""
    log.info("%s: task %d of %d has done its share; units of other tasks are missing, the next job (or a rerun) "
             "continues when they are done", stage, cfg.task.index, cfg.task.count)
    return {}


def run_prep(cfg: PrepConfig) -> Dict:
    check_config(cfg)
    layout = Layout(Path(cfg.output_dir).resolve())
    # Leftovers of killed runs. Array tasks share the output_dir, so each of them only clears
    # its own chunks' leftovers (shards.py) and leaves the others' files in flight alone.
    if cfg.task.count == 1 and (removed := remove_stale_tmp_files(layout.root)):
        log.info("removed %d partial files left by an interrupted run", removed)
    apply_force(layout, cfg.force)
    workers = parallel.resolve_workers(cfg.workers)

    inventory = discover(Path(cfg.input_dir).resolve(), unlabelled=cfg.clean.lid.route_unlabelled)
    for skipped in inventory.skipped:
        log.warning("skipped %s", skipped)
    log.info("input: %d language files, %d record files; output: %s; %d workers",
             sum(map(len, inventory.text_sources.values())), len(inventory.record_sources), layout.root, workers)

    wanted = set(cfg.stages)
    last = max(STAGES.index(s) for s in wanted)
    cleaned = run_clean(inventory, cfg.clean, layout, workers, cfg.progress, "clean" in wanted, cfg.task)
    if cleaned is None:
        return task_done(cfg, "clean")
    if last < STAGES.index("dedup"):
        return {}
    clean_stats = run_dedup(layout, cleaned, cfg, workers, cfg.progress, "dedup" in wanted)
    if clean_stats is None:
        return task_done(cfg, "dedup")
    clean_stats, excluded = split_excluded(clean_stats)
    if last < STAGES.index("vocab"):
        return {}
    vocab = run_vocab(layout, clean_stats, cfg, workers, cfg.progress, "vocab" in wanted)
    if last < STAGES.index("encode"):
        return {}
    chunks = run_encode(layout, clean_stats, vocab, cfg, workers, cfg.progress, "encode" in wanted)
    if chunks is None:
        return task_done(cfg, "encode")
    if last < STAGES.index("manifest"):
        return {}
    dropped = dropped_records(layout, [src.path.name for src in inventory.record_sources])
    for name, counts in dropped["by_file"].items():
        log.warning("dropped records of %s: %s", name, ", ".join(f"{n} {reason}" for reason, n in counts.items()))
    manifest = build_manifest(layout, cfg, clean_stats, vocab, chunks, excluded, inventory.skipped, dropped)
    if "report" not in wanted:
        return manifest
    table = write_report(manifest, layout.report)

    print(table)
    train = sum(lang["train"]["tokens"] for lang in manifest["languages"].values())
    valid = sum(lang["valid"]["tokens"] for lang in manifest["languages"].values())
    print(f"\n{len(manifest['languages'])} languages, {len(manifest['shards'])} shards, {train:,} train and "
          f"{valid:,} validation tokens, vocabulary {vocab['size']:,} (sha256 {vocab['sha256'][:12]})")
    if unjudged := manifest["lid"]["unjudged_languages"]:
        print(f"language identification cannot judge {', '.join(unjudged)}: kept unfiltered")
    plots = "languages.png" + (", lid_confidence.png" if manifest["lid"]["enabled"] else "")
    print(f"manifest: {layout.manifest}\nreport:   {layout.report}/report.md, {layout.report}/{{{plots}}}")
    return manifest
