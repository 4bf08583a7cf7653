"""Packing invariants, on the packer alone and on the real shards of the sample corpus."""
import io
import json
import signal
import tarfile

import numpy as np
import pytest

from data_prep.dictionary import BOS, EOS, Dictionary
from data_prep import encode
from data_prep.encode import EncodeJob, choose_valid_docs, encode_chunk, read_batches
from data_prep.errors import PrepError
from data_prep.config import PrepConfig
from data_prep.packing import SequencePacker


@pytest.mark.parametrize("seed", range(5))
def test_every_token_once_in_order(seed):
    rng = np.random.default_rng(seed)
    seq_len = int(rng.integers(2, 40))
    pieces = [rng.integers(4, 1000, size=int(rng.integers(0, 100))) for _ in range(50)]
    packer = SequencePacker(seq_len, np.uint16)
    out = [packer.add(p) for p in pieces] + [packer.finish()]
    seqs = [s for block in out if block is not None for s in (block if block.ndim == 2 else [block])]
    assert all(s[0] == BOS for s in seqs)
    assert all(len(s) == seq_len for s in seqs[:-1]) and 2 <= len(seqs[-1]) <= seq_len
    stream = np.concatenate(pieces)
    assert np.array_equal(np.concatenate([s[1:] for s in seqs]), stream)


def test_no_partial_sequence_when_stream_divides():
    packer = SequencePacker(5, np.uint16)
    full = packer.add(np.arange(4, 12))  # 8 tokens = 2 blocks of 4
    assert full.shape == (2, 5) and packer.finish() is None


def read_shard(path):
    """Samples of a tar in order, read with tarfile + numpy (independently of webdataset)."""
    out = []
    with tarfile.open(path) as tar:
        for member in tar:
            assert member.name.endswith(".tokens.npy")
            out.append(np.load(io.BytesIO(tar.extractfile(member).read())))
    return out


def expected_streams(text, dictionary, valid_docs):
    """The token stream of each split, encoded line by line straight from the cleaned text."""
    streams = {"train": [], "valid": []}
    doc = 0
    for line in text.split("\n")[:-1]:
        split = "valid" if doc in valid_docs else "train"
        if line:
            streams[split] += [p + 1 if p != 0 else 3 for p in dictionary.sp.encode(line)] + [EOS]
        else:
            streams[split].append(EOS)  # the extra </s> ending a document
            doc += 1
    return streams


@pytest.mark.parametrize("lang", ["en", "ja", "sl"])
def test_shards_hold_the_whole_stream_in_order(prepared_data, lang):
    manifest = json.loads((prepared_data / "manifest.json").read_text())
    cfg = PrepConfig(**{k: v for k, v in manifest["config"].items() if k in ("seed",)})
    cfg.split.__dict__.update(manifest["config"]["split"])
    dictionary = Dictionary(prepared_data / manifest["vocab"]["spm_model"])
    n_docs = manifest["languages"][lang]["docs"]
    valid = set(choose_valid_docs(lang, n_docs, cfg).tolist())
    text = "".join(p.read_text(encoding="utf-8") for p in sorted((prepared_data / "clean" / lang).glob("*.txt")))
    expected = expected_streams(text, dictionary, valid)
    for split in ("train", "valid"):
        shards = sorted(s["path"] for s in manifest["shards"] if s["lang"] == lang and s["split"] == split)
        seqs = [seq for path in shards for seq in read_shard(prepared_data / path)]
        assert all(seq[0] == BOS for seq in seqs)
        short = [len(s) for s in seqs if len(s) != manifest["seq_len"]]
        assert len(short) <= 1 and (not short or len(seqs[-1]) == short[0])  # one chunk per language here
        got = np.concatenate([seq[1:] for seq in seqs]).tolist()
        assert got == expected[split]
        assert manifest["languages"][lang][split]["tokens"] == sum(map(len, seqs))
        assert manifest["languages"][lang][split]["sequences"] == len(seqs)


def test_a_chunk_streamed_in_small_batches_encodes_every_line_once(prepared_data, tmp_path, monkeypatch):
    """encode_chunk reads its chunk in batches cut at line ends; with batches far smaller than
    the documents and than one long line, the shards still hold exactly the reference streams."""
    manifest = json.loads((prepared_data / "manifest.json").read_text())
    spm_path = prepared_data / manifest["vocab"]["spm_model"]
    docs = (prepared_data / "clean" / "en" / "00000.txt").read_text(encoding="utf-8").split("\n\n")[:60]
    docs[7] += "\n" + " ".join(["longline"] * 2000)  # 18 kB: one line spans several batches
    text = "\n\n".join(docs) + "\n\n"
    head = "skipped line before the chunk\n\n"
    (tmp_path / "part.txt").write_text(head + text + "after the chunk\n", encoding="utf-8")
    start = len(head.encode())
    valid = (11, 12, 30, 59)  # language-wide numbers; the chunk's first document is 10
    monkeypatch.setattr(encode, "BATCH_BYTES", 4096)
    job = EncodeJob("en", 0, start, start + len(text.encode()), 10, valid, tmp_path / "part.txt", tmp_path / "out",
                    spm_path, 64, 20_000)
    result = encode_chunk(job)

    expected = expected_streams(text, Dictionary(spm_path), {v - 10 for v in valid})
    for split in ("train", "valid"):
        paths = sorted(r["path"] for r in result["shards"] if r["split"] == split)
        paths += [r["path"] for r in result["staged"] if r["split"] == split]  # the chunk's last shard
        seqs = [seq for path in paths for seq in read_shard(path)]
        assert np.concatenate([seq[1:] for seq in seqs]).tolist() == expected[split]
        assert result["stats"][split]["docs"] == sum(
            1 for i in range(len(docs)) if (i + 10 in valid) == (split == "valid"))
    assert len([r for r in result["shards"] if r["split"] == "train"]) >= 2  # the test spans several shards


def test_a_chunk_past_its_files_end_is_a_one_line_error(tmp_path):
    """A clean part shorter than its chunk's recorded end (changed after dedup) is named, not
    read forever; SIGALRM fails the test instead of hanging it."""
    path = tmp_path / "00000.txt"
    path.write_text("a b\n\nc d\n\n", encoding="utf-8")
    job = EncodeJob("en", 0, 0, 100, 0, (), path, tmp_path / "out", None, 64, 1000)

    def hang(signum, frame):
        raise TimeoutError("read_batches did not stop at the end of the file")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(10)
    try:
        with pytest.raises(PrepError, match=r"00000\.txt ends at byte 10, before its chunk's end 100"):
            list(read_batches(job))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
