"""The `xlmr-eval PATH` command: per-language MLM validation (evaluation/mlm.py) and the
cross-lingual probes (evaluation/probes.py) of a checkpoint or a Hugging Face dir, then a
fill-mask demo.

    xlmr-eval PATH [--step N] [--data-dir D] [--out FILE] [--batch-size B] [--languages en,de]
              [--max-sequences N|all] [--seed S] [--fill-mask "text with <mask>" ...]
              [--top-k K] [--no-fill-mask] [--no-mlm] [--no-probes] [--probe-layer K]
              [--retrieval-dir DIR] [--transfer-dir DIR] [--device auto|cpu|cuda|cuda:N]

PATH is a run dir (its newest complete checkpoint, or the one of --step), a checkpoint tag dir
or a Hugging Face dir (xlmr-export's output, or any XLMRobertaForMaskedLM with our
sentencepiece.bpe.model). For a checkpoint the defaults repeat the trainer's validation and
probes: the data dir, trainer.seed, masking.*, data.valid_max_sequences_per_lang and probe.* of
its run config; an HF dir needs --data-dir (or --no-mlm) and defaults to seed 0, the default
masking, every sequence and the bundled probe set at the middle layer. The data's vocabulary
must be the model's (manifest vocab.sha256 = sha256 of its SentencePiece model). The tables are
printed and written as JSON to --out, by default RUN_DIR/eval/step_XXXXXXXX.json for a
checkpoint and HF_DIR/eval.json for an HF dir. Then a fill-mask demo prints the top-k pieces
for built-in sentences (or --fill-mask ones). The model runs on the GPU where there is one
(--device auto), else on the CPU; results agree between the two within float rounding.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Optional

import torch

from data_prep.atomic import write_json
from data_prep.dictionary import Dictionary
from data_prep.state import sha256_file
from pretrain.config import PretrainError, ProbeConfig
from pretrain.data import DataConfig, ShardError, build_valid_loaders, load_manifest
from pretrain.evaluation.mlm import DEMO_SENTENCES, check_masked_text, evaluate_mlm, fill_mask, format_table, summarize
from pretrain.evaluation.probes import Probes, format_tables
from pretrain.interop.consolidate import LoadedModel, load_model
from pretrain.masking import MaskingConfig, load_word_starts


def _max_sequences(value: str) -> Optional[int]:
    if value == "all":
        return None
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: a number >= 1, or all")
    return int(value)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xlmr-eval", description=(
        "Per-language MLM validation (loss, perplexity, accuracy) and cross-lingual probes (retrieval, zero-shot "
        "transfer) of a checkpoint of xlmr-pretrain or an HF dir, then a fill-mask demo. Defaults for a "
        "checkpoint repeat the trainer's validation and probes."))
    p.add_argument("path", type=Path, help="a run dir, a checkpoint tag dir, or a Hugging Face dir")
    p.add_argument("--step", type=int, help="the checkpoint of this step (default: the newest complete one)")
    p.add_argument("--data-dir", type=Path, help="data of xlmr-prep (default: the checkpoint's; required for an HF dir)")
    p.add_argument("--out", type=Path, help="JSON results (default: RUN_DIR/eval/step_XXXXXXXX.json, HF_DIR/eval.json)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward (default 32; results do not depend on it)")
    p.add_argument("--languages", help="comma-separated language codes (default: every language with validation or "
                                       "probe data); the probes keep English, their pivot")
    # absent unless given: its default comes from the run config (and None means all)
    p.add_argument("--max-sequences", type=_max_sequences, default=argparse.SUPPRESS, metavar="N|all",
                   help="validation sequences per language (default: the run's data.valid_max_sequences_per_lang; all for an HF dir)")
    p.add_argument("--seed", type=int, help="seeds the masks (default: the run's trainer.seed; 0 for an HF dir)")
    p.add_argument("--fill-mask", action="append", metavar="TEXT", help="a sentence with one <mask> (repeatable; replaces the built-in ones)")
    p.add_argument("--top-k", type=int, default=5, help="predictions per fill-mask sentence (default 5)")
    p.add_argument("--no-fill-mask", action="store_true", help="skip the fill-mask demo")
    p.add_argument("--no-mlm", action="store_true", help="skip the MLM validation (then no data dir is needed)")
    p.add_argument("--no-probes", action="store_true", help="skip the cross-lingual probes")
    p.add_argument("--probe-layer", type=int, help="probe the hidden states after this many blocks (default: the "
                                                   "run's probe.layer; the middle layer)")
    p.add_argument("--retrieval-dir", type=Path, help="LANG.tsv pair files (default: the run's probe.retrieval_dir; "
                                                      "the bundled set)")
    p.add_argument("--transfer-dir", type=Path, help="train.tsv + test.tsv of the transfer task (default: the run's "
                                                     "probe.transfer_dir; the bundled set)")
    p.add_argument("--device", default="auto", help="where the model runs: auto (the first GPU if there is one, "
                                                    "else the CPU), cpu, cuda or cuda:N")
    return p


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PretrainError(f"--device {name}: not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise PretrainError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PretrainError(f"--device {name}: torch finds no CUDA GPU here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise PretrainError(f"--device {name}: there are {torch.cuda.device_count()} GPU(s)")
    return device


def _load(path: Path, step: Optional[int]) -> tuple[LoadedModel, dict, Path]:
    """(the model, its run config ({} for an HF dir), the default JSON path)."""
    loaded = load_model(path, step)
    if loaded.tag is None:
        return loaded, {}, path / "eval.json"
    return loaded, loaded.meta.get("config") or {}, loaded.tag.parent.parent / "eval" / f"{loaded.tag.name}.json"


def _check_data(data_dir: Path, loaded: LoadedModel, given: bool) -> dict:
    try:
        manifest = load_manifest(data_dir)
    except (OSError, ValueError) as exc:
        hint = "" if given else " (the data dir the model was trained on, as its run config names it: pass --data-dir)"
        raise PretrainError(f"{exc}{hint}") from None
    vocab, model_sha = manifest["vocab"], sha256_file(loaded.spm_model)
    if vocab["sha256"] != model_sha:
        raise PretrainError(f"data dir {data_dir} was encoded with another vocabulary (sha256 {vocab['sha256'][:12]}…) "
                            f"than the model's {loaded.spm_model} ({model_sha[:12]}…): use the data it was trained on")
    if vocab["size"] != loaded.config.vocab_size:
        raise PretrainError(f"data dir {data_dir} has {vocab['size']} ids but the model {loaded.config.vocab_size}")
    if manifest["seq_len"] + loaded.config.pad_id + 1 > loaded.config.max_positions:
        raise PretrainError(f"data dir {data_dir}: sequences of {manifest['seq_len']} tokens are longer than the "
                            f"model's {loaded.config.max_positions - loaded.config.pad_id - 1} positions")
    return manifest


def run(args: argparse.Namespace) -> None:
    """Evaluate, print the tables and the fill-mask demo, write the JSON."""
    for text in args.fill_mask or []:  # refuse a bad sentence before loading anything
        check_masked_text(text)
    if args.batch_size < 1 or args.top_k < 1:
        raise PretrainError("--batch-size and --top-k must be >= 1")
    if args.no_mlm and args.no_probes:
        raise PretrainError("--no-mlm and --no-probes: nothing left to evaluate")
    device = _device(args.device)
    loaded, run_cfg, default_out = _load(args.path, args.step)
    loaded.model.to(device)
    languages = args.languages.split(",") if args.languages else None
    print(f"model      {loaded.source} (on {device})")
    report = {"source": loaded.source, "path": str(args.path), "step": loaded.step, "device": str(device)}
    if not args.no_mlm:
        report.update(_mlm(args, loaded, run_cfg, languages))
    if not args.no_probes:
        report["probes"] = _probes(args, loaded, run_cfg, languages)
    if not args.no_fill_mask:
        dictionary = Dictionary(loaded.spm_model)
        sentences = [(None, text) for text in args.fill_mask] if args.fill_mask else DEMO_SENTENCES.items()
        report["fill_mask"] = []
        for lang, text in sentences:
            predictions = fill_mask(loaded.model, dictionary, text, args.top_k)
            report["fill_mask"].append({"language": lang, "text": text, "predictions": [
                {"piece": piece, "probability": prob} for piece, prob in predictions]})
            print(f"\nfill-mask{f' [{lang}]' if lang else ''}: {text}")
            for rank, (piece, prob) in enumerate(predictions, 1):
                print(f"  {rank:>2}. {piece:<20} {prob:.4f}")

    out = args.out or default_out
    write_json(out, report)
    print(f"\nwrote {out}")


def _mlm(args: argparse.Namespace, loaded: LoadedModel, run_cfg: dict, languages: Optional[list[str]]) -> dict:
    """The MLM validation: its settings and table (printed), as the report's top-level keys."""
    data_dir = args.data_dir or loaded.data_dir
    if data_dir is None:
        raise PretrainError(f"{args.path}: the model does not say which data it was trained on: pass --data-dir "
                            "(or --no-mlm for the probes alone)")
    manifest = _check_data(Path(data_dir), loaded, given=args.data_dir is not None)
    masking = MaskingConfig(**run_cfg.get("masking", {}))
    seed = args.seed if args.seed is not None else (run_cfg.get("trainer") or {}).get("seed", 0)
    max_sequences = getattr(args, "max_sequences", (run_cfg.get("data") or {}).get("valid_max_sequences_per_lang"))

    data_cfg = DataConfig(valid_max_sequences_per_lang=max_sequences, pin_memory=False)
    loaders = build_valid_loaders(data_dir, manifest, data_cfg, 0, 1, args.batch_size)
    if languages:
        unknown = [lang for lang in languages if lang not in loaders]
        if unknown:
            raise PretrainError(f"--languages: no validation data for {', '.join(unknown)} in {data_dir} "
                                f"(there is for {', '.join(loaders)})")
        loaders = {lang: loaders[lang] for lang in languages}
    if not loaders:
        raise PretrainError(f"data dir {data_dir} holds no validation sequences")

    print(f"data dir   {data_dir} ({len(loaders)} languages, "
          f"{'every' if max_sequences is None else f'up to {max_sequences}'} validation sequences each, seed {seed})")
    word_start = load_word_starts(loaded.spm_model) if masking.whole_word else None
    device = loaded.model.tok_emb.weight.device
    sums = evaluate_mlm(loaded.model, loaders, masking, seed=seed, vocab_size=loaded.config.vocab_size,
                        word_start=word_start, device=device)
    result = summarize(list(loaders), sums.cpu())
    print(format_table(result))
    return {"data_dir": str(data_dir),
            "settings": {"seed": seed, "max_sequences_per_language": max_sequences, "batch_size": args.batch_size,
                         "masking": dataclasses.asdict(masking)},
            **result}


def _probes(args: argparse.Namespace, loaded: LoadedModel, run_cfg: dict, languages: Optional[list[str]]) -> dict:
    """The probes of the run's probe.* settings (the trainer's), or of the options given."""
    cfg = ProbeConfig(**run_cfg.get("probe", {}))
    given = {"layer": args.probe_layer, "retrieval_dir": args.retrieval_dir, "transfer_dir": args.transfer_dir}
    cfg = dataclasses.replace(cfg, **{k: str(v) if isinstance(v, Path) else v for k, v in given.items() if v is not None})
    print()
    probes = Probes(cfg, loaded.spm_model, loaded.config.num_layers, languages=languages)
    result = probes.run(loaded.model, loaded.model.tok_emb.weight.device)
    print(format_tables(result))
    return {"settings": dataclasses.asdict(cfg), **result}


def main(argv: Optional[list[str]] = None) -> None:
    args = _parser().parse_args(argv)
    try:
        run(args)
    except (PretrainError, ShardError) as exc:
        print(f"xlmr-eval: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
