"""The tiny pipeline end to end through the real sbatch scripts, submitted by the real
`xlmr-submit`: clean job array (3 tasks) -> dedup job array (2 tasks) -> apply job array (2
tasks) -> vocab job -> encode job array (2 tasks) -> merge job (merges each language's staged
samples into shards, writes the manifest) -> pretraining on 2 CPU tasks (gloo) via srun, each
job `afterok` on the one before."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import run_prep
from tests.data_prep.corpus import SMALL_ARGS, small_corpus
from tests.pretrain.test_train import records
from tests.slurm.conftest import job_output

# 4 languages in several clean parts, dedup buckets and encode chunks for the array tasks
PREP_ARGS = [*SMALL_ARGS, "clean.chunk_mb=0.02", "dedup.memory_mb=0.002"]
TRAIN_ARGS = ["model=tiny", "trainer.max_steps=6", "trainer.save_every=3", "trainer.log_every=1",
              "deepspeed.precision=fp32", "data.num_workers=1", "wandb.mode=offline"]


@pytest.mark.slow
def test_xlmr_submit_runs_the_pipeline_through_sbatch(slurm, tmp_path):
    corpus = small_corpus(tmp_path / "corpus")
    data, run = tmp_path / "data", tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.cluster.submit", f"input_dir={corpus}", f"output_dir={data}", f"run_dir={run}",
         *[a for a in PREP_ARGS if a != "progress=false"], *TRAIN_ARGS,
         "slurm.ntasks_per_node=2", "slurm.cpus_per_task=1", "slurm.time=00:20:00",
         "slurm.prep.clean_tasks=3", "slurm.prep.dedup_tasks=2", "slurm.prep.apply_tasks=2", "slurm.prep.encode_tasks=2",
         "slurm.prep.cpus_per_task=1", "slurm.prep.time=00:10:00"],
        capture_output=True, text=True, env=slurm.env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = dict(line.split() for line in proc.stdout.splitlines())
    assert list(ids) == ["clean", "dedup", "apply", "vocab", "encode", "merge", "pretrain"], proc.stdout
    slurm.wait(*ids.values(), timeout=900)
    logs = job_output(tmp_path)

    jobs = {name: slurm.job(job_id) for name, job_id in ids.items()}
    assert [len(jobs[j]) for j in ("clean", "dedup", "apply", "encode")] == [3, 2, 2, 2], jobs  # the arrays' tasks
    for name, tasks in jobs.items():
        for t in tasks:
            assert (t["JobState"], t["ExitCode"]) == ("COMPLETED", "0:0"), f"{name}: {t}\n{logs}"
    # Chained: each job started after the one it depends on ended.
    order = [jobs[name] for name in ("clean", "dedup", "apply", "vocab", "encode", "merge", "pretrain")]
    for before, after in zip(order, order[1:]):
        assert min(t["StartTime"] for t in after) >= max(t["EndTime"] for t in before), (before, after)
    assert jobs["pretrain"][0]["NumTasks"] == "2", jobs["pretrain"]

    # The array's merged output is the data set a single-process run makes of the same input.
    single = tmp_path / "single"
    run_prep(f"input_dir={corpus}", f"output_dir={single}", *PREP_ARGS)
    manifest, expected = (json.loads((d / "manifest.json").read_text()) for d in (data, single))
    units = list(data.glob("state/encode/*/[0-9]*.json"))  # chunk markers (merge markers: LANG/merge.json)
    assert len(units) >= 2, "the corpus should give the two array tasks several encode chunks"
    assert len(list(data.glob("state/encode/*/merge.json"))) == len(manifest["languages"])  # merged in the merge job
    assert [(s["path"], s["sha256"]) for s in manifest["shards"]] == \
        [(s["path"], s["sha256"]) for s in expected["shards"]]
    assert manifest["vocab"]["sha256"] == expected["vocab"]["sha256"]
    assert manifest["languages"] == expected["languages"]
    # Each clean array task cleaned its share of the parts and each dedup task its share of the
    # buckets (their logs say how many). The apply tasks filter the parts the dedup tasks left:
    # a dedup task that finds every bucket resolved already filters its own share.
    for name, unit in (("clean", "clean"), ("dedup", "dedup buckets"), ("apply", "dedup apply")):
        for task in range(len(jobs[name])):
            log = next((data / "logs" / "slurm").glob(f"xlmr-{name}-{ids[name]}_{task}.out")).read_text()
            done = re.search(rf"{unit}: (\d+) units, \d+ done before, (\d+) to do in this task", log)
            assert done and (name == "apply" or int(done[2]) > 0), log

    # Pretraining ran on 2 ranks (srun tasks) to the end.
    assert sorted(records(run)) == [1, 2, 3, 4, 5, 6], logs
    ckpt = run / "checkpoints" / "step_00000006" / "checkpoint.json"
    assert ckpt.is_file(), logs
    assert json.loads(ckpt.read_text())["world_size"] == 2
    assert (run / "slurm").is_dir() and (data / "logs" / "slurm").is_dir()

    # xlmr-status reads the finished run: the final checkpoint, step and loss the trainer logged.
    st = subprocess.run([sys.executable, "-m", "pretrain.cluster.status", "--json", str(run)], capture_output=True,
                        text=True, timeout=60)
    assert st.returncode == 0, st.stderr
    st = json.loads(st.stdout)
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line][-1]
    assert (st["step"], st["max_steps"], st["checkpoint"]["step"]) == (6, 6, 6)
    assert (st["loss"], st["tokens_seen"], st["eta_s"]) == (last["loss"], last["tokens_seen"], 0)
    assert st["wandb"]["run_id"] == (run / "wandb_run_id").read_text().strip() and "wandb sync" in st["wandb"]["sync"]
