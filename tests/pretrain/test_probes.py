"""The cross-lingual probes (pretrain/evaluation/probes.py): retrieval against a numpy
computation, the transfer classifier against scikit-learn, which labels the transfer probe may
see, the bundled probe set with a random model, the embeddings' independence of batching and
ranks, bad input, the build script of the bundled set on hand-made catalogs; and in the trainer (slow): probes leave the training as it was, resume stays
exact with them, 2 ranks (ZeRO 2 and 3) give what `xlmr-eval` gives on the checkpoint, plots.
"""
from __future__ import annotations

import json
import lzma
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.config import PretrainError, ProbeConfig
from pretrain.evaluation.probes import (
    BUNDLED, Probes, embed, read_retrieval, read_transfer, retrieval_accuracies, tokenize, transfer_probe,
)
from pretrain.model import XLMR, ModelConfig
from tests.pretrain.test_train import REPO, pretrain_run, records

TINY = dict(hidden_size=64, num_layers=2, num_heads=2, ffn_size=256)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread (as the trainer's subprocesses here): small forwards on a busy 2-core
    machine run far slower with threads waiting on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def spm_model(prepared_data) -> Path:
    manifest = json.loads((prepared_data / "manifest.json").read_text())
    return prepared_data / manifest["vocab"]["spm_model"]


def random_model(spm_model: Path, seed: int = 0) -> XLMR:
    from data_prep.dictionary import Dictionary

    torch.manual_seed(seed)
    return XLMR(ModelConfig(vocab_size=Dictionary(spm_model).size, **TINY)).eval()


def write_tsv(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(row) + "\n" for row in rows), encoding="utf-8")
    return path


