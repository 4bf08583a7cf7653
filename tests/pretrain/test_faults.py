"""Faults a cluster produces, each met with real processes and real files: two trainers on
one run dir, a requeued instance taking over, kill -9 during a save and a damaged
checkpoint.json, a shard damaged while training runs, damaged manifest / W&B id / HF files,
a stale DeepSpeed op-build lock, every config value out of range, an unwritable run_dir.

No sleep decides an outcome: the tests wait for events (a lock file naming its holder, a line
of output, a `.partial` dir seen while the trainer is stopped), and what is damaged is chosen
from the data plan, not from timing.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pretrain.config import PretrainError, check_config, register_configs
from tests.pretrain.test_train import FAST, REPO, _tiny_hf_model, error_line, pretrain_run, records

ENV = {"DS_ACCELERATOR": "cpu", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
       "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}


def start(data_dir: Path, run_dir: Path, *overrides: str, env: dict | None = None, log: Path) -> subprocess.Popen:
    """xlmr-pretrain in the background, in a process group of its own (with its loader
    workers), stdout as a line stream, stderr to `log`."""
    cmd = [sys.executable, "-m", "pretrain.cli", f"data_dir={data_dir}", f"run_dir={run_dir}", *FAST, *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **ENV, **(env or {})}, text=True,
                            stdout=subprocess.PIPE, stderr=open(log, "w"), start_new_session=True)


def wait_for(condition, what: str, timeout: float = 600, every: float = 0.05):
    """Poll an event (not a duration): the outcome never depends on how long it took."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def read_until(proc: subprocess.Popen, needle: str) -> list[str]:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} never printed; got:\n{''.join(lines)}")


def _files(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Every file of a run dir but Hydra's own log dir, with size and mtime."""
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.rglob("*")
            if p.is_file() and "hydra" not in p.relative_to(run_dir).parts}


