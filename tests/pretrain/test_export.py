"""`xlmr-export` and pretrain.interop.consolidate on real checkpoints of the trainer (torchrun, gloo,
tiny model): exports of every precision x ZeRO stage the trainer accepts (fp32 at ZeRO 0-3,
bf16 at 1-3) give, in Hugging Face transformers, the logits of the fp32 master weights as
DeepSpeed itself loads them, and `xlmr-eval` of the checkpoint gives the numbers of the export;
bf16 checkpoints resume exactly and on another rank count (fp32: test_train_distributed.py);
the exported tokenizer gives our Dictionary's ids;
HF dirs load back; the CLI's steps, errors, atomic output and memory bound."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, AutoTokenizer, XLMRobertaConfig, XLMRobertaForMaskedLM

from data_prep.dictionary import Dictionary
from pretrain.config import PretrainError
from pretrain.evaluation.cli import main as eval_main
from pretrain.interop.consolidate import consolidated_state_dict
from pretrain.interop.consolidate import load_model
from pretrain.interop.export import main as export_main
from pretrain.interop.hf_convert import hf_config_kwargs, model_config_from_hf, to_hf_state_dict
from pretrain.model import XLMR, ModelConfig, num_parameters
from tests.data_prep.corpus import sample_docs
from tests.pretrain.test_model import randomize
from tests.pretrain.test_train import REPO, free_port, pretrain_run

# Steps 2 and 3 are both kept: the CLI tests pick one.
TRAIN = ["trainer.max_steps=3", "trainer.save_every=2", "trainer.keep_last=5"]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


def fixed_batch(vocab_size: int, length: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of random ids in <s> ... </s>, one right-padded, one with a <mask>."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab_size - 1, (3, length), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    ids[1, 15:] = 1
    ids[2, 5] = vocab_size - 1
    return ids, ids.ne(1).long()


def export_cli(*args, check: bool = True, driver: Path | None = None) -> subprocess.CompletedProcess:
    """The installed `xlmr-export` command (or a driver script wrapping it) in a subprocess."""
    cmd = [sys.executable, str(driver)] if driver else [str(Path(sys.executable).parent / "xlmr-export")]
    proc = subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"xlmr-export failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def export(*args, check: bool = True) -> subprocess.CompletedProcess:
    """xlmr-export's main() in this process (no interpreter start-up and imports per call)."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            export_main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
    if check and code != 0:
        raise AssertionError(f"xlmr-export failed ({code}):\n{err.getvalue()[-4000:]}")
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def evaluate(path: Path, out: Path, *args) -> dict:
    """xlmr-eval's main() in this process, on the CPU: the JSON it wrote."""
    with contextlib.redirect_stdout(io.StringIO()):
        eval_main([str(path), "--out", str(out), "--no-probes", "--no-fill-mask", "--max-sequences", "4", "--seed", "0",
                   "--device", "cpu", *map(str, args)])
    return json.loads(out.read_text())


