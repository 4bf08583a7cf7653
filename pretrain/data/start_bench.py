"""How long a rank takes to start reading a big manifest: a synthetic data dir whose manifest
lists N train shards (links to the real shards of DATA_DIR, one directory entry each, so every
path is distinct), then, timed: load_manifest, the checkpoint's data fingerprint, building the
train loader, the first batch; and for comparison a stat of every shard (what each rank did at
start before shards were checked as the stream reaches them).

    python -m pretrain.data.start_bench DATA_DIR --shards 100000 [--workers 2] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from pretrain.checkpoint import data_fingerprint
from pretrain.data import DataConfig, build_train_loader, load_manifest
from pretrain.data.manifest import shard_index, shard_problem


def synthetic_data_dir(data_dir: Path, out: Path, n_shards: int) -> None:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    train = [s for s in manifest["shards"] if s["split"] == "train"]
    shards = []
    for i in range(n_shards):
        s = train[i % len(train)]
        path = f"shards/{s['lang']}/{i // 10_000:03d}/{i:07d}.tar"
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        os.symlink((data_dir / s["path"]).resolve(), out / path)
        shards.append({**s, "path": path})
    shards += [{**s, "path": str((data_dir / s["path"]).resolve())} for s in manifest["shards"] if s["split"] == "valid"]
    (out / "vocab").mkdir()
    os.symlink((data_dir / manifest["vocab"]["spm_model"]).resolve(), out / manifest["vocab"]["spm_model"])
    (out / "manifest.json").write_text(json.dumps({**manifest, "shards": shards}, indent=1))


def run(data_dir: Path, n_shards: int, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        synthetic_data_dir(data_dir, out, n_shards)
        times, t = {}, time.perf_counter()

        def lap(name):
            nonlocal t
            now = time.perf_counter()
            times[name] = round(now - t, 3)
            t = now

        manifest = load_manifest(out)
        lap("load_manifest")
        data_fingerprint(manifest)
        lap("data_fingerprint")
        loader = build_train_loader(out, manifest, DataConfig(num_workers=workers), 0, 1, 8)
        lap("build_train_loader")
        next(iter(loader))
        lap("first_batch")
        times["start_total"] = round(sum(times.values()), 3)
        index = shard_index(out, manifest)
        t = time.perf_counter()
        assert not any(shard_problem(s) for group in index.values() for s in group)
        lap("stat_every_shard")
        return {"shards": len(manifest["shards"]), "manifest_mb": round((out / "manifest.json").stat().st_size / 1e6, 1),
                "workers": workers, "seconds": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--shards", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    result = run(args.data_dir, args.shards, args.workers)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
