"""The SLURM edge without a cluster: rank variables from SLURM's environment, the requeue
target, xlmr-submit's routing and sbatch command lines, xlmr-status on a run dir's files."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pretrain.cluster import slurm, status
from pretrain.cluster.submit import SubmitConfig, SubmitError, route_overrides, sbatch_commands
from tests.conftest import REPO

JOB_ENV = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[03-05,09]", "SLURM_NTASKS": "16",
           "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "8"}


def test_task_env_maps_slurm_to_torch_distributed(monkeypatch):
    monkeypatch.setattr(slurm.subprocess, "run", _no_scontrol)
    env = slurm.task_env(JOB_ENV)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("9", "16", "1", "8")
    assert env["MASTER_ADDR"] == "gpu03"
    assert 20000 <= int(env["MASTER_PORT"]) < 40000
    # A requeued job (SLURM_RESTART_COUNT) gets another port; set values are kept.
    assert slurm.master_port({**JOB_ENV, "SLURM_RESTART_COUNT": "1"}) != int(env["MASTER_PORT"])
    assert slurm.task_env({**JOB_ENV, "MASTER_ADDR": "10.0.0.1"})["MASTER_ADDR"] == "10.0.0.1"
    with pytest.raises(KeyError, match="SLURM_PROCID"):
        slurm.task_env({"SLURM_JOB_ID": "1"})


def _no_scontrol(*args, **kwargs):
    raise FileNotFoundError("scontrol")


@pytest.mark.parametrize("nodelist, first", [("gpu[03-05,09]", "gpu03"), ("node7", "node7"),
                                             ("a1,b2", "a1"), ("dgx-[12-13]", "dgx-12")])
def test_first_host_without_scontrol(monkeypatch, nodelist, first):
    monkeypatch.setattr(slurm.subprocess, "run", _no_scontrol)
    assert slurm.first_host(nodelist) == first


def test_requeue_target_is_the_array_id_for_array_tasks():
    assert slurm.requeue_target({"SLURM_JOB_ID": "77"}) == "77"
    array_task = {"SLURM_JOB_ID": "81", "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "4"}
    assert slurm.requeue_target(array_task) == "77_4"


def test_overrides_go_to_the_command_that_has_the_key():
    prep, pretrain, output_dir, run_dir = route_overrides(
        ["input_dir=/in", "output_dir=/data", "vocab.size=400", "run_dir=/run", "model=tiny", "trainer.max_steps=7"])
    assert prep == ["input_dir=/in", "output_dir=/data", "vocab.size=400"]
    assert pretrain == ["run_dir=/run", "model=tiny", "trainer.max_steps=7", "data_dir=/data"]
    assert (output_dir, run_dir) == ("/data", "/run")
    with pytest.raises(SubmitError, match="trainer.max_stps"):
        route_overrides(["trainer.max_stps=3"])
    with pytest.raises(SubmitError, match="stages"):
        route_overrides(["stages=[encode]"])


def test_sbatch_commands_take_resources_from_config():
    cfg = SubmitConfig()
    cfg.slurm.partition, cfg.slurm.account, cfg.slurm.nodes = "gpu", "proj1", 4
    cfg.slurm.ntasks_per_node = cfg.slurm.gpus_per_node = 8
    cfg.slurm.prep.encode_tasks, cfg.slurm.prep.clean_tasks, cfg.slurm.prep.dedup_tasks, cfg.slurm.prep.apply_tasks = 16, 24, 3, 5
    commands = dict(sbatch_commands(cfg, ["output_dir=/d"], ["data_dir=/d", "run_dir=/r"], "/d", "/r"))
    assert list(commands) == ["clean", "dedup", "apply", "vocab", "encode", "merge", "pretrain"]
    assert "--dependency=afterok:{dep}" not in commands["clean"]
    assert all("--dependency=afterok:{dep}" in commands[j] for j in ("dedup", "apply", "vocab", "encode", "merge", "pretrain"))
    assert "--array=0-15" in commands["encode"] and "--array=0-23" in commands["clean"] and "--array=0-2" in commands["dedup"]
    assert "--array=0-4" in commands["apply"]
    assert not any(a.startswith("--array") for a in commands["vocab"] + commands["merge"])
    for job in ("clean", "dedup", "apply", "vocab", "encode", "merge"):
        assert commands[job][-2] == str(REPO / "slurm" / f"prep_{job}.sbatch")
    pre = commands["pretrain"]
    for arg in ("--partition=gpu", "--account=proj1", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8",
                "--signal=B:USR1@120", "--output=/r/slurm/%x-%j.out"):
        assert arg in pre, (arg, pre)
    assert pre[-3:] == [str(REPO / "slurm" / "pretrain.sbatch"), "data_dir=/d", "run_dir=/r"]
    cfg.jobs = ["pretrain"]
    assert [j for j, _ in sbatch_commands(cfg, [], [], "/d", "/r")] == ["pretrain"]
    cfg.slurm.gpus_per_node = 4
    with pytest.raises(SubmitError, match="one task per GPU"):
        sbatch_commands(cfg, [], [], "/d", "/r")


def test_xlmr_submit_dry_run_and_typos():
    def submit(*args):
        return subprocess.run([sys.executable, "-m", "pretrain.cluster.submit", *args], capture_output=True, text=True,
                              cwd=REPO, timeout=120)
    ok = submit("dry_run=true", "output_dir=/d", "run_dir=/r", "slurm.gpus_per_node=0", "slurm.ntasks_per_node=2")
    assert ok.returncode == 0, ok.stderr
    assert [line.split(":")[0] for line in ok.stdout.splitlines()] == ["clean", "dedup", "apply", "vocab", "encode", "merge", "pretrain"]
    assert "--ntasks-per-node=2" in ok.stdout and "--gpus-per-node" not in ok.stdout
    typo = submit("dry_run=true", "slurm.nods=2")
    assert typo.returncode != 0 and "slurm.nods" in typo.stderr
    typo = submit("dry_run=true", "trainer.max_stps=2")
    assert typo.returncode == 2 and "trainer.max_stps" in typo.stderr


def test_status_reads_a_run_dir(tmp_path, capsys):
    run = tmp_path / "run"
    tag = run / "checkpoints" / "step_00000040"
    tag.mkdir(parents=True)
    (run / "checkpoints" / "step_00000050").mkdir()  # a save killed midway: no marker, not the latest
    config = {"trainer": {"max_steps": 100}, "wandb": {"mode": "offline", "project": "p", "entity": None}}
    (tag / "checkpoint.json").write_text(json.dumps({"step": 40, "tokens_seen": 4000, "saved_at": "T", "config": config}))
    losses = [4.0, 3.0, 2.0, 1.0, 2.0]
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": 10 * (i + 1), "loss": loss, "tokens_per_s": 100.0, "tokens_seen": 1000 * (i + 1)}) + "\n"
        for i, loss in enumerate(losses)) + '{"step": 50, "valid/loss": 2.5}\n{"step": 6')  # a line being written
    (run / "wandb_run_id").write_text("abc123\n")
    (run / "wandb" / "offline-run-20260101_000000-abc123").mkdir(parents=True)

    st = status.run_status(run)
    assert st["checkpoint"]["step"] == 40 and st["step"] == 50 and st["tokens_seen"] == 5000
    assert st["loss"] == 2.0 and st["valid_loss"] == 2.5
    w = [0.9 ** k for k in range(len(losses))][::-1]  # debiased EMA: weights 0.9^age
    assert st["smoothed_loss"] == pytest.approx(sum(a * b for a, b in zip(w, losses)) / sum(w))
    assert st["eta_s"] == pytest.approx(50 * 100 / 100.0)  # 50 steps left x 100 tokens/step at 100 tok/s
    assert st["wandb"]["sync"].startswith("wandb sync ") and st["wandb"]["sync"].endswith("offline-run-20260101_000000-abc123")
    status.main([str(run)])
    out = capsys.readouterr().out
    assert "step_00000040" in out and "0:00:50" in out and "wandb sync" in out
    config["wandb"].update(mode="online", entity="me")
    (tag / "checkpoint.json").write_text(json.dumps({"step": 40, "tokens_seen": 4000, "saved_at": "T", "config": config}))
    assert status.run_status(run)["wandb"]["url"] == "https://wandb.ai/me/p/runs/abc123"
    with pytest.raises(SystemExit):
        status.main([str(tmp_path)])
