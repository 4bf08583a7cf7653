"""Training schedules beyond XLM-R's single mixture: data phases (alpha and language set per
step range) on the real loaders and shards, the masking-rate schedule measured on real masks,
the learning-rate shapes against hand-computed values, and end to end with real DeepSpeed on
CPU: resume across a phase boundary, a decay branch, checkpoint averaging exported to HF.

Expectations are the formulas written out here (q_i ∝ n_i^alpha over the phase's languages,
the schedules' numbers by hand) and runs compared with runs, never the code's own output.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter

import pytest
import torch

from pretrain.config import OptimConfig
from pretrain.data import DataConfig, build_train_loader
from pretrain.masking import NUM_SPECIAL, MaskingConfig, keyed_generator, mask_batch
from pretrain.model import IGNORE_INDEX
from pretrain.optim import lr_factor
from pretrain.schedules import mask_prob_at
from tests.pretrain.test_data import check_rows, data, take, train  # noqa: F401 (fixtures)
from tests.pretrain.test_train import REPO, pretrain_run, records

PHASE0_LANGS = ["de", "en", "fr"]


def phase_q(manifest, alpha, langs=None):
    """q_i ∝ n_i^alpha over `langs` (default: every language with train tokens), written out."""
    n = {lang: s["train"]["tokens"] for lang, s in manifest["languages"].items() if s["train"]["tokens"] > 0}
    w = {lang: v**alpha for lang, v in n.items() if langs is None or lang in langs}
    return {lang: v / sum(w.values()) for lang, v in w.items()}


# ---------------------------------------------------------------- phases on the real loader


def test_phase_shares_follow_each_phase_temperature_and_change_at_the_step_boundary(data, train):
    """Phase 0 (the first 40 steps of 2 micro-batches each) mixes de/en/fr with alpha 1.0,
    phase 1 everything with alpha 0.3; over 2 workers. Each micro-batch's samples are counted
    in the phase of its step (micro-batch i is consumed in step i // 2): counts within
    4.5 binomial sigma of the phase's formula, and no sample of a language outside phase 0."""
    data_dir, manifest, _ = data
    gas, micro, boundary = 2, 32, 40
    phases = [{"until_step": boundary, "alpha": 1.0, "languages": PHASE0_LANGS}, {"alpha": 0.3}]
    cfg = DataConfig(num_workers=2, phases=phases)
    loader = build_train_loader(data_dir, manifest, cfg, 0, 1, micro, micro_batches_per_step=gas)
    counts = [Counter(), Counter()]
    for i, batch in enumerate(take(loader, 2 * boundary * gas)):
        check_rows(batch, manifest, train)
        counts[int(i // gas >= boundary)].update(train[key][0] for key in batch["keys"])
    for phase, (alpha, langs) in enumerate([(1.0, PHASE0_LANGS), (0.3, None)]):
        q, total = phase_q(manifest, alpha, langs), boundary * gas * micro
        assert sum(counts[phase].values()) == total
        assert set(counts[phase]) <= set(q), (phase, set(counts[phase]) - set(q))
        for lang, p in q.items():
            std = math.sqrt(total * p * (1 - p))
            assert abs(counts[phase][lang] - total * p) <= 4.5 * std + 1, (phase, lang, counts[phase][lang], total * p)
    # the phases are measurably different: phase 1 has languages phase 0 never drew
    assert len(set(counts[1]) - set(PHASE0_LANGS)) >= 5


@pytest.mark.parametrize("consumed", [79, 80, 81], ids=["before", "at", "after"])
def test_resume_across_a_phase_boundary_gives_the_uninterrupted_batches(data, consumed):
    """The boundary is micro-batch 80 (step 40 x 2 micro-batches): a loader resumed one
    micro-batch before, at, or after it yields exactly the uninterrupted loader's batches."""
    data_dir, manifest, _ = data
    cfg = DataConfig(num_workers=2, phases=[{"until_step": 40, "alpha": 1.0, "languages": PHASE0_LANGS}, {"alpha": 0.3}])
    straight = take(build_train_loader(data_dir, manifest, cfg, 0, 1, 8, micro_batches_per_step=2), consumed + 20)
    resumed = take(build_train_loader(data_dir, manifest, cfg, 0, 1, 8, consumed, micro_batches_per_step=2), 20)
    assert [b["keys"] for b in resumed] == [b["keys"] for b in straight[consumed:]]


def test_bad_phases_fail_with_one_line(data):
    data_dir, manifest, _ = data
    for phases, message in [([{"until_step": 5}], "the last phase runs to the end"),
                            ([{"until_step": 5}, {"until_step": 3}, {}], "increasing steps"),
                            ([{"alpha": 0.5, "languages": ["xx"]}], "not languages with train data"),
                            ([{"until_step": 5, "mask_prob": 2.0}, {}], "mask_prob")]:
        with pytest.raises(ValueError, match=message):
            build_train_loader(data_dir, manifest, DataConfig(num_workers=0, phases=phases), 0, 1, 4)


# ---------------------------------------------------------------- the masking-rate schedule


def test_mask_prob_schedules_hand_computed():
    def at(schedule, step):
        cfg = MaskingConfig(mask_prob=0.3, end_mask_prob=0.05, schedule=schedule, schedule_start=10, schedule_end=30)
        return mask_prob_at(step, cfg, max_steps=100)

    assert [at("constant", s) for s in (0, 20, 99)] == [0.3, 0.3, 0.3]
    assert [at("linear", s) for s in (0, 10, 15, 20, 30, 50)] == pytest.approx([0.3, 0.3, 0.2375, 0.175, 0.05, 0.05])
    # cosine: 0.05 + 0.25 * (1 + cos(pi * p)) / 2 at p = 0.25, 0.5
    assert [at("cosine", s) for s in (10, 15, 20, 30)] == pytest.approx([0.3, 0.263388, 0.175, 0.05], abs=1e-6)
    assert [at("step", s) for s in (9, 10, 50)] == [0.3, 0.05, 0.05]
    # a phase's own rate wins inside the phase
    assert mask_prob_at(15, MaskingConfig(schedule="linear"), 100, phase_mask_prob=0.4) == 0.4


def test_measured_masking_rate_follows_the_schedule_and_the_split_is_configurable(data):
    """Real batches masked at the schedule's rate of their step: the selected share of the
    non-special tokens is the rate within 0.01 (fairseq's floor(p n + u) makes its mean
    exact); with mask_token_prob 0.5, random_token_prob 0.3 the selected tokens split 50/30/20."""
    data_dir, manifest, _ = data
    vocab = manifest["vocab"]["size"]
    batches = take(build_train_loader(data_dir, manifest, DataConfig(num_workers=0), 0, 1, 64), 4)
    cfg = MaskingConfig(mask_prob=0.3, end_mask_prob=0.05, schedule="linear", schedule_start=0, schedule_end=100,
                        mask_token_prob=0.5, random_token_prob=0.3)
    split = Counter()
    for step in (0, 50, 100):
        rate = mask_prob_at(step, cfg, max_steps=100)
        selected = eligible = 0
        for k, batch in enumerate(batches):
            tokens = batch["input_ids"]
            inputs, labels = mask_batch(tokens, cfg, keyed_generator("t", step, k), vocab_size=vocab, mask_prob=rate)
            chosen = labels.ne(IGNORE_INDEX)
            selected += int(chosen.sum())
            eligible += int(((tokens >= NUM_SPECIAL) & (tokens != vocab - 1)).sum())
            split["mask"] += int((chosen & inputs.eq(vocab - 1)).sum())
            split["keep"] += int((chosen & inputs.eq(tokens)).sum())
            split["all"] += int(chosen.sum())
        assert abs(selected / eligible - rate) < 0.01, (step, selected / eligible, rate)
    assert split["mask"] / split["all"] == pytest.approx(0.5, abs=0.03)
    # kept: the 20% left as they are, plus random draws that hit the original (1 in ~2000)
    assert split["keep"] / split["all"] == pytest.approx(0.2, abs=0.03)


# ---------------------------------------------------------------- learning-rate shapes


def test_lr_schedules_hand_computed():
    def factors(max_steps=10, **kw):
        return [lr_factor(s, OptimConfig(lr=1.0, **kw), max_steps) for s in range(max_steps + 1)]

    warm = [1 / 3, 2 / 3]  # (step + 1) / (warmup + 1) with warmup 2
    # wsd: warmup 2, stable to step 6, decay over 4 steps to end_lr 0.1
    assert factors(schedule="wsd", warmup_steps=2, decay_steps=4, end_lr=0.1) == pytest.approx(
        warm + [1, 1, 1, 1, 1, 0.775, 0.55, 0.325, 0.1])
    assert factors(schedule="wsd", warmup_steps=2, decay_steps=4, decay_shape="cosine") == pytest.approx(
        warm + [1, 1, 1, 1, 1, 0.853553, 0.5, 0.146447, 0.0], abs=1e-6)
    assert factors(schedule="wsd", warmup_steps=2, decay_steps=4, decay_shape="sqrt") == pytest.approx(
        warm + [1, 1, 1, 1, 1, 0.5, 0.292893, 0.133975, 0.0], abs=1e-6)
    # a decay branch: decay_start at the checkpoint's step, to max_steps
    assert factors(schedule="wsd", warmup_steps=2, decay_start=4) == pytest.approx(
        warm + [1, 1, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0])
    # inverse_sqrt: sqrt(warmup / step) after a warmup of 4
    assert factors(schedule="inverse_sqrt", warmup_steps=4)[3:] == pytest.approx(
        [0.8, 1.0, 0.894427, 0.816497, 0.755929, 0.707107, 0.666667, 0.632456], abs=1e-6)
    # linear and polynomial as before: (1 - (s - w) / (T - w))^power
    assert factors(schedule="polynomial", warmup_steps=2, power=2.0)[2:] == pytest.approx(
        [(1 - (s - 2) / 8) ** 2 for s in range(2, 11)])


# ---------------------------------------------------------------- end to end, real DeepSpeed on CPU

PHASED = ["trainer.max_steps=6", "deepspeed.precision=fp32", "deepspeed.gradient_accumulation_steps=2",
          "data.num_workers=2", "trainer.save_every=1", "trainer.keep_last=10",
          f"data.phases=[{{until_step: 3, alpha: 1.0, languages: [{', '.join(PHASE0_LANGS)}], mask_prob: 0.3}}, "
          "{alpha: 0.3, mask_prob: 0.1}]"]


def full_records(run):
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


@pytest.mark.slow
def test_kill_and_resume_across_a_phase_boundary_equals_the_uninterrupted_run(prepared_data, tmp_path):
    """Legs stopping before (2), at (3) and after (4) the boundary of step 3, then to 6:
    every step's loss, gradient norm, language shares and masking rate are those of the
    uninterrupted run; the metrics show the phases."""
    straight = tmp_path / "straight"
    out = pretrain_run(prepared_data, straight, *PHASED).stdout
    assert "step 0: phase 0, alpha 1.0, languages de en fr" in out and "step 3: phase 1, alpha 0.3" in out
    resumed = tmp_path / "resumed"
    for stop in (2, 3, 4, 6):
        pretrain_run(prepared_data, resumed, *PHASED, f"trainer.stop_at_step={stop}")
    a, b = full_records(straight), full_records(resumed)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        for key in ("loss", "grad_norm", "mask_prob", "alpha", "masked_fraction"):
            assert b[step][key] == a[step][key], (step, key)
        shares = {k: v for k, v in a[step].items() if k.startswith("lang_share/")}
        assert {k: b[step][k] for k in shares} == shares
        assert sum(shares.values()) == pytest.approx(1.0)
        phase0 = step <= 3
        assert a[step]["mask_prob"] == (0.3 if phase0 else 0.1) and a[step]["phase"] == (0 if phase0 else 1)
        out_of_phase = [v for k, v in shares.items() if k.split("/")[1] not in PHASE0_LANGS]
        assert (sum(out_of_phase) == 0) == phase0, (step, shares)
        # the measured masked share of non-pad tokens sits a little under the rate (<s>, </s> never masked)
        assert a[step]["mask_prob"] - 0.05 < a[step]["masked_fraction"] <= a[step]["mask_prob"] + 0.01
    # the plot of the language shares
    proc = subprocess.run([sys.executable, "-c", "from pretrain.cli import plot_main; plot_main()", str(straight)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert (straight / "plots" / "lang_share.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


WSD = ["trainer.max_steps=6", "deepspeed.precision=fp32", "optim.schedule=wsd", "optim.warmup_steps=1",
       "trainer.save_every=3", "trainer.keep_last=2", "data.num_workers=1"]


@pytest.mark.slow
def test_decay_branch_equals_a_run_with_that_decay_and_averaging_exports_the_mean(prepared_data, tmp_path):
    """A stable run (its decay after max_steps) checkpointed at step 3; a branch in a new run
    dir resumes it with the decay starting there: steps 4-6 equal a run that had that decay
    from the start, and the stable run's files are untouched. Then xlmr-export --average 2 of
    the decayed run (steps 3 and 6) is the mean of the two checkpoints' own HF exports."""
    stable, decayed, branch = tmp_path / "stable", tmp_path / "decayed", tmp_path / "branch"
    pretrain_run(prepared_data, stable, *WSD, "optim.decay_start=100", "trainer.stop_at_step=3")
    before = sorted((p, p.stat().st_mtime_ns, p.stat().st_size) for p in stable.rglob("*"))
    pretrain_run(prepared_data, decayed, *WSD, "optim.decay_start=3")
    pretrain_run(prepared_data, branch, *WSD, "optim.decay_start=3", f"resume={stable}/checkpoints/step_00000003")
    assert sorted((p, p.stat().st_mtime_ns, p.stat().st_size) for p in stable.rglob("*")) == before
    for key in ("loss", "grad_norm", "lr"):
        want, got = records(decayed, key), records(branch, key)
        assert sorted(got) == [4, 5, 6]
        assert {s: got[s] for s in (4, 5, 6)} == {s: want[s] for s in (4, 5, 6)}, key
    assert records(decayed, "lr")[3] == records(stable, "lr")[3]  # the stable run at the branch point
    assert (branch / "wandb_run_id").read_text() != (stable / "wandb_run_id").read_text()

    from safetensors.torch import load_file
    from transformers import AutoModelForMaskedLM

    def export(*args):
        proc = subprocess.run([sys.executable, "-m", "pretrain.interop.export", *map(str, args)],
                              capture_output=True, text=True, cwd=REPO, env={"DS_ACCELERATOR": "cpu", **_env()})
        assert proc.returncode == 0, proc.stderr[-3000:]

    export(decayed, 3, tmp_path / "hf3")
    export(decayed, 6, tmp_path / "hf6")
    export(decayed, tmp_path / "avg", "--average", "2")
    one, two = load_file(tmp_path / "hf3" / "model.safetensors"), load_file(tmp_path / "hf6" / "model.safetensors")
    mean = load_file(tmp_path / "avg" / "model.safetensors")
    assert set(mean) == set(one)
    for name in one:
        torch.testing.assert_close(mean[name], (one[name].double() + two[name].double()).div(2).float(),
                                   rtol=0, atol=1e-6, msg=name)
    assert any(not torch.equal(one[n], two[n]) for n in one)  # the two differ: the mean is not either
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "avg")
    torch.testing.assert_close(model.roberta.embeddings.word_embeddings.weight,
                               mean["roberta.embeddings.word_embeddings.weight"])
    provenance = json.loads((tmp_path / "avg" / "xlmr_export.json").read_text())
    assert provenance["step"] == 6 and len(provenance["averaged"]) == 2


def _env():
    import os
    return {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.mark.parametrize("whole_word", [False, True])
def test_loader_workers_mask_as_the_step_would(data, whole_word):
    """The trainer's loader masks in its 2 workers; every micro-batch, also after a resume at
    step 3 with 2 micro-batches per step and a linear masking-rate schedule, carries the mask of
    mask_batch(its tokens, masking_generator(seed, step, rank, micro-batch)) at its step's rate,
    and the host-made positions, counts and flags of those labels."""
    from pretrain.masking import TrainMasking, load_word_starts, masking_generator

    data_dir, manifest, _ = data
    V = manifest["vocab"]["size"]
    word_start = load_word_starts(data_dir / manifest["vocab"]["spm_model"]) if whole_word else None
    cfg = MaskingConfig(whole_word=whole_word, schedule="linear", mask_prob=0.1, end_mask_prob=0.4)
    dcfg = DataConfig(num_workers=2)
    consumed, gas, rank, world = 6, 2, 1, 2
    masking = TrainMasking(cfg, seed=7, rank=rank, vocab_size=V, micro_batches_per_step=gas, max_steps=10,
                           first_step=consumed // gas, first_index=consumed, word_start=word_start)
    plain = take(build_train_loader(data_dir, manifest, dcfg, rank, world, 8, consumed, micro_batches_per_step=gas), 6)
    masked = take(build_train_loader(data_dir, manifest, dcfg, rank, world, 8, consumed, micro_batches_per_step=gas,
                                     masking=masking), 6)
    for i, (tokens, got) in enumerate(zip(plain, masked)):
        step, micro = 3 + i // gas, i % gas
        rate = mask_prob_at(step, cfg, 10)
        assert rate == pytest.approx(0.1 + 0.3 * step / 10)
        input_ids, labels = mask_batch(tokens["input_ids"], cfg, masking_generator(7, step, rank, micro), vocab_size=V,
                                       word_start=word_start, mask_prob=rate)
        assert got["keys"] == tokens["keys"]
        assert torch.equal(got["input_ids"], input_ids) and torch.equal(got["labels"], labels)
        selected = labels.ne(IGNORE_INDEX).flatten()
        n = int(selected.sum())
        assert int(got["num_masked"]) == n and got["positions"].numel() % 128 == 0
        assert torch.equal(got["positions"][:n], selected.nonzero().squeeze(1)) and (got["positions"][n:] == -1).all()
        assert got["padded"] == bool(tokens["input_ids"].eq(1).any())
        assert torch.equal(got["seq_tokens"], tokens["input_ids"].ne(1).sum(dim=1))
