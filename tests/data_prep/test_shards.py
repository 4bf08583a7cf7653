"""The shards are plain WebDataset: the webdataset library reads and decodes them."""
import hashlib
import json

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


def test_shard_bytes_equal_what_tarfile_writes(tmp_path):
    """The fast writer's tars are byte for byte the USTAR files `tarfile` itself writes."""
    import io
    import tarfile

    from data_prep.shards import ShardWriter

    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 60000, size=n).astype(np.uint16) for n in (64,) * 12 + (17, 64, 2)]
    seqs[0][:3] = [0, 65535, 7]  # extreme ids, the highest checksum digits
    writer = ShardWriter(tmp_path, "zh-Hans", "train", 3, target_bytes=1 << 30, dtype=np.uint16)
    writer.write_block(np.stack(seqs[:12]))  # indices 0..11: more than one digit
    for seq in seqs[12:]:
        writer.write_block(seq[None, :])
    [record] = writer.close()

    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for i, seq in enumerate(seqs):
            npy = io.BytesIO()
            np.save(npy, seq)
            member = tarfile.TarInfo(f"zh-Hans-train-00003-{i:08d}.tokens.npy")
            member.size, member.mode = len(npy.getvalue()), 0o444
            tar.addfile(member, io.BytesIO(npy.getvalue()))
    written = (tmp_path / "train-00003-000.tar").read_bytes()
    assert written == expected.getvalue()
    assert record["bytes"] == len(written) and record["sha256"] == hashlib.sha256(written).hexdigest()
