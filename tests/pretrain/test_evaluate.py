"""`xlmr-eval` and the validation loop it shares with the trainer (pretrain/evaluation/mlm.py), on a
real 2-rank run of the tiny model over the prepared sample.

The numbers are checked against the trainer's own validation (another world size, another
batch size), against Hugging Face's XLMRobertaForMaskedLM on sequences read straight from the
tars, and across splits of the validation set over 1 to 4 simulated ranks.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pretrain.interop.consolidate import load_model
from pretrain.data import DataConfig, build_valid_loaders, load_manifest
from pretrain.evaluation.cli import main
from pretrain.evaluation.mlm import DEMO_SENTENCES, SUMS, evaluate_mlm, validation_generator
from pretrain.interop.hf_convert import hf_config_kwargs, to_hf_state_dict
from pretrain.masking import MaskingConfig, mask_batch
from pretrain.model import IGNORE_INDEX
from tests.pretrain.test_data import read_tar
from tests.pretrain.test_train import pretrain_run, records

CAP = 5  # validation sequences per language: hr has exactly 5, most have more
STEPS = 6
TRAIN = [f"trainer.max_steps={STEPS}", "trainer.log_every=3", "deepspeed.micro_batch_size=2",
         "trainer.eval_at_end=true", f"data.valid_max_sequences_per_lang={CAP}"]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread in this process too, as the subprocesses' OMP_NUM_THREADS=1: small
    forwards on a busy 2-core machine run 30x slower with threads waiting on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def xlmr_eval(capsys):
    """Run the command's main() in this process (the imports cost seconds per subprocess)."""
    def call(*args, check: bool = True) -> subprocess.CompletedProcess:
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code
        captured = capsys.readouterr()
        result = subprocess.CompletedProcess(args, code, captured.out, captured.err)
        if check and code != 0:
            raise AssertionError(f"xlmr-eval failed ({code}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result
    return call


def error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("xlmr-eval: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def run(prepared_data, tmp_path_factory) -> Path:
    """A 2-rank ZeRO-1 fp32 run that validated at its last step, capped at CAP per language."""
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    pretrain_run(prepared_data, run_dir, *TRAIN, nproc=2)
    return run_dir


def hf_masked_lm(model):
    """XLMRobertaForMaskedLM holding the model's weights."""
    from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM

    hf = XLMRobertaForMaskedLM(XLMRobertaConfig(**hf_config_kwargs(model.cfg)))
    hf.load_state_dict(to_hf_state_dict(model.state_dict()), strict=True)
    return hf.eval()


@pytest.mark.slow
def test_xlmr_eval_equals_the_validation_of_the_2_rank_trainer(run, prepared_data):
    # The installed command, one plain process, batch 32: the trainer ran 2 ranks of 2.
    proc = subprocess.run([Path(sys.executable).parent / "xlmr-eval", run, "--no-fill-mask", "--no-probes"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run / "eval" / f"step_{STEPS:08d}.json").read_text())
    trainer = next(r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "valid/loss" in r)
    assert trainer["step"] == STEPS and report["step"] == STEPS
    manifest = json.loads((prepared_data / "manifest.json").read_text())
    assert set(report["languages"]) == set(manifest["languages"])
    for lang, row in report["languages"].items():
        assert rel(row["loss"], trainer[f"valid_lang_loss/{lang}"]) < 1e-5, lang
        assert row["sequences"] == min(CAP, manifest["languages"][lang]["valid"]["sequences"]), lang
        assert math.isclose(row["perplexity"], math.exp(row["loss"]), rel_tol=1e-12)
    assert rel(report["all"]["loss"], trainer["valid/loss"]) < 1e-5
    assert rel(report["all"]["accuracy"], trainer["valid/accuracy"]) < 1e-5
    assert report["data_dir"] == str(prepared_data) and report["settings"]["max_sequences_per_language"] == CAP
    # The printed table: one row per language, then all and macro.
    table = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines() if line.split()}
    assert float(table["de"][2]) == pytest.approx(report["languages"]["de"]["loss"], abs=1e-4)
    assert float(table["all"][2]) == pytest.approx(trainer["valid/loss"], abs=1e-4)
    losses = [trainer[f"valid_lang_loss/{lang}"] for lang in manifest["languages"]]
    assert float(table["macro"][0]) == pytest.approx(sum(losses) / len(losses), abs=1e-4)


@pytest.mark.slow
def test_validation_does_not_depend_on_ranks_or_batch_size(run, prepared_data):
    loaded = load_model(run)
    manifest = load_manifest(prepared_data)
    cap = 7  # 7 over 4 ranks: slices of 1 and 2 sequences, so some ranks run a filler forward
    tars = {s["lang"]: [] for s in manifest["shards"]}
    for shard in manifest["shards"]:
        if shard["split"] == "valid":
            tars[shard["lang"]] += [key for key, _ in read_tar(prepared_data / shard["path"], manifest["dtype"])]

    def evaluate(world: int, batch_size: int) -> torch.Tensor:
        total, forwards = 0, []
        for rank in range(world):
            loaders = build_valid_loaders(prepared_data, manifest, DataConfig(valid_max_sequences_per_lang=cap),
                                          rank, world, batch_size)
            for lang, loader in loaders.items():  # each batch's index names its sequence
                for batch in loader:
                    assert batch["keys"] == [tars[lang][i] for i in batch["index"].tolist()]
            calls = [0]

            def forward(input_ids, labels):
                calls[0] += 1
                return loaded.model(input_ids, labels)

            total = total + evaluate_mlm(forward, loaders, MaskingConfig(), seed=0, vocab_size=loaded.config.vocab_size)
            forwards.append(calls[0])
        assert len(set(forwards)) == 1, forwards  # ZeRO-3: every rank runs as many forwards
        return total

    one = evaluate(1, 32)
    assert one[:, SUMS.index("sequences")].tolist() == [min(cap, len(tars[lang])) for lang in sorted(tars)]
    for world, batch_size in [(2, 3), (4, 1), (3, 2)]:
        split = evaluate(world, batch_size)
        assert torch.equal(split[:, 1:], one[:, 1:]), (world, batch_size)  # masked, correct, sequences
        assert torch.allclose(split[:, 0], one[:, 0], rtol=1e-6), (world, batch_size)


@pytest.mark.slow
def test_loss_and_accuracy_match_hugging_face_on_the_same_masked_sequences(run, prepared_data, tmp_path, xlmr_eval):
    lang = "de"
    out = tmp_path / "de.json"
    xlmr_eval(run, "--languages", lang, "--no-fill-mask", "--out", out)
    row = json.loads(out.read_text())["languages"][lang]

    manifest = json.loads((prepared_data / "manifest.json").read_text())
    seq_len, V = manifest["seq_len"], manifest["vocab"]["size"]
    sequences = [tokens for s in manifest["shards"] if s["lang"] == lang and s["split"] == "valid"
                 for _, tokens in read_tar(prepared_data / s["path"], manifest["dtype"])][:CAP]
    hf = hf_masked_lm(load_model(run).model)
    loss_sum, masked, correct = 0.0, 0, 0
    with torch.no_grad():
        for i, tokens in enumerate(sequences):
            row_ids = torch.full((1, seq_len), 1, dtype=torch.long)  # <pad> after a short last sequence
            row_ids[0, :len(tokens)] = torch.from_numpy(tokens.astype("int64"))
            input_ids, labels = mask_batch(row_ids, MaskingConfig(), validation_generator(0, lang, i), vocab_size=V)
            logits = hf(input_ids=input_ids, attention_mask=input_ids.ne(1)).logits[0]
            at = labels[0] != IGNORE_INDEX
            loss_sum += float(F.cross_entropy(logits[at], labels[0][at], reduction="sum"))
            masked += int(at.sum())
            correct += int((logits[at].argmax(-1) == labels[0][at]).sum())
    assert row["masked_tokens"] == masked > 0 and row["sequences"] == len(sequences)
    assert rel(row["loss"], loss_sum / masked) < 1e-5
    assert row["accuracy"] == pytest.approx(correct / masked, abs=1e-12)


@pytest.mark.slow
def test_fill_mask_demo_custom_sentences_and_json(run, prepared_data, tmp_path, xlmr_eval):
    manifest = json.loads((prepared_data / "manifest.json").read_text())
    assert set(DEMO_SENTENCES) <= set(manifest["languages"])  # the demo speaks the sample's languages
    out = tmp_path / "demo.json"
    proc = xlmr_eval(run, "--languages", "en,ja", "--max-sequences", "2", "--top-k", "3", "--out", out)
    blocks = re.split(r"\n(?=fill-mask)", proc.stdout.split("\nwrote ")[0])[1:]
    assert len(blocks) == len(DEMO_SENTENCES)
    scripts = {"en": "Latin", "ru": "Cyrillic", "el": "Greek", "ja": "CJK", "ko": "Hangul"}
    assert {f"fill-mask [{lang}]" for lang in scripts} <= {b.split(":")[0] for b in blocks}
    for block in blocks:
        predictions = re.findall(r"^\s+\d\. (\S+)\s+([0-9.]+)$", block, re.M)
        probs = [float(p) for _, p in predictions]
        assert len(predictions) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1, block
    report = json.loads(out.read_text())
    assert list(report["languages"]) == ["en", "ja"]
    assert all(r["sequences"] == 2 and r["masked_tokens"] > 0 for r in report["languages"].values())

    # A sentence of one's own: the top pieces and probabilities of HF's tokenizer and model.
    text = "--help display this <mask> and exit"
    custom = xlmr_eval(run, "--languages", "en", "--max-sequences", "1", "--fill-mask", text, "--out", out)
    assert custom.stdout.count("fill-mask") == 1
    [entry] = json.loads(out.read_text())["fill_mask"]
    from transformers import XLMRobertaTokenizer

    shutil.copyfile(run / "sentencepiece.bpe.model", tmp_path / "sentencepiece.bpe.model")
    tokenizer = XLMRobertaTokenizer.from_pretrained(str(tmp_path))
    encoded = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        logits = hf_masked_lm(load_model(run).model)(**encoded).logits[0]
    at = int((encoded["input_ids"][0] == tokenizer.mask_token_id).nonzero())
    top = logits[at].softmax(-1).topk(5)
    assert [p["piece"] for p in entry["predictions"]] == tokenizer.convert_ids_to_tokens(top.indices.tolist())
    assert [p["probability"] for p in entry["predictions"]] == pytest.approx(top.values.tolist(), rel=1e-4)

    # Without a <mask>: refused before anything is loaded.
    assert "<mask>" in error_line(xlmr_eval(run, "--fill-mask", "no mask here", check=False))


@pytest.mark.slow
def test_hf_dir_needs_a_data_dir_and_gives_the_same_numbers(run, prepared_data, tmp_path, xlmr_eval):
    hf_dir = tmp_path / "hf"
    hf_masked_lm(load_model(run).model).save_pretrained(hf_dir)
    shutil.copyfile(run / "sentencepiece.bpe.model", hf_dir / "sentencepiece.bpe.model")
    assert "--data-dir" in error_line(xlmr_eval(hf_dir, check=False))

    xlmr_eval(hf_dir, "--data-dir", prepared_data, "--max-sequences", CAP, "--languages", "en,ru", "--no-fill-mask")
    report = json.loads((hf_dir / "eval.json").read_text())
    trainer = {lang: records(run, f"valid_lang_loss/{lang}")[STEPS] for lang in ("en", "ru")}
    for lang, loss in trainer.items():
        assert rel(report["languages"][lang]["loss"], loss) < 1e-5, lang


@pytest.mark.slow
def test_bad_inputs_fail_with_one_line(run, prepared_data, tmp_path, xlmr_eval):
    assert "does not exist" in error_line(xlmr_eval(tmp_path / "missing", check=False))
    (tmp_path / "empty").mkdir()
    assert "no complete checkpoint" in error_line(xlmr_eval(tmp_path / "empty", check=False))
    assert "no checkpoint of step 3" in error_line(xlmr_eval(run, "--step", 3, check=False))
    assert "no validation data for xx" in error_line(xlmr_eval(run, "--languages", "en,xx", check=False))
    # CUDA is hidden from this process (conftest.py): --device cuda is refused, auto picks the CPU
    assert "finds no CUDA GPU" in error_line(xlmr_eval(run, "--device", "cuda", check=False))
    assert "only cpu and cuda" in error_line(xlmr_eval(run, "--device", "meta", check=False))
    assert "not a device" in error_line(xlmr_eval(run, "--device", "gpu0", check=False))

    # The same data with another vocabulary's hash: refused before evaluating.
    other = tmp_path / "other_vocab"
    other.mkdir()
    for name in ("shards", "vocab"):
        (other / name).symlink_to(prepared_data / name)
    manifest = json.loads((prepared_data / "manifest.json").read_text())
    manifest["vocab"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert "another vocabulary" in error_line(xlmr_eval(run, "--data-dir", other, check=False))