def error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("xlmr-export: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def trained(prepared_data, tmp_path_factory):
    """(stage, precision) -> a run dir of 3 steps (checkpoints at 2 and 3): ZeRO 0 on 1 rank, 1-3 on 2 ranks."""
    runs = {}

    def get(stage: int, precision: str = "fp32") -> Path:
        if (stage, precision) not in runs:
            run = tmp_path_factory.mktemp(f"zero{stage}-{precision}") / "run"
            pretrain_run(prepared_data, run, f"deepspeed=zero{stage}", f"deepspeed.precision={precision}", *TRAIN,
                         nproc=1 if stage == 0 else 2)
            runs[stage, precision] = run
        return runs[stage, precision]

    return get


# The reference: the trainer's own resume path (DeepSpeed's engine.load_checkpoint with the
# world size that saved the tag), the fp32 master weights gathered from the live engine
# (DeepSpeed's safe_get_full_fp32_param: from its ZeRO or BF16_Optimizer partitions), logits
# of a plain XLMR holding them. Nothing of pretrain.interop.consolidate or zero_to_fp32 is involved.
REFERENCE_DRIVER = """
import sys
from pathlib import Path
import torch
from deepspeed.utils import safe_get_full_fp32_param
from pretrain.checkpoint import load_checkpoint, read_meta
from pretrain.config import DeepSpeedConfig, OptimConfig
from pretrain.distributed import build_engine, init_distributed, shutdown_distributed
from pretrain.model import XLMR, ModelConfig
from pretrain.optim import build_lr_scheduler, build_optimizer
from tests.pretrain.test_export import fixed_batch

tag, out = Path(sys.argv[1]), sys.argv[2]
load = Path(sys.argv[3]) if len(sys.argv) > 3 else tag  # the tag's universal checkpoint, on another rank count
meta = read_meta(tag)
env = init_distributed()
cfg, run = ModelConfig(**meta["model"]), meta["config"]
ds, optim = DeepSpeedConfig(**run["deepspeed"]), OptimConfig(**run["optim"])
if load != tag:
    ds.extra = {**ds.extra, "checkpoint": {"load_universal": True}}
model = XLMR(cfg)
optimizer = build_optimizer(model, optim, max_grad_norm=ds.gradient_clipping if ds.zero_stage == 0 else 0.0)
scheduler = build_lr_scheduler(optimizer, optim, run["trainer"]["max_steps"])
engine = build_engine(model, optimizer, scheduler, ds, env.world_size)
load_checkpoint(engine, load, env.rank, env.world_size)
weights = {}
for name, p in engine.module.named_parameters():
    master = safe_get_full_fp32_param(p)  # every rank (ZeRO-3 gathers); None at ZeRO 0, where p is fp32
    weights[name] = (p if master is None else master).detach().clone().float()
if env.rank == 0:
    plain = XLMR(cfg).eval()
    ids, mask = fixed_batch(cfg.vocab_size)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            p.copy_(weights[name])
        torch.save(plain.lm_head(plain.encode(ids, mask)), out)
shutdown_distributed()  # leave together: a rank exiting alone can abort in the backend's teardown
"""


def reference_logits(tag: Path, tmp_path: Path, env: dict | None = None, universal: bool = False) -> torch.Tensor:
    """With `universal`, the tag's universal checkpoint (made by a resized resume) loaded on 1 rank."""
    driver, out = tmp_path / "reference.py", tmp_path / "reference.pt"
    driver.write_text(REFERENCE_DRIVER)
    world = 1 if universal else json.loads((tag / "checkpoint.json").read_text())["world_size"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                           "--master_port", str(free_port()), str(driver), str(tag), str(out),
                           *([str(tag / "universal")] if universal else [])],
                          capture_output=True, text=True, cwd=REPO, env=env or ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, map_location="cpu")


