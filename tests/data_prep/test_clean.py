"""The clean stage's normalization and filters, on crafted lines and real text."""
import bz2
import gzip
import io
import json
import lzma

import pytest
import zstandard

from data_prep.clean import LineCleaner, dedup_key, normalize_line, run_clean
from data_prep.config import CleanConfig, PrepConfig
from data_prep.dedup import run_dedup
from data_prep.inputs import discover, read_bounded_lines
from data_prep.state import Layout
from tests.data_prep.corpus import cc100_text, sample_docs


def test_normalize_line():
    assert normalize_line("Cafe\u0301") == "Café"  # NFC composes
    assert normalize_line("  a\tb\u00a0c\u3000d  ") == "a b c d"  # Unicode whitespace collapsed
    assert normalize_line("a\x07b\x1bc\u200dd") == "abc\u200dd"  # controls out, ZWJ kept (emoji, Indic)
    assert normalize_line("\ufeffBOM") == "BOM"


def test_dedup_key_ignores_case_and_digits_only():
    assert dedup_key("Version 1.2 Released") == dedup_key("version 3.4 released")
    assert dedup_key("version released") != dedup_key("version  released!")


def test_line_filters_are_counted():
    cleaner = LineCleaner(CleanConfig(min_line_chars=3, max_line_chars=50))
    lines = [
        "Hello world".encode(), b"\xff\xfe broken utf-8", b"nul\x00byte", b"\x01\x02\x03\x04junk\x05",
        b"ab", ("x" * 60).encode(), "hello WORLD".encode(), "Hello world".encode(), None,
        "Zweite Zeile".encode(),
    ]
    kept = [t for t in map(cleaner, lines) if t is not None]
    assert kept == ["Hello world", "hello WORLD", "Hello world", "Zweite Zeile"]  # duplicates: the dedup stage
    assert cleaner.counts == {"too_long": 2, "invalid_utf8": 1, "binary": 2, "too_short": 1, "low_confidence": 0,
                              "wrong_language": 0, "duplicate": 0, "empty_docs": 0}


def test_read_bounded_lines_skips_a_huge_line_without_holding_it():
    huge = b"A" * (50 * 1024 * 1024)
    stream = io.BytesIO(b"first\n" + huge + b"\nlast\n")
    assert list(read_bounded_lines(stream, max_bytes=1000)) == [b"first", None, b"last"]


def clean_and_dedup(inp, out, workers=1, **clean):
    """The clean and dedup stages in this process: (per-language stats, per-language text)."""
    cfg = PrepConfig(input_dir=str(inp), output_dir=str(out), clean=CleanConfig(**clean))
    layout = Layout(out)
    stats = run_dedup(layout, run_clean(discover(inp), cfg.clean, layout, workers, False), cfg, workers, False)
    return stats, {lang: "".join((out / p["path"]).read_text(encoding="utf-8") for p in st["parts"]) for lang, st in stats.items()}


def write_compressed(path, data: bytes):
    opener = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}
    if path.suffix == ".zst":
        path.write_bytes(zstandard.ZstdCompressor().compress(data))
    elif path.suffix in opener:
        with opener[path.suffix](path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("suffix", [".txt", ".txt.xz", ".txt.gz", ".txt.zst", ".txt.bz2"])
def test_every_compression_cleans_the_same(tmp_path, suffix):
    docs = sample_docs("de", max_bytes=30_000)
    (tmp_path / "in").mkdir()
    write_compressed(tmp_path / "in" / f"de{suffix}", cc100_text(docs).encode())
    stats, text = clean_and_dedup(tmp_path / "in", tmp_path / "out", dedup=False, chunk_mb=0.005)
    expected = cc100_text([[normalize_line(p) for p in d] for d in docs])
    assert text["de"] == expected
    assert len(stats["de"]["parts"]) > 2  # compressed files are decompressed once into pieces, then cut
    if suffix != ".txt":
        pieces = sorted((tmp_path / "out" / "routed" / "de").iterdir())
        assert len(pieces) > 2 and b"".join(p.read_bytes() for p in pieces) == cc100_text(docs).encode()
        assert all(p.read_bytes().endswith(b"\n\n") for p in pieces[:-1])  # on document boundaries
    assert stats["de"]["docs"] == len(docs)


def test_jsonl_and_parquet_records_are_routed_by_language(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    de, fr = sample_docs("de", max_bytes=20_000), sample_docs("fr", max_bytes=20_000)
    (tmp_path / "in").mkdir()
    records = [{"text": "\n".join(d), "lang": "de", "url": "x"} for d in de]
    lines = [json.dumps(r, ensure_ascii=False) for r in records] + ["{not json", json.dumps({"text": "no lang"})]
    write_compressed(tmp_path / "in" / "part-0.jsonl.gz", ("\n".join(lines) + "\n").encode())
    pq.write_table(pa.table({"text": ["\n\n".join(d) for d in fr], "lang": ["fr"] * len(fr)}), tmp_path / "in" / "part-1.parquet")
    layout = Layout(tmp_path / "out")
    stats, text = clean_and_dedup(tmp_path / "in", tmp_path / "out", workers=2, dedup=False)
    assert sorted(stats) == ["de", "fr"]
    for lang, docs in (("de", de), ("fr", fr)):
        expected = cc100_text([[normalize_line(p) for p in d] for d in docs])
        assert text[lang] == expected
    route = json.loads((layout.marker("route", "part-0.jsonl.gz")).read_text())["result"]
    assert route["bad_json"] == 1 and route["missing_text_or_lang"] == 1 and route["records"] == len(de)
