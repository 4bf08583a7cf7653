"""Two real ranks under torchrun with gloo (DS_ACCELERATOR=cpu), tiny model, a few steps:
ZeRO stages agree, 2 ranks == 1 rank with twice the micro batch == gradient accumulation,
and resume is bit-identical (with the same W&B run)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.pretrain.test_train import pretrain_run, records

# ---- fixed data: the same global batch per step whatever the ranks/accumulation split ----
# The real loader's order depends on the world size and micro batch (by design), and masks
# on the rank; to compare splits of one batch, this driver replaces both with functions of
# the step and the row's place in the global batch only.
GLOBAL_BATCH = 8


def fixed_global_batch(step: int, vocab_size: int, seq_len: int, num_langs: int) -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(4, vocab_size - 1, (GLOBAL_BATCH, seq_len), generator=g)
    lengths = torch.randint(seq_len // 4, seq_len + 1, (GLOBAL_BATCH,), generator=g)
    tokens[torch.arange(seq_len)[None, :] >= lengths[:, None]] = 1  # right padding
    return {"input_ids": tokens, "lang": torch.arange(GLOBAL_BATCH) % num_langs}


def content_mask(tokens: torch.Tensor, cfg=None, generator=None, *, vocab_size: int, **_) -> tuple:
    """A mask that depends on token and position only; masked counts vary from row to row,
    so a mean of per-micro-batch means would differ from the mean over the whole batch."""
    cols = torch.arange(tokens.shape[1])
    pick = ((tokens * 31 + cols * 17) % 100 < 15) & (tokens >= 4) & (tokens != vocab_size - 1)
    return torch.where(pick, vocab_size - 1, tokens), torch.where(pick, tokens, -100)


FIXED_DRIVER = """
import sys
import pretrain.train as T
from tests.pretrain.test_train_distributed import GLOBAL_BATCH, content_mask, fixed_global_batch

GAS = int(next(a for a in sys.argv if a.startswith("deepspeed.gradient_accumulation_steps=")).split("=")[1])

def fixed_loader(data_dir, manifest, cfg, rank, world_size, micro_batch_size, consumed_micro_batches=0, plan=None,
                 micro_batches_per_step=1, damaged=()):
    assert world_size * GAS * micro_batch_size == GLOBAL_BATCH
    def stream(consumed):
        while True:
            step, k = divmod(consumed, GAS)
            batch = fixed_global_batch(step, manifest["vocab"]["size"], manifest["seq_len"], len(manifest["languages"]))
            rows = slice((rank * GAS + k) * micro_batch_size, (rank * GAS + k + 1) * micro_batch_size)
            yield {key: value[rows] for key, value in batch.items()}
            consumed += 1
    return stream(consumed_micro_batches)

