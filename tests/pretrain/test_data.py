"""The data loaders on real `xlmr-prep` output (the `prepared_data` fixture).

Expectations come from the manifest and from reading the tars directly with tarfile + numpy,
never from the loaders themselves.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import shutil
import sys
import tarfile
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.data import (
    DataConfig, ShardError, build_train_loader, build_valid_loaders, carry_over_plan, load_manifest,
)
from pretrain.data import position as data_position
from pretrain.data.dealing import ShardSequence
from pretrain.data.manifest import shards

SLOTS = 4  # 2 ranks x 2 workers


# ---------------------------------------------------------------- reading the data directly


def slot_shards(language_shards, *, seed: int, slot: int, num_slots: int):
    """(position, shard) that `slot` reads in a run's first generation (no layout change)."""
    plan = data_position.first_plan(data_position.layout(num_slots, 1, 1))
    sequence = ShardSequence(language_shards, seed=seed)
    for at, start in data_position.slot_items(plan, language_shards[0].lang, slot):
        assert start == 0
        yield at, sequence[at]


def locate(language_shards, consumed: int, *, seed: int, slot: int, num_slots: int) -> tuple[int, int]:
    plan = data_position.first_plan(data_position.layout(num_slots, 1, 1))
    items = data_position.slot_items(plan, language_shards[0].lang, slot)
    return data_position.progress(items, ShardSequence(language_shards, seed=seed).samples, consumed)


def read_tar(path: Path, dtype: str) -> list[tuple[str, np.ndarray]]:
    """(key, tokens) of every sample of a shard, in order, with tarfile + numpy only."""
    out = []
    with tarfile.open(path, "r|") as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            assert ext == "tokens.npy", member.name
            npy = tar.extractfile(member).read()
            if not out:  # np.load parses the header; for speed the rest only skip it (npy v1)
                assert np.load(io.BytesIO(npy)).dtype == np.dtype(dtype)
            assert npy[:8] == b"\x93NUMPY\x01\x00", member.name
            out.append((key, np.frombuffer(npy, dtype=dtype, offset=10 + int.from_bytes(npy[8:10], "little"))))
    return out


@pytest.fixture(scope="module")
def data(prepared_data):
    """The manifest, and every sample by (lang, split): list of (shard path, position, key, tokens)."""
    manifest = json.loads((prepared_data / "manifest.json").read_text())
    samples = defaultdict(list)
    for shard in manifest["shards"]:
        rows = read_tar(prepared_data / shard["path"], manifest["dtype"])
        assert len(rows) == shard["samples"], shard["path"]
        samples[shard["lang"], shard["split"]] += [(shard["path"], i, key, tok) for i, (key, tok) in enumerate(rows)]
    return prepared_data, manifest, samples


def expected_q(manifest, alpha):
    """q_i ∝ n_i^alpha with n_i the train tokens (the issue's formula, written out here)."""
    n = {lang: stats["train"]["tokens"] for lang, stats in manifest["languages"].items() if stats["train"]["tokens"] > 0}
    w = {lang: v**alpha for lang, v in n.items()}
    return {lang: v / sum(w.values()) for lang, v in w.items()}


def take(loader, n):
    it = iter(loader)
    try:
        return list(itertools.islice(it, n))
    finally:
        # After a worker's error torch's reraise leaves the iterator in a reference cycle; its
        # workers would be shut down by a later gc, at a cost of 2 x 5 s join timeouts there.
        if hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


def check_rows(batch, manifest, train):
    """Each row is its key's tokens from the tar, right-padded with <pad>, and the right lang."""
    langs = sorted(manifest["languages"])
    pad, seq_len = manifest["vocab"]["special_ids"]["pad"], manifest["seq_len"]
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape[1] == seq_len
    for row, lang, key in zip(batch["input_ids"].numpy(), batch["lang"].tolist(), batch["keys"]):
        key_lang, tokens = train[key]
        assert langs[lang] == key_lang
        assert (row[: len(tokens)] == tokens).all() and (row[len(tokens):] == pad).all()


