"""The shards are plain WebDataset: the webdataset library reads and decodes them."""
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import webdataset as wds


def test_webdataset_reads_every_shard(prepared_data):
    manifest = json.loads((prepared_data / "manifest.json").read_text())
    assert manifest["format"] == "xlmr-shards" and manifest["format_version"] == 1
    dtype = np.dtype(manifest["dtype"])
    keys = set()
    for shard in manifest["shards"]:
        path = prepared_data / shard["path"]
        assert path.stat().st_size == shard["bytes"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
        samples = list(wds.WebDataset(str(path), shardshuffle=False, empty_check=False).decode())
        assert len(samples) == shard["samples"]
        tokens = 0
        for sample in samples:
            seq = sample["tokens.npy"]
            assert isinstance(seq, np.ndarray) and seq.dtype == dtype and seq.ndim == 1
            assert 2 <= len(seq) <= manifest["seq_len"]
            assert seq.max() < manifest["vocab"]["size"] - 1  # never <mask> in the data
            assert sample["__key__"].startswith(shard["lang"] + "-")
            tokens += len(seq)
            keys.add(sample["__key__"])
        assert tokens == shard["tokens"]
    assert len(keys) == sum(s["samples"] for s in manifest["shards"])  # keys unique


def test_manifest_totals_add_up(prepared_data):
    manifest = json.loads((prepared_data / "manifest.json").read_text())
    for lang, rec in manifest["languages"].items():
        for split in ("train", "valid"):
            shards = [s for s in manifest["shards"] if s["lang"] == lang and s["split"] == split]
            assert rec[split]["tokens"] == sum(s["tokens"] for s in shards)
            assert rec[split]["sequences"] == sum(s["samples"] for s in shards)
            assert rec[split]["shards"] == len(shards)
        assert rec["train"]["docs"] + rec["valid"]["docs"] == rec["docs"]
        assert rec["valid"]["docs"] >= 1  # every language of the sample has >= 2 documents
    q = [v["q"] for v in manifest["sampling"]["languages"].values()]
    assert abs(sum(q) - 1) < 1e-9
    assert (prepared_data / "report" / "languages.png").stat().st_size > 10_000
    assert (prepared_data / "report" / "report.md").read_text().count("\n") == len(manifest["languages"]) + 2


def check_shard_sizes(manifest):
    """Every shard but the last of a language's split holds shard.target_mb (plus less than one
    member and tarfile's end-of-archive padding); validation splits take as few shards as their
    bytes need. Returns how many (language, split) pairs have several shards."""
    target = int(manifest["config"]["shard"]["target_mb"] * 1e6)
    seq_len, itemsize = manifest["seq_len"], np.dtype(manifest["dtype"]).itemsize
    largest_member = 512 + -(-(128 + seq_len * itemsize) // 512) * 512
    slack = largest_member + 2 * 512 + tarfile.RECORDSIZE  # the member that crosses the target, the end of archive
    several = 0
    for lang in manifest["languages"]:
        for split in ("train", "valid"):
            sizes = [s["bytes"] for s in manifest["shards"] if s["lang"] == lang and s["split"] == split]
            for size in sizes[:-1]:
                assert target <= size < target + slack, (lang, split, size)
            assert 0 < sizes[-1] < target + slack
            several += len(sizes) > 1
            if split == "valid":
                assert len(sizes) <= 1 + sum(sizes) // target, (lang, sizes)
    return several


def test_shards_hold_the_target_size_and_valid_splits_are_few(prepared_data):
    """On real prep output (the bundled sample; tests/data_prep/test_pipeline.py checks the same
    on a corpus cut into many encode chunks)."""
    manifest = json.loads((prepared_data / "manifest.json").read_text())
    assert check_shard_sizes(manifest) >= 3  # the sample's big languages have several shards: the cut is exercised


def tarfile_bytes(members):
    """What `tarfile` itself writes for these (name, array) members: the reference."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for name, seq in members:
            npy = io.BytesIO()
            np.save(npy, seq)
            member = tarfile.TarInfo(name)
            member.size, member.mode = len(npy.getvalue()), 0o444
            tar.addfile(member, io.BytesIO(npy.getvalue()))
    return out.getvalue()


def tar_contents(path):
    with tarfile.open(path) as tar:
        return [(m.name, np.load(io.BytesIO(tar.extractfile(m).read()))) for m in tar.getmembers()]


def _npy(seq):
    buf = io.BytesIO()
    np.save(buf, seq)
    return buf.getvalue()


def test_shard_bytes_equal_what_tarfile_writes(tmp_path):
    """The fast writer's tars, the staged remainders and the merged shards are byte for byte
    the USTAR files `tarfile` itself writes, cut at the first member where they reach the target."""
    from data_prep.shards import ShardWriter, merge_staged

    rng = np.random.default_rng(0)
    lengths = {3: (64,) * 12 + (17, 300, 2), 4: (64,) * 5 + (9, 200), 5: (3,)}
    chunks = {c: [rng.integers(0, 60000, size=n).astype(np.uint16) for n in ns] for c, ns in lengths.items()}
    chunks[3][0][:3] = [0, 65535, 7]  # extreme ids, the highest checksum digits
    target = 2500  # bytes: 2 or 3 members
    out = tmp_path / "zh-Hans"
    full, staged = {}, []
    for chunk, seqs in chunks.items():
        writer = ShardWriter(out, "zh-Hans", "train", chunk, target_bytes=target, dtype=np.uint16)
        head = 12 if chunk == 3 else 1
        writer.write_block(np.stack(seqs[:head]))  # a block: indices 0..11, two digits
        for seq in seqs[head:]:
            writer.write_block(seq[None, :])
        full[chunk], rest = writer.close()
        staged += [rest] if rest else []
    merged = merge_staged(tmp_path, [{**s, "path": str(Path(s["path"]).relative_to(tmp_path))} for s in staged],
                          out, "zh-Hans", "train", target, itemsize=2)

    records = [r for chunk in chunks for r in full[chunk]] + merged
    written = [Path(r["path"]) for r in records]
    assert [p.name for p in written] == [f"train-{c:05d}-{i:03d}.tar" for c in chunks for i in range(len(full[c]))] + \
        [f"train-merged-{i:03d}.tar" for i in range(len(merged))]
    assert (len(full[3]), len(full[4]), len(full[5]), len(staged), len(merged)) == (5, 2, 0, 3, 2)
    assert not list(out.glob("*.tmp-*"))
    members = [tar_contents(p) for p in written]
    for path, rec, contents in zip(written, records, members):
        data = path.read_bytes()
        assert data == tarfile_bytes(contents)
        assert rec["bytes"] == len(data) and rec["sha256"] == hashlib.sha256(data).hexdigest()
        assert rec["samples"] == len(contents) and rec["tokens"] == sum(len(seq) for _, seq in contents)
    # every sample once, in chunk order: the chunks' full shards, then the staged remainders
    expected = {chunk: [(f"zh-Hans-train-{chunk:05d}-{i:08d}.tokens.npy", seq) for i, seq in enumerate(seqs)]
                for chunk, seqs in chunks.items()}
    n = {c: sum(r["samples"] for r in full[c]) for c in chunks}
    order = [m for c in chunks for m in expected[c][:n[c]]] + [m for c in chunks for m in expected[c][n[c]:]]
    got = [m for contents in members for m in contents]
    assert [name for name, _ in got] == [name for name, _ in order]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(got, order))
    # the cut: a shard ends at the first member where it holds the target (only the last of the
    # merged shards, and the last of each chunk's, which is staged, may hold less)
    sizes = lambda contents: [512 + -(-len(_npy(seq)) // 512) * 512 for _, seq in contents]  # noqa: E731
    for contents in members[:-1]:
        s = sizes(contents)
        assert sum(s) >= target > sum(s) - s[-1]
    assert sum(sizes(members[-1])) > 0