def holder_pid(run_dir: Path):
    try:
        return json.loads((run_dir / "run.lock").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


# ---- config values, run_dir ------------------------------------------------------------

BAD_VALUES = [
    ("model.vocab_size=-1", "model.vocab_size"), ("model.hidden_size=0", "model.hidden_size"),
    ("model.num_layers=0", "model.num_layers"), ("model.num_heads=3", "model.num_heads"),
    ("model.ffn_size=0", "model.ffn_size"), ("model.max_positions=1", "model.max_positions"),
    ("model.dropout=1.0", "model.dropout"), ("model.attention_dropout=-0.1", "model.attention_dropout"),
    ("model.layer_norm_eps=0", "model.layer_norm_eps"), ("model.init_std=-0.02", "model.init_std"),
    ("model.pad_id=-1", "model.pad_id"),
    ("masking.mask_prob=1.5", "masking.mask_prob"), ("masking.mask_prob=-0.1", "masking.mask_prob"),
    ("masking.end_mask_prob=2", "masking.end_mask_prob"), ("masking.mask_token_prob=1.1", "masking.mask_token_prob"),
    ("masking.random_token_prob=0.3", "masking.random_token_prob"), ("masking.schedule=exp", "masking.schedule"),
    ("masking.schedule_start=-1", "masking.schedule_start"), ("masking.schedule_end=-1", "masking.schedule_end"),
    ("data.alpha=-0.5", "data.alpha"), ("data.seed=-1", "data.seed"), ("data.num_workers=-1", "data.num_workers"),
    ("data.prefetch_factor=0", "data.prefetch_factor"), ("data.shuffle_block=0", "data.shuffle_block"),
    ("data.valid_max_sequences_per_lang=-1", "data.valid_max_sequences_per_lang"),
    ("data.on_damaged_shard=ignore", "data.on_damaged_shard"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"), ("deepspeed.precision=fp16", "deepspeed.precision"),
    ("deepspeed.micro_batch_size=0", "deepspeed.micro_batch_size"),
    ("deepspeed.gradient_accumulation_steps=0", "deepspeed.gradient_accumulation_steps"),
    ("deepspeed.gradient_clipping=-1", "deepspeed.gradient_clipping"),
    ("optim.lr=-1", "optim.lr"), ("optim.lr=nan", "optim.lr"), ("optim.lr=inf", "optim.lr"),
    ("optim.betas=[0.9]", "optim.betas"), ("optim.betas=[0.9,1.0]", "optim.betas"), ("optim.eps=0", "optim.eps"),
    ("optim.weight_decay=-0.01", "optim.weight_decay"), ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("optim.schedule=cosine", "optim.schedule"), ("optim.power=0", "optim.power"), ("optim.end_lr=1.0", "optim.end_lr"),
    ("optim.decay_start=-1", "optim.decay_start"), ("optim.decay_steps=-5", "optim.decay_steps"),
    ("optim.decay_shape=step", "optim.decay_shape"),
    ("trainer.max_steps=0", "trainer.max_steps"), ("trainer.stop_at_step=0", "trainer.stop_at_step"),
    ("trainer.seed=-1", "trainer.seed"), ("trainer.log_every=0", "trainer.log_every"),
    ("trainer.save_every=0", "trainer.save_every"), ("trainer.keep_last=0", "trainer.keep_last"),
    ("trainer.eval_every=-1", "trainer.eval_every"), ("trainer.probe_every=-1", "trainer.probe_every"),
    ("trainer.max_nonfinite_steps=0", "trainer.max_nonfinite_steps"), ("trainer.peak_flops=0", "trainer.peak_flops"),
    ("trainer.lock_wait_s=-1", "trainer.lock_wait_s"),
    ("probe.layer=3", "probe.layer"), ("probe.max_tokens=2", "probe.max_tokens"), ("probe.batch_size=0", "probe.batch_size"),
    ("wandb.mode=on", "wandb.mode"), ("resume=''", "resume"),
]


def _config(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return OmegaConf.to_object(compose("pretrain", overrides=["model=tiny", *overrides]))


def test_defaults_and_recipes_pass_the_range_checks():
    for recipe in (), ("recipe=xlmr",), ("recipe=mmbert",):
        check_config(_config(*recipe))


@pytest.mark.parametrize("override, key", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_each_config_value_out_of_range_is_named(override, key):
    with pytest.raises(PretrainError) as info:
        check_config(_config(override))
    message = str(info.value)
    assert message.startswith(f"{key}=") and "must be" in message and "\n" not in message, message


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **ENV}, timeout=600)


def test_bad_value_and_unusable_run_dir_are_one_line_before_training(tmp_path):
    proc = _cli(f"run_dir={tmp_path}/run", "optim.lr=-1", "masking.mask_prob=1.5")
    assert proc.returncode == 2
    line = error_line(proc)
    assert "optim.lr=-1.0: must be >= 0" in line and "masking.mask_prob=1.5" in line
    assert not (tmp_path / "run" / "checkpoints").exists()
    (tmp_path / "file").write_text("not a dir")
    proc = _cli(f"run_dir={tmp_path}/file")
    assert proc.returncode == 2 and "is a file, not a directory" in error_line(proc)
    # Read-only for root too: sysfs refuses any new directory.
    proc = _cli("run_dir=/sys/xlmr-run")
    assert proc.returncode == 2 and "run_dir=/sys/xlmr-run cannot write there" in error_line(proc)


# ---- damaged files: manifest, W&B id, HF dir --------------------------------------------


def _data_copy(src: Path, dst: Path, copied: tuple[str, ...] = ("manifest.json",)) -> Path:
    """A data dir of symlinks to `src`'s files, but real copies of `copied` (to damage)."""
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        target = dst / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif str(rel) in copied:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
    return dst


def test_damaged_manifest_is_one_line_naming_it(prepared_data, tmp_path):
    data = _data_copy(prepared_data, tmp_path / "data")
    text = (data / "manifest.json").read_text()
    (data / "manifest.json").write_text(text + text[:100])  # two copies' worth: "Extra data"
    proc = pretrain_run(data, tmp_path / "run", check=False)
    assert proc.returncode == 2
    line = error_line(proc)
    assert f"{data / 'manifest.json'} is damaged" in line and "force=manifest" in line


def test_damaged_wandb_id_is_one_line_naming_it(tmp_path):
    from pretrain.metrics import wandb_run_id

    (tmp_path / "wandb_run_id").write_bytes(b"\x00\x9f{garbage")
    with pytest.raises(PretrainError) as info:
        wandb_run_id(tmp_path, None)
    assert f"{tmp_path / 'wandb_run_id'} is damaged" in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "wandb_run_id").write_text("abc123\n")
    assert wandb_run_id(tmp_path, None) == "abc123"


def _eval(hf: Path, data: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.evaluation.cli", str(hf), "--data-dir", str(data),
                           "--languages", "en", "--max-sequences", "2", "--no-probes", "--no-fill-mask"],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, **ENV}, timeout=600)