def bundled_rows(name: str) -> list[list[str]]:
    with lzma.open(BUNDLED / name, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t") for line in f]


# ---- retrieval ---------------------------------------------------------------------------


def numpy_retrieval(queries: np.ndarray, candidates: np.ndarray, candidate_texts: list[str]) -> float:
    """Independent reference: cosine nearest neighbour, a hit when the retrieved candidate's
    text is the gold one's."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    c = candidates / np.linalg.norm(candidates, axis=1, keepdims=True)
    nearest = (q @ c.T).argmax(axis=1)
    return float(np.mean([candidate_texts[j] == candidate_texts[i] for i, j in enumerate(nearest)]))


def test_retrieval_accuracy_matches_numpy_on_fixed_embeddings():
    rng = np.random.default_rng(7)
    n, h = 200, 16
    en = rng.normal(size=(n, h))
    # Translations: the English embedding plus noise growing along the set, so some are found
    # and some are not; two sentences duplicated on each side (a duplicate is no miss).
    xx = en + rng.normal(size=(n, h)) * np.linspace(0.1, 3.0, n)[:, None]
    en_texts, xx_texts = [f"en {i}" for i in range(n)], [f"xx {i}" for i in range(n)]
    for a, b in ((3, 150), (10, 190)):
        en[b], xx[b] = en[a], xx[a]
        en_texts[b], xx_texts[b] = en_texts[a], xx_texts[a]
    to_en, from_en = retrieval_accuracies(torch.tensor(xx), torch.tensor(en), xx_texts, en_texts)
    assert to_en == pytest.approx(numpy_retrieval(xx, en, en_texts), abs=1e-12)
    assert from_en == pytest.approx(numpy_retrieval(en, xx, xx_texts), abs=1e-12)
    assert 0.2 < to_en < 0.95 and 0.2 < from_en < 0.95  # the case is neither trivial nor hopeless


def test_identical_sentences_give_100_percent_and_shuffled_pairs_near_chance(spm_model, tmp_path):
    """Through the real pipeline (tokenize, embed with a model, score): pairs whose two sides
    are the same sentence are all found; the same sentences paired at random are found only
    where the shuffle left a pair in place."""
    english = [row[0] for row in bundled_rows("retrieval/de.tsv.xz")][:300]
    rng = np.random.default_rng(0)
    shuffled = [english[i] for i in rng.permutation(len(english))]
    fixed_points = sum(a == b for a, b in zip(english, shuffled))
    write_tsv(tmp_path / "retrieval" / "same.tsv", zip(english, english))
    write_tsv(tmp_path / "retrieval" / "shuffled.tsv", zip(english, shuffled))
    probes = Probes(ProbeConfig(retrieval_dir=str(tmp_path / "retrieval"), layer=2), spm_model, 2, say=lambda _: None)
    result = probes.run(random_model(spm_model), torch.device("cpu"))["retrieval"]["languages"]
    assert result["same"]["to_en"] == result["same"]["from_en"] == 1.0
    assert result["shuffled"]["to_en"] == result["shuffled"]["from_en"] == fixed_points / len(english)
    assert result["shuffled"]["to_en"] < 0.02


# ---- transfer ----------------------------------------------------------------------------


def test_transfer_classifier_matches_scikit_learn_and_sees_english_labels_only():
    """The probe's accuracies are those of scikit-learn's LogisticRegression fitted on the
    standardized English training embeddings alone; scrambling every non-English test label
    changes nothing but the scores computed from those labels."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(3)
    labels = ["a", "b", "c", "d"]
    centres = rng.normal(size=(4, 12)) * 1.5

    def sample(n, noise, shift=0.0):
        y = rng.integers(0, 4, size=n)
        return centres[y] + shift + rng.normal(size=(n, 12)) * noise, [labels[i] for i in y]

    train_x, train_y = sample(240, 1.0)
    test = {"en": sample(120, 1.0), "de": sample(100, 1.6, 0.3), "ja": sample(80, 2.5, 0.8)}
    scaler = StandardScaler().fit(train_x)
    # scikit-learn's StandardScaler divides by the population std; the probe uses torch's
    # sample std: the same up to sqrt(n / (n-1)), which C absorbs as C * n / (n-1)
    n = len(train_x)
    classifier = LogisticRegression(C=1.0 * n / (n - 1), max_iter=5000, tol=1e-10).fit(scaler.transform(train_x), train_y)
    predicted = {lang: classifier.predict(scaler.transform(x)) for lang, (x, _) in test.items()}

    def probe(test_sets):
        return transfer_probe(torch.tensor(train_x), train_y,
                              {lang: (torch.tensor(x), y) for lang, (x, y) in test_sets.items()}, labels)

    result = probe(test)
    for lang, (_, gold) in test.items():
        assert result[lang]["accuracy"] == pytest.approx(np.mean(predicted[lang] == np.array(gold)), abs=1.5 / len(gold))
        assert result[lang]["examples"] == len(gold)
        assert result[lang]["majority"] == max(gold.count(label) for label in labels) / len(gold)
    assert result["en"]["accuracy"] > 0.8 and result["ja"]["accuracy"] < result["en"]["accuracy"]

    scrambled = {lang: (x, y if lang == "en" else [labels[(labels.index(label) + 1) % 4] for label in y])
                 for lang, (x, y) in test.items()}
    again = probe(scrambled)
    assert again["en"] == result["en"]
    for lang in ("de", "ja"):  # the same predictions, scored against other labels
        assert again[lang]["accuracy"] == pytest.approx(np.mean(predicted[lang] == np.array(scrambled[lang][1])),
                                                        abs=1.5 / len(scrambled[lang][1]))


def test_transfer_training_data_must_be_english(tmp_path):
    write_tsv(tmp_path / "train.tsv", [("Open the file", "desktop", "en"), ("Datei öffnen", "desktop", "de"),
                                       ("Remove the package", "packages", "en")])
    write_tsv(tmp_path / "test.tsv", [("Close the file", "desktop", "en")])
    with pytest.raises(PretrainError, match="trains on en only, but it holds rows in de"):
        read_transfer(tmp_path)


def test_bundled_set_is_small_parallel_and_keeps_train_and_test_apart():
    size = sum(p.stat().st_size for p in BUNDLED.rglob("*") if p.is_file())
    assert size <= 2 * 2**20, size
    pairs = read_retrieval(BUNDLED / "retrieval")
    assert sorted(pairs) == sorted(p.name.split(".")[0] for p in (REPO / "data_prep" / "sample_corpus").iterdir()
                                   if not p.name.startswith("en."))
    task = read_transfer(BUNDLED / "transfer")
    train = set(task.train_texts)
    english_test = set(task.test["en"][0])
    assert not train & english_test
    assert not train & {en for en, _ in pairs.values() for en in en}  # one probe's data is not the other's

    def skeleton(text):
        return "".join(c for c in text.lower() if c.isalpha())

    assert not {skeleton(t) for t in train} & {skeleton(t) for t in english_test}
    for lang, (en, xx) in pairs.items():
        assert len(en) == len(xx) >= 300 and not set(en) & set(xx), lang


def test_random_model_scores_near_chance_on_the_bundled_set(spm_model):
    """An untrained model finds a translation only from length and shared subword pieces: far
    from what a model that aligned languages finds, though above 1 / pairs."""
    result = Probes(ProbeConfig(), spm_model, 2, say=lambda _: None).run(random_model(spm_model), torch.device("cpu"))
    retrieval, transfer = result["retrieval"], result["transfer"]
    assert retrieval["macro"]["mean"] < 0.03, retrieval["macro"]  # chance 0.001; measured 0.01-0.02
    majority = np.mean([row["majority"] for lang, row in transfer["languages"].items() if lang != "en"])
    assert transfer["macro"]["accuracy"] < majority + 0.05, (transfer["macro"], majority)


# ---- embeddings --------------------------------------------------------------------------


def test_embeddings_do_not_depend_on_batching_or_ranks(spm_model):
    from data_prep.dictionary import Dictionary

    model = random_model(spm_model)
    texts = [row[1] for row in bundled_rows("retrieval/ja.tsv.xz")][:50] + ["x"]
    ids = tokenize(Dictionary(spm_model), texts, max_tokens=12)
    assert max(len(t) for t in ids) == 12 and ids[0][-1] == 2  # cut, </s> kept
    calls = []

    def encode(input_ids, mask):
        calls.append(len(input_ids))
        return model.encode(input_ids, mask, num_layers=1)

    one = embed(encode, ids, 64, batch_size=64, device=torch.device("cpu"))
    # Each sentence alone: the mean of its layer-1 states, no padding anywhere.
    alone = torch.stack([model.encode(torch.tensor([t]), num_layers=1)[0].mean(dim=0) for t in ids])
    torch.testing.assert_close(one, alone, atol=1e-5, rtol=1e-5)
    # Three simulated ranks with batches of 8: each embeds its share; the sum is the whole.
    calls.clear()
    parts = [embed(encode, ids, 64, batch_size=8, device=torch.device("cpu"), rank=r, world_size=3,
                   all_reduce=lambda t: t) for r in range(3)]
    torch.testing.assert_close(sum(parts), alone, atol=1e-5, rtol=1e-5)
    batches = math.ceil(len(ids) / 8)
    assert len(calls) == 3 * math.ceil(batches / 3)  # every rank the same number of forwards


def test_bad_probe_files_fail_with_a_clear_message(spm_model, tmp_path):
    write_tsv(tmp_path / "r" / "de.tsv", [("Open the file", "Datei öffnen"), ("only one field",)])
    with pytest.raises(PretrainError, match=r"de.tsv line 2: expected 2 non-empty tab-separated fields .* found 1"):
        read_retrieval(tmp_path / "r")
    write_tsv(tmp_path / "e" / "de.tsv", [("Open the file", " ")])
    with pytest.raises(PretrainError, match="found 2, one empty"):
        read_retrieval(tmp_path / "e")
    with pytest.raises(PretrainError, match="does not exist"):
        read_retrieval(tmp_path / "missing")
    (tmp_path / "latin1").mkdir()
    (tmp_path / "latin1" / "de.tsv").write_bytes("Open the file\tDatei \xf6ffnen\n".encode("latin-1"))
    with pytest.raises(PretrainError, match="de.tsv: not readable as UTF-8 text"):
        read_retrieval(tmp_path / "latin1")
    write_tsv(tmp_path / "t" / "train.tsv", [("Open the file", "desktop", "en"), ("Remove it", "packages", "en")])
    with pytest.raises(PretrainError, match="no test.tsv"):
        read_transfer(tmp_path / "t")
    write_tsv(tmp_path / "t" / "test.tsv", [("Datei öffnen", "desktop", "de")])
    with pytest.raises(PretrainError, match="no en rows"):
        read_transfer(tmp_path / "t")
    with pytest.raises(PretrainError, match="probe.layer=3: the model has layers 0"):
        Probes(ProbeConfig(layer=3), spm_model, 2)


# ---- in the trainer ------------------------------------------------------------------------

PROBES = ["trainer.probe_every=2", "probe.batch_size=128"]
COMMON = ["trainer.max_steps=4", "trainer.save_every=2", "trainer.keep_last=3", "deepspeed.precision=fp32",
          "data.num_workers=2"]


def probe_records(run: Path) -> dict[int, dict]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "retrieval/mean" in r:
            out[r["step"]] = {k: v for k, v in r.items() if k != "probe/seconds"}
    return out


@pytest.mark.slow
def test_probes_leave_training_unchanged_and_resume_stays_exact(prepared_data, tmp_path):
    """Two ranks, ZeRO 2: the loss curve with probes every 2 steps is bit-identical to the
    one without, and so is a run stopped at step 3 and resumed, probes included; xlmr-eval on
    the final checkpoint (one process) gives the trainer's probe numbers; xlmr-plot draws them."""
    plain, probed, resumed = tmp_path / "plain", tmp_path / "probed", tmp_path / "resumed"
    pretrain_run(prepared_data, plain, *COMMON, "deepspeed=zero2", nproc=2)
    out = pretrain_run(prepared_data, probed, *COMMON, *PROBES, "deepspeed=zero2", nproc=2).stdout
    assert "probes: retrieval 28 languages" in out and "retrieval " in out
    pretrain_run(prepared_data, resumed, *COMMON, *PROBES, "deepspeed=zero2", "trainer.stop_at_step=3", nproc=2)
    second = pretrain_run(prepared_data, resumed, *COMMON, *PROBES, "deepspeed=zero2", nproc=2).stdout
    assert "resuming from step 3" in second

    for key in ("loss", "grad_norm"):
        assert records(probed, key) == records(plain, key), key
        assert records(resumed, key) == records(plain, key), key
    probes = probe_records(probed)
    assert sorted(probes) == [2, 4] and probe_records(resumed) == probes
    last = probes[4]
    langs = sorted(p.name.split(".")[0] for p in (BUNDLED / "retrieval").iterdir())
    assert sorted(k.split("/")[1] for k in last if k.startswith("retrieval_to_en/")) == langs
    assert sorted(k.split("/")[1] for k in last if k.startswith("transfer_gap/")) == langs
    assert last["transfer/gap"] == pytest.approx(last["transfer/en"] - np.mean([last[f"transfer_acc/{lang}"]
                                                                                 for lang in langs]))

    report_path = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "pretrain.evaluation.cli", str(probed), "--no-mlm", "--no-fill-mask",
                           "--out", str(report_path)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "zero-shot transfer" in proc.stdout and "xx->en" in proc.stdout
    report = json.loads(report_path.read_text())["probes"]
    assert report["settings"]["batch_size"] == 128  # the run's probe.* settings
    for lang in langs:
        assert report["retrieval"]["languages"][lang]["to_en"] == pytest.approx(last[f"retrieval_to_en/{lang}"], abs=1e-9)
        assert report["transfer"]["languages"][lang]["accuracy"] == pytest.approx(last[f"transfer_acc/{lang}"], abs=1e-9)

    plots = subprocess.run([sys.executable, "-c", "from pretrain.cli import plot_main; plot_main()", str(probed)],
                           capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert plots.returncode == 0, plots.stderr
    for name in ("retrieval.png", "transfer.png"):
        assert (probed / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


@pytest.mark.slow
def test_probes_under_zero3_match_xlmr_eval(prepared_data, tmp_path):
    """ZeRO 3 partitions the weights: both ranks gather them for every probe forward, and the
    numbers are those of the consolidated checkpoint."""
    run = tmp_path / "zero3"
    pretrain_run(prepared_data, run, "trainer.max_steps=2", *PROBES, "deepspeed=zero3", "deepspeed.precision=fp32",
                 nproc=2)
    trainer = probe_records(run)[2]
    from pretrain.interop.consolidate import load_model

    loaded = load_model(run)
    result = Probes(ProbeConfig(batch_size=128), loaded.spm_model, 2, say=lambda _: None).run(
        loaded.model, torch.device("cpu"))
    for lang, row in result["retrieval"]["languages"].items():
        assert row["to_en"] == pytest.approx(trainer[f"retrieval_to_en/{lang}"], abs=0.003), lang
    assert result["transfer"]["en"] == pytest.approx(trainer["transfer/en"], abs=0.01)


# ---- the build script of the bundled set -------------------------------------------------


def write_mo(path: Path, messages: dict[str, str]) -> None:
    """A GNU .mo catalog (the format of gettext's msgfmt: magic, two tables of (length,
    offset), NUL-terminated strings), UTF-8, with the header entry."""
    import struct

    entries = {"": "Content-Type: text/plain; charset=UTF-8\n", **messages}
    keys = sorted(entries)
    ids, strs = (b"".join(s.encode() + b"\0" for s in seq) for seq in (keys, [entries[k] for k in keys]))
    n = len(keys)
    ids_start = 28 + 16 * n
    strs_start = ids_start + len(ids)
    table, offset = [], 0
    for k in keys:
        table.append((len(k.encode()), ids_start + offset))
        offset += len(k.encode()) + 1
    tr_table, offset = [], 0
    for k in keys:
        tr_table.append((len(entries[k].encode()), strs_start + offset))
        offset += len(entries[k].encode()) + 1
    head = struct.pack("<7I", 0x950412DE, 0, n, 28, 28 + 8 * n, 0, 0)
    body = b"".join(struct.pack("<2I", *t) for t in table + tr_table)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(head + body + ids + strs)


def test_build_script_filters_junk_decontaminates_and_keeps_train_english(tmp_path):
    from pretrain.evaluation.build_probe_set import build

    good = {f"Unable to reach server number {en} today": f"Palvelinta numero {fi} ei tavoitettu tänään"
            for en, fi in (("one", "yksi"), ("two", "kaksi"), ("three", "kolme"))}
    junk = {
        "Cannot open %s for reading": "Tiedostoa %s ei voi avata",  # a format string
        "Open File": "Avaa tiedosto",  # too short
        "Use the --force option here now": "Käytä valitsinta --force nyt",  # an option
        "Identical message stays English here": "Identical message stays English here",
        "menu\x04Quit the application right now": "Lopeta sovellus heti nyt",  # a context entry
        "Save the document before closing it": "Tallenna dokumentti ennen sulkemista",  # in the corpus
    }
    locale = tmp_path / "locale"
    # Finnish is "fi"; Norwegian Bokmål's "nb" is the sample's "no"; "nn" is not read.
    write_mo(locale / "fi" / "LC_MESSAGES" / "git.mo", {**good, **junk})
    write_mo(locale / "fi" / "LC_MESSAGES" / "apt.mo", {
        "Fetching the package lists from all sources": "Haetaan pakettiluettelot kaikista lähteistä",
        "Removing the obsolete packages from disk": "Poistetaan vanhentuneet paketit levyltä",
        "Skipping the unreadable entries for now": "Ohitetaan lukukelvottomat kohdat toistaiseksi"})
    # The same English in a catalog of another domain: no label, a retrieval pair only.
    write_mo(locale / "fi" / "LC_MESSAGES" / "gnupg2.mo", {
        "Skipping the unreadable entries for now": "Lukukelvottomat kohdat ohitetaan nyt"})
    write_mo(locale / "nb" / "LC_MESSAGES" / "git.mo", {"Unable to reach server number one today": "Kan ikke nå tjener nummer én i dag"})
    write_mo(locale / "nn" / "LC_MESSAGES" / "git.mo", {"Unable to reach server number two today": "Kan ikkje nå tenar nummer to i dag"})
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with lzma.open(corpus / "fi.txt.xz", "wt", encoding="utf-8") as f:
        f.write("Ohjeet: Tallenna dokumentti ennen sulkemista. Muuta tekstiä.\n")
    out = tmp_path / "out"
    manifest = build(locale, out, [corpus], per_language=10, train_per_label=5, test_per_label=1)

    left_out = manifest["left_out"]["fi"]
    assert left_out["format or machine text"] == 2 and left_out["too short"] == 1
    assert left_out["identical to English"] == 1 and left_out["context entry"] == 1
    assert left_out["seen in corpus"] == 1
    assert left_out["English seen in another catalog"] == 1
    assert manifest["clean_pairs"]["fi"] == 6 and manifest["clean_pairs"]["no"] == 1
    task = read_transfer(out / "transfer")
    # Per label the best-translated message is test (git's "number one": fi and no), the rest train.
    assert sorted(task.train_labels) == ["packages", "version-control", "version-control"]
    assert {lang: len(texts) for lang, (texts, _) in task.test.items()} == {"en": 2, "fi": 2, "no": 1}
    assert "Unable to reach server number one today" in task.test["en"][0]
    assert task.test["no"] == (["Kan ikke nå tjener nummer én i dag"], ["version-control"])
    train, test = set(task.train_texts), set(task.test["en"][0])
    assert not train & test
    # Retrieval keeps what the transfer task did not take: for fi the unlabelled message; no's
    # one message is a test message.
    pairs = read_retrieval(out / "retrieval")
    assert pairs == {"fi": (["Skipping the unreadable entries for now"], ["Ohitetaan lukukelvottomat kohdat toistaiseksi"])}