@pytest.fixture(scope="module")
def train(data):
    """key -> (lang, tokens) of every train sample."""
    _, _, samples = data
    by_key = {key: (lang, tok) for (lang, split), rows in samples.items() if split == "train" for _, _, key, tok in rows}
    assert len(by_key) == sum(len(r) for (_, split), r in samples.items() if split == "train"), "train keys repeat"
    return by_key


# ---------------------------------------------------------------- manifest


def test_missing_data_dir_or_manifest_says_run_prep(tmp_path, prepared_data):
    with pytest.raises(FileNotFoundError, match="does not exist: run xlmr-prep first"):
        load_manifest(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="is empty: run xlmr-prep first"):
        load_manifest(tmp_path)
    (tmp_path / "shards").mkdir()
    with pytest.raises(FileNotFoundError, match="no manifest.json.*run xlmr-prep first"):
        load_manifest(tmp_path)
    manifest = json.loads((prepared_data / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(ValueError, match="version 2"):
        load_manifest(tmp_path)
    assert load_manifest(prepared_data) == manifest


# ---------------------------------------------------------------- mixing


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_language_mix_matches_temperature_sampling_without_resharding(data, train, alpha):
    data_dir, manifest, _ = data
    def data_files():
        return sorted((p, p.stat().st_mtime_ns) for p in [data_dir / "manifest.json", *data_dir.glob("shards/**/*")])

    before = data_files()
    batch_size, batches = 64, 120
    loader = build_train_loader(data_dir, manifest, DataConfig(alpha=alpha, num_workers=0), 0, 1, batch_size)
    counts = Counter()
    for batch in take(loader, batches):
        check_rows(batch, manifest, train)
        counts.update(train[key][0] for key in batch["keys"])
    total = batch_size * batches
    q = expected_q(manifest, alpha)
    assert set(counts) <= set(q)
    for lang, p in q.items():
        std = math.sqrt(total * p * (1 - p))
        assert abs(counts[lang] - total * p) <= 4.5 * std + 1, (lang, counts[lang], total * p)
    # alpha moves the mix measurably (the biggest language gains from 0.3 to 1.0) ...
    big = max(q, key=q.get)
    assert abs(expected_q(manifest, 1.0)[big] - expected_q(manifest, 0.3)[big]) * total > 10 * math.sqrt(total)
    # ... and no file of the data dir was written
    assert data_files() == before


# ---------------------------------------------------------------- splitting over ranks and workers


def test_each_epoch_deals_every_train_shard_to_exactly_one_slot(data):
    data_dir, manifest, _ = data
    for lang in manifest["languages"]:
        expected = sorted(s["path"] for s in manifest["shards"] if s["lang"] == lang and s["split"] == "train")
        language_shards = shards(data_dir, manifest, lang, "train")
        epochs = 3
        dealt = defaultdict(list)  # epoch -> shard paths
        for slot in range(SLOTS):
            for position, shard in slot_shards(language_shards, seed=0, slot=slot, num_slots=SLOTS):
                if position >= epochs * len(expected):
                    break
                assert position % SLOTS == slot
                dealt[position // len(expected)].append(str(shard.path.relative_to(data_dir)))
        assert [sorted(dealt[e]) for e in range(epochs)] == [expected] * epochs, lang
        if len(expected) > 2:
            assert dealt[0] != dealt[1], "shard order is reshuffled each epoch"


def test_two_ranks_two_workers_read_each_sample_once_per_epoch(data, train):
    """The real loaders, with worker processes: per slot and language the stream is its shards
    in order (each shard's samples once, shuffled), and the shards that make up an epoch
    hold every sample of the language once."""
    data_dir, manifest, samples = data
    cfg, batch_size, batches = DataConfig(alpha=0.0, num_workers=2, shuffle_block=16), 32, 130
    langs = sorted(manifest["languages"])
    seen = defaultdict(list)  # (slot, lang) -> keys in stream order
    for rank in range(2):
        for i, batch in enumerate(take(build_train_loader(data_dir, manifest, cfg, rank, 2, batch_size), batches)):
            check_rows(batch, manifest, train)
            for lang, key in zip(batch["lang"].tolist(), batch["keys"]):
                seen[rank * 2 + i % 2, langs[lang]].append(key)
    shard_keys = defaultdict(list)  # shard path -> keys (from the tars)
    for rows in samples.values():
        for path, _, key, _ in rows:
            shard_keys[path].append(key)
    whole_epochs = 0
    for lang in manifest["languages"]:
        language_shards = shards(data_dir, manifest, lang, "train")
        read = defaultdict(list)  # position in the language's shard sequence -> keys read there
        for slot in range(SLOTS):
            stream = seen[slot, lang]
            for position, shard in slot_shards(language_shards, seed=cfg.seed, slot=slot, num_slots=SLOTS):
                if not stream:
                    break
                expected = shard_keys[str(shard.path.relative_to(data_dir))]
                part, stream = stream[: len(expected)], stream[len(expected):]
                assert len(set(part)) == len(part) and set(part) <= set(expected), (lang, slot, position)
                if len(part) == len(expected):
                    read[position] = part
        k, everything = len(language_shards), {key for _, _, key, _ in samples[lang, "train"]}
        for epoch in range(max(read, default=0) // k + 1):
            if all(p in read for p in range(epoch * k, (epoch + 1) * k)):
                keys = [key for p in range(epoch * k, (epoch + 1) * k) for key in read[p]]
                assert len(keys) == len(everything) and set(keys) == everything, (lang, epoch)
                whole_epochs += 1
    assert whole_epochs >= 3, "too short to see whole epochs"


# ---------------------------------------------------------------- exact resume


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_gives_the_batches_of_an_uninterrupted_run(data, num_workers):
    data_dir, manifest, _ = data
    cfg, batch_size, total = DataConfig(alpha=0.0, num_workers=num_workers, shuffle_block=8), 16, 180
    straight = take(build_train_loader(data_dir, manifest, cfg, 1, 2, batch_size), total)
    # the stopping points cross shard and epoch ends of some languages:
    keys = [key for batch in straight[:101] for key in batch["keys"]]
    assert len(set(keys)) < len(keys)
    for stop in (1, 101):
        resumed = take(build_train_loader(data_dir, manifest, cfg, 1, 2, batch_size, consumed_micro_batches=stop), total - stop)
        for a, b in zip(straight[stop:], resumed, strict=True):
            assert a["keys"] == b["keys"]
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["lang"], b["lang"])


def test_resume_locates_shard_and_offset_from_counts(data):
    """The position after n samples of a language is arithmetic on the manifest's counts."""
    data_dir, manifest, samples = data
    for lang in manifest["languages"]:
        language_shards = shards(data_dir, manifest, lang, "train")
        n = len(samples[lang, "train"])
        # one slot reads whole epochs: 10 epochs are 10 * k shards
        assert locate(language_shards, 10 * n, seed=0, slot=0, num_slots=1) == (10 * len(language_shards), 0)
        assert locate(language_shards, 10 * n - 1, seed=0, slot=0, num_slots=1)[0] == 10 * len(language_shards) - 1
        # slot 3 of 4: after its first shard and part of its second (shards as dealt, checked above)
        first, second = [shard for _, shard in itertools.islice(slot_shards(language_shards, seed=0, slot=3, num_slots=4), 2)]
        into = second.samples // 2
        assert locate(language_shards, first.samples + into, seed=0, slot=3, num_slots=4) == (1, into)
        assert locate(language_shards, first.samples + second.samples, seed=0, slot=3, num_slots=4) == (2, 0)


# Phase boundaries inside the first two generations below (micro-batches 0-30, 30-60; 1 per step).
PHASES = [{"until_step": 20, "alpha": 1.0, "languages": ["de", "en", "fr", "ru"]}, {"until_step": 45, "alpha": 0.3},
          {"alpha": 0.7, "languages": ["en", "es", "ja", "ru"]}]


@pytest.mark.parametrize("phases", [[], PHASES], ids=["one-mixture", "phases"])
def test_changing_ranks_and_workers_neither_repeats_nor_skips_a_sample(data, train, phases):
    """2 ranks x 2 workers -> 1 rank x 2 workers -> 4 ranks x 1 worker (and other micro
    batches), each carrying the data position over (with phases: across phase changes inside
    the generations, each micro-batch drawn only from its step's languages): every shard is read in its own order from
    its first sample on, without gaps or repeats, and at the end at most one shard per slot of
    the last layout is left partly read (a skipped rest would stay partly read forever).
    Checked on the languages with at least 8 shards, which stay within their first epoch
    (with fewer shards than slots, consecutive epochs run side by side: see dealing.py)."""
    data_dir, manifest, samples = data
    base = DataConfig(alpha=0.5, shuffle_block=1, phases=phases)  # shard order = tar order: prefixes are checkable
    generations = [(2, 2, 8, 30), (1, 2, 16, 30), (4, 1, 4, 30)]  # ranks, workers, micro batch, micro-batches per rank
    consumed, plan, keys = 0, None, defaultdict(list)  # shard path -> keys read from it
    shard_of = {key: path for rows in samples.values() for path, _, key, _ in rows}
    for world, workers, micro, batches in generations:
        cfg = DataConfig(**{**base.__dict__, "num_workers": workers})
        if plan is not None:
            plan = carry_over_plan(data_dir, manifest, cfg, plan, consumed, world, micro)
            assert plan["layout"] == {"world_size": world, "num_workers": workers, "micro_batch_size": micro}
        for rank in range(world):
            loader = build_train_loader(data_dir, manifest, cfg, rank, world, micro, consumed, plan)
            plan = loader.dataset.plan
            for i, batch in enumerate(take(loader, batches)):
                check_rows(batch, manifest, train)
                step = consumed + i
                allowed = next((p.get("languages") for p in phases if step < p.get("until_step", math.inf)), None)
                assert allowed is None or {train[key][0] for key in batch["keys"]} <= set(allowed), (step, allowed)
                for key in batch["keys"]:
                    keys[shard_of[key]].append(key)
        consumed += batches
    order = {path: [key for p, _, key, _ in rows if p == path] for rows in samples.values() for path in {r[0] for r in rows}}
    total = sum(world * batches * micro for world, _, micro, batches in generations)
    assert sum(len(k) for k in keys.values()) == total
    partly_read = defaultdict(int)
    many_shards = {lang for lang, n in Counter(s["lang"] for s in manifest["shards"] if s["split"] == "train").items() if n >= 8}
    for path, read in keys.items():
        if path.split("/")[1] not in many_shards:
            continue
        assert read == order[path][: len(read)], f"{path}: not read in order from its start, or twice"
        if len(read) < len(order[path]):
            partly_read[path.split("/")[1]] += 1
    assert partly_read and max(partly_read.values()) <= 4, partly_read
    assert sum(partly_read.values()) > 2 * len(partly_read), "too short to leave shards partly read"


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("world_size, cap", [(2, None), (3, 5)])
def test_validation_reads_every_held_out_sample_once_across_ranks(data, world_size, cap):
    data_dir, manifest, samples = data
    cfg = DataConfig(valid_max_sequences_per_lang=cap)
    langs = sorted(manifest["languages"])
    pad = manifest["vocab"]["special_ids"]["pad"]
    read = defaultdict(list)
    for rank in range(world_size):
        for lang, loader in build_valid_loaders(data_dir, manifest, cfg, rank, world_size, batch_size=7).items():
            batches = list(loader)
            assert len(batches) == len(loader)
            for batch in batches:
                assert (batch["lang"] == langs.index(lang)).all()
                read[lang] += [(key, row) for key, row in zip(batch["keys"], batch["input_ids"].numpy())]
    for lang in manifest["languages"]:
        expected = samples[lang, "valid"][:cap]
        assert [key for key, _ in read[lang]] == [key for _, _, key, _ in expected], lang
        for (_, row), (_, _, _, tokens) in zip(read[lang], expected):
            assert (row[: len(tokens)] == tokens).all() and (row[len(tokens):] == pad).all()


# ---------------------------------------------------------------- damaged data


def linked_copy(src: Path, dst: Path) -> Path:
    """A data dir whose files are symlinks to src's (damage one by replacing its link)."""
    shutil.copytree(src, dst, copy_function=os.symlink)
    return dst


def replace_with_copy(path: Path) -> Path:
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)
    return path


def first_read_shard(manifest, lang):
    """The manifest entry of the shard a one-slot stream of ``lang`` reads first (epoch 0, position 0)."""
    entries = [s for s in manifest["shards"] if s["lang"] == lang and s["split"] == "train"]
    first = ShardSequence(shards(Path("."), manifest, lang, "train"), seed=0)[0]
    return next(s for s in entries if Path(s["path"]) == first.path)


def test_truncated_shard_is_skipped_with_a_warning_and_counted(data, tmp_path):
    data_dir, manifest, samples = data
    big = max(manifest["languages"], key=lambda lang: manifest["languages"][lang]["train"]["shards"])
    shard = first_read_shard(manifest, big)
    copy = linked_copy(data_dir, tmp_path / "data")
    damaged = replace_with_copy(copy / shard["path"])
    os.truncate(damaged, shard["bytes"] // 2)
    lost = {key for key, _ in read_tar(data_dir / shard["path"], manifest["dtype"])}

    loader = build_train_loader(copy, manifest, DataConfig(num_workers=0, alpha=1.0), 0, 1, 32)
    assert loader.dataset.skipped_shards == []  # nothing is checked before the stream reaches it
    with pytest.warns(UserWarning, match="skipping shard .*" + shard["path"]):
        keys = [key for batch in take(loader, 60) for key in batch["keys"]]
    assert [s.path for s in loader.dataset.skipped_shards] == [damaged]
    assert sum(key.startswith(big + "-") for key in keys) > 100
    assert not lost & set(keys)


def test_resume_past_a_skipped_shard_is_exact(data, tmp_path):
    """The skip is decided by the shard's file alone, so a resumed stream (which replays past
    the damaged shard without reading) continues exactly where the uninterrupted one was."""
    data_dir, manifest, _ = data
    big = max(manifest["languages"], key=lambda lang: manifest["languages"][lang]["train"]["shards"])
    shard = first_read_shard(manifest, big)
    copy = linked_copy(data_dir, tmp_path / "data")
    (copy / shard["path"]).unlink()  # missing
    cfg = DataConfig(num_workers=2, alpha=1.0, shuffle_block=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = take(build_train_loader(copy, manifest, cfg, 0, 1, 16), 40)
        resumed = take(build_train_loader(copy, manifest, cfg, 0, 1, 16, consumed_micro_batches=25), 15)
    assert [b["keys"] for b in resumed] == [b["keys"] for b in whole[25:]]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(resumed, whole[25:]))
    assert sum(key.startswith(big + "-") for b in whole[:25] for key in b["keys"]) > 0


def test_losing_every_train_shard_of_a_language_fails_clearly(data, tmp_path):
    data_dir, manifest, _ = data
    small = min(manifest["languages"], key=lambda lang: manifest["languages"][lang]["train"]["shards"])
    copy = linked_copy(data_dir, tmp_path / "data")
    for s in manifest["shards"]:
        if s["lang"] == small and s["split"] == "train":
            (copy / s["path"]).unlink()
    loader = build_train_loader(copy, manifest, DataConfig(num_workers=0, alpha=0.0), 0, 1, 64)
    with pytest.warns(UserWarning, match="missing"), pytest.raises(ShardError, match=f"no readable train shard for '{small}'"):
        take(loader, 50)


def test_a_manifest_of_many_shards_starts_without_touching_them_all(data, tmp_path):
    """20,000 shards (links to the real ones): building the loader and reading the first
    batches stats or opens only the shards the stream reaches, not every shard of the manifest.
    Counted with an audit hook (open) and a counting os.stat, not timed."""
    data_dir, manifest, _ = data
    copy = linked_copy(data_dir, tmp_path / "data")
    train = [s for s in manifest["shards"] if s["split"] == "train"]
    many = []
    for i in range(20_000):
        s = train[i % len(train)]
        path = f"shards/{s['lang']}/many/{i:06d}.tar"
        (copy / path).parent.mkdir(exist_ok=True)
        os.symlink(data_dir / s["path"], copy / path)
        many.append({**s, "path": path})
    big = {**manifest, "shards": many + [s for s in manifest["shards"] if s["split"] == "valid"]}

    touched = []
    root = str(copy / "shards")
    hook_on = [True]

    def audit(event, args):
        if hook_on[0] and event == "open" and str(args[0]).startswith(root):
            touched.append(str(args[0]))
    sys.addaudithook(audit)  # stays installed (cannot be removed); off after this test
    real_stat = os.stat

    def counting_stat(path, *args, **kwargs):
        if str(path).startswith(root):
            touched.append(str(path))
        return real_stat(path, *args, **kwargs)
    try:
        os.stat = counting_stat
        loader = build_train_loader(copy, big, DataConfig(num_workers=0), 0, 1, 8)
        batches = take(loader, 3)
    finally:
        os.stat = real_stat
        hook_on[0] = False
    assert len(batches) == 3
    assert 0 < len(set(touched)) <= 3 * 8  # at most one shard per sample read
    assert len(set(touched)) < len(many) / 100


def first_token_offset(path: Path) -> int:
    """Where the first sample's token ids start in the tar (after its tar and npy headers)."""
    with tarfile.open(path) as tar:
        member = tar.getmembers()[0]
        npy = io.BytesIO(tar.extractfile(member).read())
    np.lib.format.read_array_header_1_0(npy) if np.lib.format.read_magic(npy) == (1, 0) else np.lib.format.read_array_header_2_0(npy)
    return member.offset_data + npy.tell()


@pytest.mark.parametrize("damage", ["zeros", "garbage", "token_ids"])
def test_damaged_shard_content_raises_a_clear_error(data, tmp_path, damage):
    """Same size as the manifest says, but damaged inside: reading raises ShardError naming the
    shard (through the worker processes), it neither hangs nor goes on silently."""
    data_dir, manifest, _ = data
    # a language with one train shard: every slot reads it
    lang = min(manifest["languages"], key=lambda l: (manifest["languages"][l]["train"]["shards"], -manifest["languages"][l]["train"]["tokens"]))
    shard = next(s for s in manifest["shards"] if s["lang"] == lang and s["split"] == "train")
    copy = linked_copy(data_dir, tmp_path / "data")
    damaged = replace_with_copy(copy / shard["path"])
    raw = bytearray(damaged.read_bytes())
    middle = len(raw) // 2 // 512 * 512
    if damage == "zeros":  # a hole of zeros reads as an early end of the archive
        raw[middle:] = bytes(len(raw) - middle)
    elif damage == "garbage":  # broken tar headers
        raw[middle:] = b"\xff" * (len(raw) - middle)
    else:  # a token id beyond the vocabulary in the first sample
        offset = first_token_offset(damaged)
        raw[offset + 4: offset + 8] = b"\xff\xff\xff\xff"
    damaged.write_bytes(bytes(raw))
    assert damaged.stat().st_size == shard["bytes"]

    loader = build_train_loader(copy, manifest, DataConfig(num_workers=2, alpha=0.0), 0, 1, 16)
    with pytest.raises(ShardError, match=str(shard["path"])):
        take(loader, 2000)