@pytest.mark.parametrize("stage, precision", [
    (0, "fp32"), pytest.param(1, "fp32", marks=pytest.mark.slow), pytest.param(2, "fp32", marks=pytest.mark.slow),
    (3, "fp32"),
    (1, "bf16"),  # DeepSpeed's BF16_Optimizer: the files zero_to_fp32 cannot read
    pytest.param(2, "bf16", marks=pytest.mark.slow), pytest.param(3, "bf16", marks=pytest.mark.slow),
])
def test_export_gives_the_trained_models_logits_in_hf(trained, stage, precision, tmp_path):
    run = trained(stage, precision)
    out = tmp_path / "hf"
    proc = export(run, out)
    assert "267,474 parameters" in proc.stdout  # the tiny model with the 2002-id vocabulary, tied decoder once
    tag = run / "checkpoints" / "step_00000003"
    expected = reference_logits(tag, tmp_path)

    hf, info = AutoModelForMaskedLM.from_pretrained(out, local_files_only=True, output_loading_info=True)
    assert type(hf).__name__ == "XLMRobertaForMaskedLM"
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    assert hf.lm_head.decoder.weight is hf.roberta.embeddings.word_embeddings.weight
    ids, mask = fixed_batch(hf.config.vocab_size)
    with torch.no_grad():
        logits = hf.eval()(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()  # outputs at padded positions mean nothing
    torch.testing.assert_close(logits[real], expected[real], atol=1e-4, rtol=1e-4)

    meta = json.loads((tag / "checkpoint.json").read_text())
    provenance = json.loads((out / "xlmr_export.json").read_text())
    assert (provenance["step"], provenance["tokens_seen"], provenance["vocab_sha256"]) == (
        3, meta["tokens_seen"], meta["vocab_sha256"])

    # xlmr-eval reads the checkpoint as the export holds it (the HF dir is loaded by another path)
    of_checkpoint = evaluate(run, tmp_path / "ckpt.json")
    of_export = evaluate(out, tmp_path / "hf.json", "--data-dir", meta["config"]["data_dir"])
    assert of_checkpoint["step"] == 3 and of_checkpoint["all"]["masked_tokens"] > 50
    assert of_checkpoint["all"]["masked_tokens"] == of_export["all"]["masked_tokens"]
    assert of_checkpoint["all"]["loss"] == pytest.approx(of_export["all"]["loss"], rel=1e-6)


def multilingual_lines() -> list[str]:
    lines = [doc[0] for lang in ("en", "de", "ru", "uk", "el", "ja", "zh-Hans", "ko", "vi", "tr")
             for doc in sample_docs(lang, max_docs=3)]
    return lines + ["مرحبا بالعالم، هذا نص عربي.", "नमस्ते दुनिया", "emoji 🙂 and 𝄞", "  spaces\tand tabs  "]


def test_exported_tokenizer_gives_our_ids(trained, prepared_data, tmp_path):
    run = trained(0)
    out = tmp_path / "hf"
    export(run, out)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    d = Dictionary(prepared_data / "vocab" / "spm.model")
    assert type(tok).__name__ in ("XLMRobertaTokenizer", "XLMRobertaTokenizerFast")
    assert len(tok) == d.size and tok.mask_token_id == d.mask == d.size - 1
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    lines = multilingual_lines()
    expected = [[0, *ids.tolist(), 2] for ids in d.encode_lines(lines)]
    assert tok(lines)["input_ids"] == expected
    assert sum(i > 3 for row in expected for i in row) > 200  # real pieces, not a wall of <unk>
    assert tok.model_max_length == 512


def hf_dir(spm_model: Path, path: Path, **config) -> tuple[XLMRobertaForMaskedLM, Path]:
    """A tiny random XLMRobertaForMaskedLM over the sample vocabulary, saved by HF itself."""
    cfg = ModelConfig(vocab_size=2002, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, max_positions=40)
    hf = XLMRobertaForMaskedLM(XLMRobertaConfig(**{**hf_config_kwargs(cfg), **config})).eval()
    randomize(hf)  # non-trivial biases and LayerNorm gains: a dropped or swapped one shows
    hf.tie_weights()
    hf.save_pretrained(path)
    shutil.copyfile(spm_model, path / "sentencepiece.bpe.model")
    return hf, path


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_load_model_reads_an_hf_dir(prepared_data, tmp_path, weights):
    hf, path = hf_dir(prepared_data / "vocab" / "spm.model", tmp_path / "hf")
    if weights == "bin":  # the older layout of hub checkpoints: every key, tied copies included
        (path / "model.safetensors").unlink()
        torch.save(hf.state_dict(), path / "pytorch_model.bin")
    loaded = load_model(path)
    assert loaded.config == ModelConfig(vocab_size=2002, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64,
                                        max_positions=40, layer_norm_eps=1e-5)
    assert loaded.spm_model == path / "sentencepiece.bpe.model" and loaded.step is None
    model = loaded.model
    assert not model.training and model.lm_head.decoder.weight is model.tok_emb.weight
    ids, mask = fixed_batch(2002)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        logits = model.lm_head(model.encode(ids, mask))
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("setting,message", [
    (dict(hidden_act="gelu_new"), "hidden_act='gelu_new'"),
    (dict(type_vocab_size=2), "type_vocab_size=2"),
    (dict(position_embedding_type="relative_key"), "position_embedding_type='relative_key'"),
    (dict(is_decoder=True), "is_decoder"),
    (dict(tie_word_embeddings=False), "tie_word_embeddings"),
    (dict(model_type="bert"), "model_type='bert'"),
])
def test_configs_our_model_cannot_represent_are_refused(prepared_data, tmp_path, setting, message):
    _, path = hf_dir(prepared_data / "vocab" / "spm.model", tmp_path / "hf")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **setting}))
    with pytest.raises(PretrainError, match="cannot represent") as err:
        load_model(path)
    assert message in str(err.value)


def test_hf_config_round_trip_and_vocabulary_mismatch(prepared_data, tmp_path):
    cfg = ModelConfig(vocab_size=250002, hidden_size=768, num_layers=12, num_heads=12, ffn_size=3072,
                      dropout=0.05, attention_dropout=0.0, layer_norm_eps=1e-6, init_std=0.01)
    assert model_config_from_hf(XLMRobertaConfig(**hf_config_kwargs(cfg)).to_dict()) == cfg
    _, path = hf_dir(prepared_data / "vocab" / "spm.model", tmp_path / "hf")
    (path / "config.json").write_text(json.dumps({**json.loads((path / "config.json").read_text()), "vocab_size": 3000}))
    with pytest.raises(PretrainError, match="3000 ids but sentencepiece.bpe.model has 2000 pieces"):
        load_model(path)


