"""`xlmr-prep` end to end through its CLI: resumable stages, forced rebuilds, bad input."""
import json
import signal
import subprocess
import sys
import time

from tests.conftest import REPO, run_prep
from tests.data_prep.corpus import SMALL_ARGS, cc100_text, sample_docs, small_corpus
from tests.data_prep.test_shards import check_shard_sizes


def prep(inp, out, *extra, check=True):
    return run_prep(f"input_dir={inp}", f"output_dir={out}", *SMALL_ARGS, *extra, check=check)


def manifest_of(out):
    return json.loads((out / "manifest.json").read_text())


def mtimes(out, pattern):
    return {p: p.stat().st_mtime_ns for p in sorted(out.glob(pattern))}


def assert_clear_error(proc, *needles, code=2):
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_rerun_skips_complete_stages_and_force_rebuilds(tmp_path):
    inp, out = small_corpus(tmp_path / "in"), tmp_path / "out"
    prep(inp, out)
    first = manifest_of(out)
    clean, vocab, shards = mtimes(out, "clean/*/*.txt"), mtimes(out, "vocab/spm.model"), mtimes(out, "shards/*/*.tar")
    prep(inp, out)  # everything complete: nothing is rewritten
    assert (mtimes(out, "clean/*/*.txt"), mtimes(out, "vocab/spm.model"), mtimes(out, "shards/*/*.tar")) == (clean, vocab, shards)
    assert [s["sha256"] for s in manifest_of(out)["shards"]] == [s["sha256"] for s in first["shards"]]

    prep(inp, out, "force=encode")  # shards rebuilt, identical; clean and vocab kept
    assert mtimes(out, "clean/*/*.txt") == clean and mtimes(out, "vocab/spm.model") == vocab
    assert all(mtimes(out, "shards/*/*.tar")[p] != t for p, t in shards.items())
    assert [s["sha256"] for s in manifest_of(out)["shards"]] == [s["sha256"] for s in first["shards"]]

    prep(inp, out, "force=vocab", "vocab.size=450")  # a new vocabulary and everything after it
    assert mtimes(out, "clean/*/*.txt") == clean
    assert manifest_of(out)["vocab"]["sha256"] != first["vocab"]["sha256"]
    assert manifest_of(out)["vocab"]["size"] == 452


def test_refuses_output_dir_with_shards_of_another_vocabulary(tmp_path):
    inp, out = small_corpus(tmp_path / "in"), tmp_path / "out"
    prep(inp, out)
    before = manifest_of(out)
    proc = prep(inp, out, "vocab.size=450", check=False)
    assert_clear_error(proc, "force=vocab")
    assert manifest_of(out) == before  # nothing touched
    # a vocabulary swapped in behind the prep's back is refused at the encode stage too
    other = tmp_path / "other"
    prep(inp, other, "vocab.size=450")
    proc = prep(inp, out, f"vocab.model={other / 'vocab' / 'spm.model'}", "force=vocab", check=True)
    assert manifest_of(out)["vocab"]["sha256"] == manifest_of(other)["vocab"]["sha256"]


