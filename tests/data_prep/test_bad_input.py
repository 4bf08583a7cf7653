"""xlmr-prep on damaged input (the README's "Bad input"): a compressed file cut short is one
line naming it; JSONL records dropped for bad JSON or a missing text/lang are counted in the
log, the manifest and the report."""
from __future__ import annotations

import gzip
import json
import lzma

import pytest

from tests.conftest import run_prep
from tests.data_prep.corpus import SMALL_ARGS, cc100_text, sample_docs, small_corpus


def _prep(inp, out, check=True):
    return run_prep(f"input_dir={inp}", f"output_dir={out}", *SMALL_ARGS, check=check)


@pytest.mark.parametrize("suffix, compress", [(".xz", lzma.compress), (".gz", gzip.compress)])
def test_truncated_compressed_input_is_one_line_naming_the_file(tmp_path, suffix, compress):
    inp = small_corpus(tmp_path / "in")
    data = compress(cc100_text(sample_docs("pt", max_bytes=30_000)).encode())
    cut = inp / f"pt.txt{suffix}"
    cut.write_bytes(data[: len(data) * 2 // 3])  # a copy cut short
    proc = _prep(inp, tmp_path / "out", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("xlmr-prep: error:")]
    assert len(lines) == 1 and f"{cut} is cut short or damaged" in lines[0], proc.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()  # nothing looks complete


def test_dropped_records_are_counted_in_log_manifest_and_report(tmp_path):
    inp = small_corpus(tmp_path / "in")
    docs = sample_docs("de", max_bytes=20_000)
    lines = [json.dumps({"text": "\n".join(d), "lang": "de"}, ensure_ascii=False) for d in docs]
    lines += ["{not json", "[1, 2]", json.dumps({"text": "no lang"}), json.dumps({"lang": "de"}),
              json.dumps({"text": "bad code", "lang": "not a code!"})]
    (inp / "part-0.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    proc = _prep(inp, out)
    expected = {"bad_json": 2, "missing_text_or_lang": 3, "too_long_records": 0}
    manifest = json.loads((out / "manifest.json").read_text())
    dropped = manifest["dropped_records"]
    assert {k: dropped[k] for k in expected} == expected
    assert dropped["by_file"] == {"part-0.jsonl": {"bad_json": 2, "missing_text_or_lang": 3}}
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["dropped_records"] == dropped
    assert "dropped records: part-0.jsonl (2 bad_json, 3 missing_text_or_lang)" in (out / "report" / "report.md").read_text()
    assert "dropped records of part-0.jsonl: 2 bad_json, 3 missing_text_or_lang" in proc.stdout + proc.stderr


def test_damaged_marker_is_named_and_its_work_redone(tmp_path):
    inp, out = small_corpus(tmp_path / "in"), tmp_path / "out"
    _prep(inp, out)
    before = json.loads((out / "manifest.json").read_text())
    marker = sorted((out / "state" / "clean").rglob("*.json"))[0]
    marker.write_text(marker.read_text()[:30])  # cut mid-write
    proc = _prep(inp, out)
    assert f"{marker} is damaged" in proc.stdout + proc.stderr
    after = json.loads((out / "manifest.json").read_text())
    assert {k: v for k, v in after.items() if k != "created"} == {k: v for k, v in before.items() if k != "created"}
