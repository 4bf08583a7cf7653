"""Checkpoint bookkeeping without DeepSpeed: completion markers, the `latest` pointer,
keep-last pruning, a save killed midway, resume=auto|never|PATH, the data fingerprint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain import checkpoint
from pretrain.config import PretrainError


class FakeEngine:
    """Writes one file per tag the way DeepSpeed's save_checkpoint does; can die midway."""

    def __init__(self, die_at: int | None = None):
        self.die_at = die_at

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # `latest` is ours, written only once the tag is complete
        (Path(save_dir) / tag).mkdir(parents=True)
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_text(json.dumps(client_state["step"]))
        if client_state["step"] == self.die_at:
            raise KeyboardInterrupt("killed while saving")


def _save(engine, run: Path, step: int, keep_last: int = 2) -> Path:
    state = {"step": step, "tokens_seen": 10 * step}
    return checkpoint.save_checkpoint(engine, run, state, {"vocab_sha256": "v", "manifest_sha256": "m"}, keep_last, 0)


def test_save_marks_complete_points_latest_and_keeps_last(tmp_path):
    for step in (1, 2, 3, 4):
        _save(FakeEngine(), tmp_path, step)
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_00000003", "step_00000004"]
    assert (ckpts / "latest").read_text() == "step_00000004"
    meta = checkpoint.read_meta(ckpts / "step_00000004")
    assert (meta["step"], meta["tokens_seen"], meta["format"]) == (4, 40, "xlmr-pretrain-checkpoint")
    assert checkpoint.find_resume_checkpoint(tmp_path, "auto") == ckpts / "step_00000004"


def test_killed_mid_save_resumes_from_previous_good_checkpoint(tmp_path):
    _save(FakeEngine(), tmp_path, 2)
    with pytest.raises(KeyboardInterrupt):
        _save(FakeEngine(die_at=4), tmp_path, 4)
    ckpts = tmp_path / "checkpoints"
    # Nothing named like a tag is incomplete: the interrupted save is a `.partial` dir.
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_00000002", "step_00000004.partial"]
    assert (ckpts / "latest").read_text() == "step_00000002"
    assert checkpoint.find_resume_checkpoint(tmp_path, "auto") == ckpts / "step_00000002"
    # The next run clears what was left (also a tag killed between rename and marker).
    (ckpts / "step_00000003").mkdir()
    assert checkpoint.remove_incomplete(ckpts) == ["step_00000003", "step_00000004.partial"]
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_00000002"]
    with pytest.raises(KeyboardInterrupt):
        _save(FakeEngine(die_at=4), tmp_path, 4)
    _save(FakeEngine(), tmp_path, 4)  # a retried save replaces a leftover `.partial` of its step
    assert checkpoint.find_resume_checkpoint(tmp_path, "auto") == ckpts / "step_00000004"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_00000002", "step_00000004"]


def test_resume_modes(tmp_path):
    assert checkpoint.find_resume_checkpoint(tmp_path / "new", "auto") is None
    assert checkpoint.find_resume_checkpoint(tmp_path / "new", "never") is None
    run = tmp_path / "run"
    _save(FakeEngine(), run, 5)
    with pytest.raises(PretrainError, match="resume=never"):
        checkpoint.find_resume_checkpoint(run, "never")
    tag = run / "checkpoints" / "step_00000005"
    for path in (tag, run / "checkpoints", run):  # a tag, a checkpoints dir or a run dir
        assert checkpoint.find_resume_checkpoint(tmp_path / "other", str(path)) == tag
    with pytest.raises(PretrainError, match="no complete checkpoint"):
        checkpoint.find_resume_checkpoint(tmp_path / "other", str(tmp_path / "nowhere"))