def test_kill_9_at_any_point_then_rerun_completes_identically(tmp_path):
    inp, out = small_corpus(tmp_path / "in"), tmp_path / "out"
    args = [f"input_dir={inp}", f"output_dir={out}", *SMALL_ARGS, "workers=1", "pack.chunk_mb=0.005", "clean.index_every_mb=0.002"]
    for delay in (1.5, 3.0, 4.5):  # in clean/vocab, in vocab/encode, in encode (on this machine)
        proc = subprocess.Popen([sys.executable, "-m", "data_prep.cli", *args], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # a marker never exists before the outputs it vouches for, with their recorded sizes
        for marker in out.glob("state/encode/*/*.json"):
            for shard in json.loads(marker.read_text())["result"]["shards"]:
                assert (out / shard["path"]).stat().st_size == shard["bytes"]
        for marker in out.glob("state/dedup/*/part-*.json"):
            lang, part = marker.parent.name, json.loads(marker.read_text())["result"]
            assert (out / "clean" / lang / f"{part['part']:05d}.txt").stat().st_size == part["bytes"]
    run_prep(*args)
    resumed = manifest_of(out)
    assert resumed["languages"].keys() == set(("en", "de", "fr", "ru"))
    run_prep(*args, "force=clean")  # from scratch, uninterrupted
    fresh = manifest_of(out)
    assert [(s["path"], s["sha256"]) for s in resumed["shards"]] == [(s["path"], s["sha256"]) for s in fresh["shards"]]
    assert resumed["vocab"]["sha256"] == fresh["vocab"]["sha256"]


def test_bad_lines_are_counted_and_the_rest_kept(tmp_path):
    inp = small_corpus(tmp_path / "in")
    docs = sample_docs("es", max_bytes=30_000)
    junk = b"\xff\xfe\xfa broken\n" + b"has a \x00 NUL\n" + bytes(b for b in range(1, 32) if b not in (9, 10, 13)) + b"\n" + b"B" * (50 * 1024 * 1024) + b"\n"
    (inp / "es.txt").write_bytes(junk + cc100_text(docs).encode())
    out = tmp_path / "out"
    prep(inp, out, "clean.lid.enabled=false")  # the line filters alone: every document keeps a line
    es = manifest_of(out)["languages"]["es"]
    assert es["removed"]["invalid_utf8"] == 1
    assert es["removed"]["binary"] == 2
    assert es["removed"]["too_long"] == 1
    assert es["input"]["input_docs"] == len(docs)
    assert es["docs"] == len(docs)


def test_empty_and_fully_filtered_languages_are_excluded_and_recorded(tmp_path):
    inp = small_corpus(tmp_path / "in")
    (inp / "sw.txt").write_text("")
    (inp / "yo.txt").write_text("a\nb\n\nc\n")  # every line shorter than min_line_chars
    (inp / "notes.pdf").write_bytes(b"%PDF")
    out = tmp_path / "out"
    proc = prep(inp, out)
    manifest = manifest_of(out)
    assert manifest["excluded_languages"]["sw"]["reason"] == "empty input"
    assert manifest["excluded_languages"]["yo"]["reason"] == "nothing left after filtering"
    assert manifest["excluded_languages"]["yo"]["removed"]["too_short"] == 3
    assert "sw" not in manifest["languages"] and "yo" not in manifest["languages"]
    assert any("notes.pdf" in s for s in manifest["skipped_files"])
    logged = proc.stdout + proc.stderr
    assert "language sw excluded" in logged and "skipped notes.pdf" in logged
    assert "yo (excluded)" in (out / "report" / "report.md").read_text()


def test_missing_and_empty_input_dir(tmp_path):
    assert_clear_error(prep(tmp_path / "nope", tmp_path / "out", check=False), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_clear_error(prep(tmp_path / "empty", tmp_path / "out", check=False), "holds no corpus files")


def test_unknown_compression_is_an_error(tmp_path):
    inp = small_corpus(tmp_path / "in")
    (inp / "de.txt.lz4").write_bytes(b"\x04\x22\x4d\x18")
    assert_clear_error(prep(inp, tmp_path / "out", check=False), "unknown compression '.lz4'")


def test_config_typo_gets_hydras_message(tmp_path):
    proc = run_prep(f"output_dir={tmp_path}", "vocab.sizee=10", check=False)
    assert proc.returncode != 0
    assert "vocab.sizee" in proc.stderr and "Traceback" not in proc.stderr


def _mount_tmpfs(path, size):
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0


def test_full_disk_is_a_clear_error_and_rerun_resumes(tmp_path):
    inp, disk = small_corpus(tmp_path / "in"), tmp_path / "disk"
    fill = not _mount_tmpfs(disk, "300k")  # no permission to mount: cap the size of files the prep writes
    out = disk / "out"
    try:
        if fill:
            import resource
            proc = subprocess.run([sys.executable, "-m", "data_prep.cli", f"input_dir={inp}", f"output_dir={out}", *SMALL_ARGS],
                                  cwd=REPO, capture_output=True, text=True,
                                  preexec_fn=lambda: (signal.signal(signal.SIGXFSZ, signal.SIG_IGN),
                                                      resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))))
        else:
            proc = prep(inp, out, check=False)
        assert_clear_error(proc, "disk is full", code=3)
        assert not (out / "manifest.json").exists()
        assert not list(out.rglob("*.tmp-*"))  # partial files removed
        if not fill:
            subprocess.run(["mount", "-o", "remount,size=50m", str(disk)], check=True)
        prep(inp, out)  # space freed: the rerun resumes and completes
        assert manifest_of(out)["languages"].keys() == {"en", "de", "fr", "ru"}
    finally:
        if not fill:
            subprocess.run(["umount", str(disk)])