T.build_train_loader = fixed_loader
T.mask_batch = content_mask
from pretrain.cli import main
main()
"""

NO_DROPOUT = ["model.dropout=0", "model.attention_dropout=0"]


def test_ranks_and_accumulation_split_one_batch_alike(prepared_data, tmp_path):
    driver = tmp_path / "fixed_driver.py"
    driver.write_text(FIXED_DRIVER)
    common = ["trainer.max_steps=4", "deepspeed=zero1", "deepspeed.precision=fp32", *NO_DROPOUT]
    splits = {  # (ranks, micro batch, accumulation): each step's 8 sequences split differently
        "1x8": (1, 8, 1),
        "2x4": (2, 4, 1),
        "1x4x2": (1, 4, 2),
        "2x2x2": (2, 2, 2),
    }
    runs = {}
    for name, (nproc, micro, gas) in splits.items():
        run = tmp_path / name
        pretrain_run(prepared_data, run, *common, f"deepspeed.micro_batch_size={micro}",
                     f"deepspeed.gradient_accumulation_steps={gas}", nproc=nproc, script=driver)
        runs[name] = (records(run), records(run, "grad_norm"))

    # The gradient norm is sensitive to any stray factor (world size, accumulation steps);
    # the losses of steps 2.. to the direction of every update.
    ref_loss, ref_norm = runs["1x8"]
    for name, (loss, norm) in runs.items():
        for step in range(1, 5):
            assert loss[step] == pytest.approx(ref_loss[step], rel=1e-5), (name, step)
            assert norm[step] == pytest.approx(ref_norm[step], rel=1e-4), (name, step)

    # Independent check of step 1: loss and gradient norm of the whole batch, computed here in
    # plain torch as the mean over all its masked tokens.
    from pretrain.model import XLMR, ModelConfig

    manifest = json.loads((prepared_data / "manifest.json").read_text())
    V = manifest["vocab"]["size"]
    torch.manual_seed(0)  # trainer.seed: the initial weights
    model = XLMR(ModelConfig(vocab_size=V, hidden_size=64, num_layers=2, num_heads=2, ffn_size=256,
                             dropout=0.0, attention_dropout=0.0))
    batch = fixed_global_batch(0, V, manifest["seq_len"], len(manifest["languages"]))
    input_ids, labels = content_mask(batch["input_ids"], vocab_size=V)
    out = model(input_ids, labels)
    loss = out.loss_sum / out.num_masked
    loss.backward()
    norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None))
    assert ref_loss[1] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert ref_norm[1] == pytest.approx(norm, rel=1e-4)


@pytest.mark.slow
def test_zero_stages_give_the_same_losses(prepared_data, tmp_path):
    losses = {}
    for stage in (0, 1, 2, 3):
        run = tmp_path / f"zero{stage}"
        pretrain_run(prepared_data, run, "trainer.max_steps=3", f"deepspeed=zero{stage}", "deepspeed.precision=fp32",
                     nproc=2)
        losses[stage] = records(run)
    assert losses[0][1] > 5  # a real loss, not an empty batch
    for stage in (1, 2, 3):
        for step in (1, 2, 3):
            assert losses[stage][step] == pytest.approx(losses[0][step], rel=1e-4), (stage, step, losses)


def _wandb_ids(run: Path) -> set[str]:
    return {p.name.rsplit("-", 1)[1] for p in (run / "wandb").glob("offline-run-*")}


@pytest.mark.slow
def test_resume_is_exact_and_continues_the_wandb_run(prepared_data, tmp_path):
    common = ["trainer.max_steps=6", "trainer.save_every=2", "trainer.keep_last=2", "deepspeed=zero2",
              "deepspeed.precision=fp32", "data.num_workers=2", "wandb.mode=offline"]
    straight = tmp_path / "straight"
    pretrain_run(prepared_data, straight, *common, nproc=2)

    resumed = tmp_path / "resumed"
    first = pretrain_run(prepared_data, resumed, *common, "trainer.stop_at_step=3", nproc=2)
    assert "resuming" not in first.stdout
    ckpts = resumed / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000003"
    # A save killed midway (no completion marker) must be ignored, then replaced.
    (ckpts / "step_00000004").mkdir()
    (ckpts / "step_00000004" / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    second = pretrain_run(prepared_data, resumed, *common, nproc=2)
    assert "resuming from step 3" in second.stdout

    # Bit-identical loss curve (fp32 on CPU): same batches, masks, dropout, optimizer state.
    assert records(resumed) == records(straight)
    assert records(resumed, "grad_norm") == records(straight, "grad_norm")
    assert sorted(records(resumed)) == [1, 2, 3, 4, 5, 6]  # no duplicate records after resume
    # keep_last=2: steps 4 and 6 remain (2 and 3 pruned), each complete.
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000004", "step_00000006"]
    assert all((p / "checkpoint.json").is_file() for p in ckpts.glob("step_*"))
    meta = json.loads((ckpts / "step_00000006" / "checkpoint.json").read_text())
    manifest = json.loads((prepared_data / "manifest.json").read_text())
    assert meta["vocab_sha256"] == manifest["vocab"]["sha256"] and meta["config"]["trainer"]["max_steps"] == 6
    # One W&B run across the restart: both offline run dirs carry the id of the run dir.
    run_id = (resumed / "wandb_run_id").read_text().strip()
    assert len(list((resumed / "wandb").glob("offline-run-*"))) == 2
    assert _wandb_ids(resumed) == {run_id}
    assert _wandb_ids(straight) != {run_id}


@pytest.mark.slow
@pytest.mark.parametrize("stages", [(2, 1, 2), (3, 3, 3)], ids=["zero2-1-2", "zero3"])
def test_resume_on_other_rank_counts_continues_the_same_training(prepared_data, tmp_path, stages):
    """2 ranks -> 1 -> 4, each leg resuming the previous one's checkpoint through DeepSpeed's
    universal checkpoint: with the same global batch per step (the fixed driver), weights,
    Adam moments, step counts and learning-rate schedule carry over, so every step's loss and
    gradient norm are those of an uninterrupted 2-rank run. (ZeRO-3 needs our fixes of
    DeepSpeed's universal load: per-group weight decay and step counts, checkpoint.py.)"""
    driver = tmp_path / "fixed_driver.py"
    driver.write_text(FIXED_DRIVER)
    common = ["trainer.max_steps=6", "deepspeed.precision=fp32", "deepspeed.gradient_accumulation_steps=1", *NO_DROPOUT]
    straight = tmp_path / "straight"
    pretrain_run(prepared_data, straight, *common, f"deepspeed=zero{stages[0]}", "deepspeed.micro_batch_size=4",
                 nproc=2, script=driver)

    resized = tmp_path / "resized"
    legs = [(2, 4, 2), (1, 8, 4), (4, 2, 6)]  # ranks, micro batch, stop at step
    outputs = []
    for (nproc, micro, stop), stage in zip(legs, stages):
        outputs.append(pretrain_run(prepared_data, resized, *common, f"deepspeed=zero{stage}",
                                    f"deepspeed.micro_batch_size={micro}", f"trainer.stop_at_step={stop}",
                                    nproc=nproc, script=driver).stdout)
    assert "through its universal checkpoint" in outputs[1] and "resuming from step 2" in outputs[1]
    assert "through its universal checkpoint" in outputs[2] and "resuming from step 4" in outputs[2]
    assert "data position carried over" in outputs[1]
    meta = json.loads((resized / "checkpoints" / "step_00000006" / "checkpoint.json").read_text())
    assert (meta["world_size"], meta["zero_stage"]) == (4, stages[2])
    for key in ("loss", "grad_norm"):
        expected, got = records(straight, key), records(resized, key)
        assert sorted(got) == list(range(1, 7))
        for step in range(1, 7):
            assert got[step] == pytest.approx(expected[step], rel=1e-5), (key, step, got, expected)
    # What DeepSpeed cannot convert is refused before anything is loaded.
    other = 3 if stages[2] != 3 else 2
    proc = pretrain_run(prepared_data, resized, *common, f"deepspeed=zero{other}", "deepspeed.micro_batch_size=4",
                        "trainer.max_steps=8", nproc=2, script=driver, check=False)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert f"xlmr-pretrain: error: cannot resume a ZeRO-{stages[2]} checkpoint" in proc.stderr, proc.stderr[-2000:]