def hf_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def module_weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    """What DeepSpeed's stage-0 file holds for a step, in HF names (read without our code)."""
    path = run / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
    module = torch.load(path, weights_only=False)["module"]
    return {k: v for k, v in to_hf_state_dict(module).items() if not k.startswith("lm_head.decoder.")}


def test_cli_exports_the_step_asked_for(trained, tmp_path):
    run = trained(0)
    export_cli(run, 2, tmp_path / "two", "--dtype", "bf16")
    export(run, tmp_path / "newest")
    assert json.loads((tmp_path / "two" / "xlmr_export.json").read_text())["step"] == 2
    assert json.loads((tmp_path / "newest" / "xlmr_export.json").read_text())["step"] == 3
    two, newest = hf_weights(tmp_path / "two"), hf_weights(tmp_path / "newest")
    for name, value in module_weights(run, 2).items():
        assert two[name].dtype == torch.bfloat16 and torch.equal(two[name], value.bfloat16()), name
    for name, value in module_weights(run, 3).items():
        assert torch.equal(newest[name], value), name
    assert not torch.equal(two["lm_head.bias"].float(), newest["lm_head.bias"].bfloat16().float())


def test_cli_errors(trained, tmp_path):
    run = trained(0)
    (tmp_path / "empty").mkdir()
    assert "no complete checkpoint" in error_line(export(tmp_path / "empty", tmp_path / "o1", check=False))
    assert "does not exist" in error_line(export(tmp_path / "nowhere", tmp_path / "o2", check=False))
    line = error_line(export(run, 7, tmp_path / "o3", check=False))
    assert "no checkpoint of step 7" in line and "steps 2, 3" in line
    assert not any(p.name.startswith(("o1", "o2", "o3", ".o")) for p in tmp_path.iterdir())

    # A tag whose save was cut short is never exported, and never taken as the newest.
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    shutil.copytree(copy / "checkpoints" / "step_00000003", copy / "checkpoints" / "step_00000005")
    (copy / "checkpoints" / "step_00000005" / "checkpoint.json").unlink()
    assert "incomplete" in error_line(export(copy, 5, tmp_path / "o4", check=False))
    export(copy, tmp_path / "o5")
    assert json.loads((tmp_path / "o5" / "xlmr_export.json").read_text())["step"] == 3

    # An existing OUT_DIR with something in it is left alone unless --overwrite.
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert "--overwrite" in error_line(export(run, out, check=False))
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    export(run, out, "--overwrite")
    assert not (out / "mine.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp or old dirs left


def test_vocabulary_is_checked_and_found_in_the_data_dir(trained, prepared_data, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained(0), copy)
    (copy / "sentencepiece.bpe.model").write_bytes(b"another vocabulary")
    assert "not the vocabulary" in error_line(export(copy, tmp_path / "o1", check=False))
    (copy / "sentencepiece.bpe.model").unlink()  # then the data dir's, which is the right one
    export(copy, tmp_path / "o2")
    assert (tmp_path / "o2" / "sentencepiece.bpe.model").read_bytes() == (prepared_data / "vocab" / "spm.model").read_bytes()


# Kills the export (as SIGKILL would) right after the weights are written, mid-export.
KILL_DRIVER = """
import os, signal
import safetensors.torch
save_file = safetensors.torch.save_file
def save_then_die(*args, **kwargs):
    save_file(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
safetensors.torch.save_file = save_then_die
from pretrain.interop.export import main
main()
"""


def test_killed_export_leaves_no_out_dir(trained, tmp_path):
    driver = tmp_path / "kill.py"
    driver.write_text(KILL_DRIVER)
    out = tmp_path / "exports" / "hf"
    proc = export_cli(trained(0), out, driver=driver, check=False)
    assert proc.returncode == -9
    assert not out.exists()
    left = list(out.parent.iterdir())  # the partial export, under a name that is not OUT_DIR
    assert len(left) == 1 and left[0].name.startswith(".hf.tmp-") and (left[0] / "model.safetensors").is_file()
    export(trained(0), out)
    assert (out / "model.safetensors").is_file()


# The private memory (RssAnon: not the pages of files it maps) an export adds, sampled while
# it runs, past what importing and a warm-up export of a tiny checkpoint took (transformers'
# tokenizer conversion, torch's meta-device kernels: fixed costs).
MEMORY_DRIVER = """
import json, sys, threading
from pretrain.interop.export import main

def rss_anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

main([sys.argv[1], sys.argv[3], "--overwrite"])
base, peak, done = rss_anon(), [0], threading.Event()
def sample():
    while not done.wait(0.002):
        peak[0] = max(peak[0], rss_anon())
sampler = threading.Thread(target=sample)
sampler.start()
main([sys.argv[2], sys.argv[3], "--overwrite"])
done.set()
sampler.join()
print(json.dumps({"increase": peak[0] - base}))
"""


@pytest.mark.slow
def test_export_holds_one_copy_of_the_weights(trained, prepared_data, tmp_path):
    # 48.8M parameters (195 MB in fp32), most in a long position table: cheap to train.
    run = tmp_path / "big"
    pretrain_run(prepared_data, run, "deepspeed=zero3", "deepspeed.precision=fp32", "trainer.max_steps=1",
                 "deepspeed.micro_batch_size=1", "model.hidden_size=1024", "model.num_layers=1",
                 "model.ffn_size=256", "model.max_positions=40000", nproc=2)
    with torch.device("meta"):
        weights = 4 * num_parameters(XLMR(ModelConfig(vocab_size=2002, hidden_size=1024, num_layers=1, num_heads=2,
                                                      ffn_size=256, max_positions=40000)))
    shards = sum(p.stat().st_size for p in (run / "checkpoints" / "step_00000001").glob("*optim_states.pt"))
    assert shards > 2.9 * weights  # fp32 masters + Adam's two moments
    driver = tmp_path / "memory.py"
    driver.write_text(MEMORY_DRIVER)
    proc = export_cli(trained(3), run, tmp_path / "out", driver=driver)
    increase = json.loads(proc.stdout.splitlines()[-1])["increase"]
    assert increase > 0.9 * weights  # the sampler saw the weights materialized
    # One copy (plus q/k/v split out for HF): reading the shards into memory (3 copies) or
    # copying the weights once more (into a model, a converted state dict) would pass 1.5.
    assert increase < 1.5 * weights, f"the export held {increase / weights:.2f}x the fp32 weights"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_checkpoints_resume_exactly_and_on_one_rank(trained, prepared_data, stage, tmp_path):
    """The 2-rank bf16 run's step-2 checkpoint (a) resumed on the same 2 ranks makes step 3
    exactly as the uninterrupted run did (loss, gradient norm, fp32 masters); (b) resumed on 1
    rank goes through DeepSpeed's universal checkpoint, and a 1-rank engine loading that holds
    the fp32 masters the export of step 2 holds (logits equal in HF)."""
    from tests.pretrain.test_train import records

    run = trained(stage, "bf16")
    ckpts = run / "checkpoints"
    again = tmp_path / "again"
    (again / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpts / "step_00000002", again / "checkpoints" / "step_00000002")
    (again / "checkpoints" / "latest").write_text("step_00000002")
    proc = pretrain_run(prepared_data, again, f"deepspeed=zero{stage}", "deepspeed.precision=bf16", *TRAIN, nproc=2)
    assert "resuming from step 2" in proc.stdout
    for key in ("loss", "grad_norm"):
        assert records(again, key)[3] == records(run, key)[3], key
    expected = consolidated_state_dict(ckpts / "step_00000003")
    got = consolidated_state_dict(again / "checkpoints" / "step_00000003")
    assert all(torch.equal(got[k], expected[k]) for k in expected)

    resized = tmp_path / "resized"
    proc = pretrain_run(prepared_data, resized, f"deepspeed=zero{stage}", "deepspeed.precision=bf16", *TRAIN,
                        f"resume={ckpts / 'step_00000002'}", nproc=1)
    assert "through its universal checkpoint" in proc.stdout and "resuming from step 2" in proc.stdout
    assert sorted(records(resized)) == [3] and math.isfinite(records(resized)[3])
    out = tmp_path / "hf2"
    export(run, 2, out)
    hf = AutoModelForMaskedLM.from_pretrained(out, local_files_only=True).eval()
    ids, mask = fixed_batch(hf.config.vocab_size)
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask).logits
    expected = reference_logits(ckpts / "step_00000002", tmp_path, universal=True)
    torch.testing.assert_close(logits[mask.bool()], expected[mask.bool()], atol=1e-4, rtol=1e-4)