def test_stages_as_separate_jobs_and_job_arrays(tmp_path):
    """The SLURM layout: clean, dedup and encode job arrays, the vocab job, the merge job;
    equal to one plain run with one or two workers. Many encode chunks per language, yet
    shards of the target size."""
    inp = small_corpus(tmp_path / "in")
    whole, two, split = tmp_path / "whole", tmp_path / "two", tmp_path / "split"
    chunks = ["pack.chunk_mb=0.01", "clean.index_every_mb=0.002", "clean.chunk_mb=0.01", "dedup.memory_mb=0.005"]
    prep(inp, whole, *chunks, "workers=1")
    prep(inp, two, *chunks, "workers=2")
    jobs = lambda *a: prep(inp, split, *chunks, *a, check=False)  # noqa: E731
    array = lambda stage, index: jobs(f"stages=[{stage}]", f"task.index={index}", "task.count=3")  # noqa: E731
    assert_clear_error(jobs("stages=[manifest,report]"), "stage 'clean' is not complete")
    assert array("clean", 1).returncode == 0
    assert_clear_error(jobs("stages=[dedup]"), "stage 'clean' is not complete")
    assert all(array("clean", i).returncode == 0 for i in (0, 2))
    assert array("dedup", 2).returncode == 0
    assert_clear_error(jobs("stages=[vocab]"), "stage 'dedup' is not complete")
    assert all(array("dedup", i).returncode == 0 for i in (0, 1))
    assert jobs("stages=[dedup,vocab]").returncode == 0  # the vocab job finishes what the array left
    assert_clear_error(jobs("stages=[manifest,report]"), "stage 'encode' is not complete")
    assert array("encode", 1).returncode == 0
    assert not (split / "manifest.json").exists()
    assert_clear_error(jobs("stages=[manifest,report]"), "stage 'encode' is not complete")
    for index in (0, 2):
        assert array("encode", index).returncode == 0
    assert not list(split.glob("shards/*/*-merged-*.tar"))  # array tasks leave the merges to the merge job
    assert len(list(split.glob("shards/*/staged/*.tar"))) >= 4  # every language's leftovers, waiting
    # What a merge killed midway leaves: a temp file, a shard of a wrong size without a marker.
    (split / "shards/en/train-merged-000.tar").write_bytes(b"half a shard")
    (split / "shards/en/train-merged.tar.tmp-4242").write_bytes(b"partial")
    assert jobs("stages=[manifest,report]").returncode == 0
    got, expected = manifest_of(split), manifest_of(whole)
    for lang in got["languages"]:
        assert len(list(split.glob(f"state/encode/{lang}/[0-9]*.json"))) >= 2, "several encode chunks per language"
    assert check_shard_sizes(got) >= 4
    assert [(s["path"], s["sha256"]) for s in got["shards"]] == [(s["path"], s["sha256"]) for s in expected["shards"]]
    assert got["languages"] == expected["languages"]
    # the clean array made every part a plain run makes
    assert len(list(split.glob("state/clean/*/*.json"))) == len(list(whole.glob("state/clean/*/*.json"))) > 12
    assert [(s["path"], s["sha256"]) for s in manifest_of(two)["shards"]] == [(s["path"], s["sha256"]) for s in expected["shards"]]
    assert not list(split.glob("shards/*/staged")) and not list(split.rglob("*.tmp-*"))  # merged, then removed
    assert_clear_error(jobs("stages=[encode]", "task.index=3", "task.count=3"), "task.index must be in")


def test_pack_chunks_below_the_index_spacing_are_an_error(tmp_path):
    proc = prep(small_corpus(tmp_path / "in"), tmp_path / "out", "pack.chunk_mb=0.5", check=False)
    assert_clear_error(proc, "pack.chunk_mb=0.5 is below clean.index_every_mb=1.0")