def test_hf_dir_with_damaged_config_or_truncated_weights_is_one_line(prepared_data, tmp_path):
    manifest = json.loads((prepared_data / "manifest.json").read_text())
    hf = tmp_path / "hf"
    _tiny_hf_model(hf, prepared_data / manifest["vocab"]["spm_model"], manifest["vocab"]["size"])
    assert _eval(hf, prepared_data).returncode == 0  # the intact dir loads
    weights = hf / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc = _eval(hf, prepared_data)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("xlmr-eval: error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{weights} is damaged" in lines[0]
    (hf / "config.json").write_text('{"architectures": ["XLMRobertaForMaskedLM"], "hidden_')
    proc = _eval(hf, prepared_data)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{hf / 'config.json'} is damaged (not JSON" in proc.stderr


# ---- the DeepSpeed op build -------------------------------------------------------------


def test_stale_op_build_lock_is_named_and_nothing_is_built(prepared_data, tmp_path):
    # torch's rule for the build dir: TORCH_EXTENSIONS_DIR/<op name> (without it ~/.cache/torch_extensions/pyXY_cpu/)
    build = tmp_path / "ext" / "deepspeed_shm_comm"
    build.mkdir(parents=True)
    (build / "lock").touch()  # what a builder killed midway leaves: nobody holds it,
    an_hour_ago = time.time() - 3600  # and nothing changed in the build dir since (another host building would)
    for path in (build / "lock", build):
        os.utime(path, (an_hour_ago, an_hour_ago))
    proc = pretrain_run(prepared_data, tmp_path / "run", check=False, env={"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")},
                        timeout=300)
    assert proc.returncode == 2
    assert f"{build / 'lock'} is a stale lock of DeepSpeed's CPU communication op build" in error_line(proc)
    assert sorted(p.name for p in build.iterdir()) == ["lock"]  # no build was started


def test_op_build_is_announced_and_a_fresh_unheld_lock_waited_on_with_a_word(tmp_path, monkeypatch):
    from pretrain.opbuild import check_op_build

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    said = []
    check_op_build(said.append)  # nothing built here yet
    assert said == [f"building DeepSpeed's CPU communication op in {tmp_path / 'deepspeed_shm_comm'} "
                    "(once per machine, 1-6 min)"]
    (tmp_path / "deepspeed_shm_comm" / "lock").touch()  # fresh: another node on a shared home may be building
    said.clear()
    check_op_build(said.append)
    assert len(said) == 1 and "another host may be building" in said[0]
    for path in (tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "deepspeed_shm_comm"):
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    with pytest.raises(PretrainError, match="is a stale lock"):
        check_op_build(said.append)


def test_live_op_builder_is_found_by_its_open_lock(tmp_path):
    from pretrain.opbuild import holders

    lock = tmp_path / "lock"
    lock.touch()
    holder = subprocess.Popen([sys.executable, "-c", f"f = open({str(lock)!r}); input()"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: holders(lock), "the holder to open the lock")
        assert holders(lock) == [holder.pid]
    finally:
        holder.communicate("\n")
    assert holders(lock) == []


# ---- one trainer per run dir --------------------------------------------------------------


@pytest.mark.slow
def test_second_trainer_is_refused_and_a_requeued_instance_takes_over(prepared_data, tmp_path):
    run = tmp_path / "run"
    common = ("trainer.max_steps=4", "trainer.save_every=2")
    first = start(prepared_data, run, *common, env={"SLURM_JOB_ID": "4242"}, log=tmp_path / "first.err")
    try:
        wait_for(lambda: holder_pid(run) == first.pid, "the first trainer to hold the lock")
        os.killpg(first.pid, signal.SIGSTOP)  # it keeps its lock while stopped: no race with its end
        snapshot = _files(run)
        # Another trainer: refused at once, naming the holder; it touched nothing of the run.
        proc = pretrain_run(prepared_data, run, *common, check=False)
        assert proc.returncode == 2
        line = error_line(proc)
        assert f"is in use by another xlmr-pretrain (pid {first.pid} on" in line and "SLURM job 4242" in line
        assert _files(run) == snapshot
        status = subprocess.run([sys.executable, "-m", "pretrain.cluster.status", str(run)], capture_output=True,
                                text=True, cwd=REPO, env={**os.environ, **ENV})
        assert f"running      pid {first.pid} on " in status.stdout and "SLURM job 4242" in status.stdout, status
        # The same SLURM job requeued (its old instance still running): it waits, then takes over.
        requeued = start(prepared_data, run, "trainer.max_steps=6", "trainer.save_every=2",
                         env={"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "1"}, log=tmp_path / "requeued.err")
        waited = read_until(requeued, "waiting for the earlier instance of SLURM job 4242")
        os.killpg(first.pid, signal.SIGCONT)
        assert first.wait(timeout=900) == 0, (tmp_path / "first.err").read_text()[-3000:]
        out = "".join(waited) + requeued.communicate(timeout=900)[0]
        assert requeued.returncode == 0, (tmp_path / "requeued.err").read_text()[-3000:]
    finally:
        for proc in (first, locals().get("requeued")):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert "took over" in out and "resuming from step 4" in out
    assert sorted(records(run)) == [1, 2, 3, 4, 5, 6]  # each step once: nothing interleaved
    from pretrain.interop.consolidate import load_model

    for step in (4, 6):  # the first trainer's last checkpoint and the requeued one's
        assert load_model(run, step).step == step


# ---- kill -9 during a save, then a damaged checkpoint.json --------------------------------


STEPS = 30


@pytest.mark.slow
def test_kill_during_save_and_damaged_marker_resume_from_the_previous_checkpoint(prepared_data, tmp_path):
    # A save of the tiny model takes tens of ms: 30 of them, polled every 2 ms, give the test
    # many saves to catch in flight (a faster machine once finished 8 steps between polls).
    common = (f"trainer.max_steps={STEPS}", "trainer.save_every=1", f"trainer.keep_last={STEPS}")
    straight = start(prepared_data, tmp_path / "straight", *common, log=tmp_path / "straight.err")
    run = tmp_path / "run"
    killed = start(prepared_data, run, *common, log=tmp_path / "killed.err")
    ckpts = run / "checkpoints"
    try:
        wait_for(lambda: (ckpts / "step_00000002" / "checkpoint.json").is_file(), "two complete checkpoints")
        while True:  # stop the trainer with a save in flight, then kill it there
            partial = wait_for(lambda: [p for p in ckpts.glob("*.partial")] or killed.poll() is not None,
                               "a save in flight", every=0.002)
            assert killed.poll() is None, "the run ended before a save could be caught"
            os.killpg(killed.pid, signal.SIGSTOP)
            if all(p.exists() for p in partial):
                os.killpg(killed.pid, signal.SIGKILL)
                break
            os.killpg(killed.pid, signal.SIGCONT)  # that save finished meanwhile: catch the next one
        killed.wait()
    finally:
        if killed.poll() is None:
            os.killpg(killed.pid, signal.SIGKILL)
    assert straight.wait(timeout=900) == 0, (tmp_path / "straight.err").read_text()[-3000:]
    complete = sorted(p for p in ckpts.iterdir() if (p / "checkpoint.json").is_file())
    newest, previous = complete[-1], complete[-2]
    marker = newest / "checkpoint.json"
    marker.write_text(marker.read_text()[:40])  # a node lost mid-write, no atomic rename
    status = subprocess.run([sys.executable, "-m", "pretrain.cluster.status", str(run)], capture_output=True,
                            text=True, cwd=REPO, env={**os.environ, **ENV})
    assert status.returncode == 0 and f"damaged      {newest}" in status.stdout, status.stderr
    assert f"checkpoint   {previous}" in status.stdout
    proc = pretrain_run(prepared_data, run, *common)
    assert f"skipping damaged checkpoint {newest}: checkpoint.json is damaged" in proc.stdout
    assert f"removed {partial[0].name}: a checkpoint save that was interrupted" in proc.stdout
    step = int(previous.name.split("_")[1])
    assert f"resuming from step {step}" in proc.stdout
    resumed, reference = records(run), records(tmp_path / "straight")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert {s: resumed[s] for s in range(step + 1, STEPS + 1)} == {s: reference[s] for s in range(step + 1, STEPS + 1)}
    assert records(run, "grad_norm") == records(tmp_path / "straight", "grad_norm")


# ---- a shard damaged while training runs --------------------------------------------------

# Steps 1-2 read only German, steps 3 on only English. A damaged English shard is
# therefore first read after the checkpoint of step 2, whatever the timing.
PHASES = "data.phases=[{until_step: 2, languages: [de]}, {languages: [en]}]"  # until_step: 0-based


def _first_english_shard(data: Path) -> str:
    """The English train shard the single loader slot reads first (data plan: position 0 of the
    language's shard sequence, dealing.py)."""
    from pretrain.data.dealing import ShardSequence
    from pretrain.data.manifest import shards, usable_shards

    manifest = json.loads((data / "manifest.json").read_text())
    usable, _ = usable_shards(shards(data, manifest, "en", "train"))
    return str(ShardSequence(usable, seed=0)[0].path.relative_to(data))


@pytest.mark.slow
def test_shard_damaged_while_training_fails_in_one_line_or_is_skipped_exactly(prepared_data, tmp_path):
    name = _first_english_shard(prepared_data)
    data = _data_copy(prepared_data, tmp_path / "data", copied=("manifest.json", name))
    shard = data / name
    size = shard.stat().st_size
    with open(shard, "r+b") as f:  # bytes flipped in place: same size, so only reading finds it
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in f.read(64)))
        assert shard.stat().st_size == size
    common = ("trainer.max_steps=6", "trainer.save_every=2", "trainer.keep_last=5", PHASES)

    failed = tmp_path / "failed"
    proc = pretrain_run(data, failed, *common, check=False)
    assert proc.returncode == 2
    line = error_line(proc)
    assert f"damaged shard: {shard}" in line and "sample 0" in line
    assert f"xlmr-prep output_dir={data} force=encode" in line and "data.on_damaged_shard=skip" in line
    assert sorted(records(failed)) == [1, 2]
    from pretrain.interop.consolidate import load_model

    assert load_model(failed).step == 2  # the last checkpoint is intact

    # Two single-process runs at once on this machine (each its own rendezvous port): the
    # reference skips from the start; the failed run resumes with the skip and stops at 4.
    skip = ("data.on_damaged_shard=skip",)
    reference = start(data, tmp_path / "reference", *common, *skip, log=tmp_path / "reference.err")
    resumed = start(data, failed, *common, *skip, "trainer.stop_at_step=4", log=tmp_path / "resumed.err")
    out_reference, out_resumed = reference.communicate(timeout=900)[0], resumed.communicate(timeout=900)[0]
    assert reference.returncode == 0, (tmp_path / "reference.err").read_text()[-3000:]
    assert resumed.returncode == 0, (tmp_path / "resumed.err").read_text()[-3000:]
    for out in (out_reference, out_resumed):
        assert f"step 3: skipped damaged shard {name} (1 so far)" in out, out
    assert records(tmp_path / "reference", "damaged_shards")[6] == 1
    # Resumed after the skip, from the checkpoint of step 4: the data position holds.
    final = pretrain_run(data, failed, *common, *skip)
    assert "resuming from step 4" in final.stdout and "skipped damaged shard" not in final.stdout
    assert records(failed) == records(tmp_path / "reference")


# ---- one rendezvous rule ------------------------------------------------------------------


def test_one_rendezvous_rule_for_every_launch_path():
    import socket

    from pretrain.distributed import rendezvous_env

    assert rendezvous_env({"RANK": "3", "WORLD_SIZE": "8", "MASTER_PORT": "29500"}) == {}  # torchrun's own
    with socket.socket() as taken:  # a shell's MASTER_PORT in use by another run on this node
        taken.bind(("127.0.0.1", 0))
        port = str(taken.getsockname()[1])
        single = rendezvous_env({"MASTER_PORT": port})
        assert (single["RANK"], single["WORLD_SIZE"]) == ("0", "1") and single["MASTER_PORT"] != port
    srun = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "node7",
            "SLURM_JOB_ID": "4242"}
    # Direct srun takes the launch path's port: 20000 + (job * 7 + restart * 1009) % 20000.
    assert rendezvous_env(srun)["MASTER_PORT"] == "29694"
    assert rendezvous_env({**srun, "SLURM_RESTART_COUNT": "1"})["MASTER_PORT"] == "30703"
    assert rendezvous_env(srun)["RANK"] == "1" and rendezvous_env(srun)["MASTER_ADDR"] == "node7"