def test_fingerprint_and_compatibility(tmp_path):
    manifest = {"created": "today", "seq_len": 64, "vocab": {"sha256": "abc", "size": 10}, "languages": {"en": {}}}
    fp = checkpoint.data_fingerprint(manifest)
    assert fp == checkpoint.data_fingerprint({**manifest, "created": "tomorrow"})  # re-running the prep
    assert fp["manifest_sha256"] != checkpoint.data_fingerprint({**manifest, "seq_len": 128})["manifest_sha256"]
    tag = tmp_path / "step_00000001"
    tag.mkdir()
    model = {"hidden_size": 64, "vocab_size": 10, "dropout": 0.1}
    (tag / "checkpoint.json").write_text(json.dumps({**fp, "step": 1, "model": model}))
    checkpoint.check_compatible(tag, fp, {**model, "dropout": 0.0})  # dropout may change
    with pytest.raises(PretrainError, match="vocabulary"):
        checkpoint.check_compatible(tag, {**fp, "vocab_sha256": "other"}, model)
    with pytest.raises(PretrainError, match="manifest"):
        checkpoint.check_compatible(tag, {**fp, "manifest_sha256": "other"}, model)
    with pytest.raises(PretrainError, match="model.hidden_size=128"):
        checkpoint.check_compatible(tag, fp, {**model, "hidden_size": 128})


def test_which_resumes_go_through_a_universal_checkpoint():
    def meta(world, stage):
        return {"world_size": world, "zero_stage": stage}
    assert not checkpoint.needs_universal(meta(2, 1), 2, 1)  # unchanged
    assert not checkpoint.needs_universal(meta(2, 0), 4, 0)  # ZeRO-0 holds the whole optimizer state
    assert not checkpoint.needs_universal(meta(2, 3), 2, 3)
    for old, new in (((2, 1), (1, 1)), ((2, 2), (4, 1)), ((2, 1), (2, 2)), ((2, 3), (4, 3))):
        assert checkpoint.needs_universal(meta(*old), *new)
    for old, new, message in (((2, 0), (2, 1), "use deepspeed.zero_stage=0"), ((2, 2), (2, 3), "between 1 and 2 only"),
                              ((2, 3), (1, 2), "use deepspeed.zero_stage=3")):
        with pytest.raises(PretrainError, match=message):
            checkpoint.needs_universal(meta(*old), *new)


def test_resume_skips_damaged_tags_and_refuses_a_damaged_path(tmp_path):
    for step in (1, 2, 3, 4):
        _save(FakeEngine(), tmp_path, step, keep_last=4)
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step_00000004" / "checkpoint.json").write_text('{"step": 4, "vocab_sha')  # cut mid-write
    weights = ckpts / "step_00000003" / "mp_rank_00_model_states.pt"
    weights.write_bytes(weights.read_bytes()[:-1])  # a copy cut short by one byte
    said = []
    assert checkpoint.find_resume_checkpoint(tmp_path, "auto", said.append) == ckpts / "step_00000002"
    assert len(said) == 2 and "step_00000004" in said[0] and "checkpoint.json is damaged" in said[0]
    assert "step_00000003" in said[1] and "mp_rank_00_model_states.pt has" in said[1]
    for tag in ("step_00000004", "step_00000003"):
        with pytest.raises(PretrainError, match=f"{tag} is damaged") as info:
            checkpoint.find_resume_checkpoint(tmp_path / "other", str(ckpts / tag))
        assert "\n" not in str(info.value)
    with pytest.raises(PretrainError, match="checkpoint.json is damaged"):
        checkpoint.read_meta(ckpts / "step_00000004")
    # xlmr-export and xlmr-eval pick their checkpoint the same way.
    from pretrain.interop.consolidate import resolve_tag

    assert resolve_tag(tmp_path) == ckpts / "step_00000002"
    with pytest.raises(PretrainError, match="step_00000003 is damaged: mp_rank_00_model_states.pt has"):
        resolve_tag(tmp_path, 3)
    # Every tag damaged: no silent fresh start over the run; each is reported, then one line.
    (ckpts / "step_00000002" / "checkpoint.json").write_text("[]")
    (ckpts / "step_00000001" / "mp_rank_00_model_states.pt").unlink()
    said.clear()
    with pytest.raises(PretrainError, match="every checkpoint in .* is damaged"):
        checkpoint.find_resume_checkpoint(tmp_path, "auto", said.append)
    assert len(said) == 4 and "mp_rank_00_model_states.pt is missing" in said[3]
