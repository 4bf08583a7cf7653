"""Validation MLM loss per language: the loop the trainer runs at validation time, and the
`xlmr-eval PATH` command that runs it on a checkpoint or a Hugging Face dir.

A validation sequence's mask is drawn from (seed, language, the sequence's index in the
language's validation set) alone, and losses are summed per sequence, so a language's result
is a function of the data, the weights and the seed: the same whether 1, 2 or 4 ranks share
the set, and whatever the batch size (up to float rounding). The trainer's validation at a
step and `xlmr-eval` on that step's checkpoint therefore report the same numbers.

    xlmr-eval PATH [--step N] [--data-dir D] [--out FILE] [--batch-size B] [--languages en,de]
              [--max-sequences N|all] [--seed S] [--fill-mask "text with <mask>" ...]
              [--top-k K] [--no-fill-mask]

PATH is a run dir (its newest complete checkpoint, or the one of --step), a checkpoint tag dir
or a Hugging Face dir (xlmr-export's output, or any XLMRobertaForMaskedLM with our
sentencepiece.bpe.model). For a checkpoint the defaults repeat the trainer's validation: the
data dir, trainer.seed, masking.* and data.valid_max_sequences_per_lang of its run config; an
HF dir needs --data-dir and defaults to seed 0, the default masking and every sequence. The
data's vocabulary must be the model's (manifest vocab.sha256 = sha256 of its SentencePiece
model). The table is printed and written as JSON to --out, by default
RUN_DIR/eval/step_XXXXXXXX.json for a checkpoint and HF_DIR/eval.json for an HF dir. Then a
fill-mask demo prints the top-k pieces for built-in sentences (or --fill-mask ones).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from data_prep.atomic import write_json
from data_prep.dictionary import BOS, EOS, Dictionary
from data_prep.state import sha256_file
from pretrain.config import PretrainError
from pretrain.interop.consolidate import LoadedModel, load_model
from pretrain.data import DataConfig, ShardError, build_valid_loaders, load_manifest
from pretrain.masking import MaskingConfig, keyed_generator, load_word_starts, mask_batch
from pretrain.model import IGNORE_INDEX, XLMR, MLMOutput

SUMS = ("loss_sum", "masked", "correct", "sequences")  # the columns of evaluate_mlm's result
MASK_TOKEN = "<mask>"
# One sentence per script of the bundled sample (manual pages), each with one <mask>.
DEMO_SENTENCES = {
    "en": "--help display this <mask> and exit",
    "de": "--help zeigt <mask> an und beendet das Programm.",
    "ru": "-h, --help Показать краткую <mask> и закончить работу.",
    "el": "--help εμφάνιση αυτής εδώ της <mask> κι έξοδος",
    "ja": "--help このヘルプを<mask>して終了します。",
    "zh-Hans": "-?, --help 打印帮助<mask>并退出。",
    "ko": "-?, --help 도움말 <mask>를 출력하고 나갑니다.",
}


# ---- the validation loop (trainer and CLI) ----------------------------------------------


def validation_generator(seed: int, lang: str, index: int) -> torch.Generator:
    """The generator that masks sequence `index` of `lang`'s validation set."""
    return keyed_generator("valid", seed, lang, index)


def mask_validation(tokens: torch.Tensor, index: torch.Tensor, lang: str, masking: MaskingConfig, seed: int,
                    vocab_size: int, word_start: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] validation sequences with their indices [B] -> (input_ids, labels), each row
    masked on its own (RoBERTa masking, pretrain.masking) by its own generator."""
    rows = [mask_batch(row[None], masking, validation_generator(seed, lang, i), vocab_size=vocab_size,
                       word_start=word_start)
            for row, i in zip(tokens, index.tolist())]
    return torch.cat([ids for ids, _ in rows]), torch.cat([labels for _, labels in rows])


@torch.no_grad()
def evaluate_mlm(forward: Callable[[torch.Tensor, torch.Tensor], MLMOutput], valid_loaders: dict,
                 masking: MaskingConfig, *, seed: int, vocab_size: int, word_start: Optional[torch.Tensor] = None,
                 device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """This rank's sums, float64 [len(valid_loaders), len(SUMS)] on `device`, rows in the
    loaders' order: all-reduce them over ranks, then `summarize`.

    `forward(input_ids, labels)` is the model or the DeepSpeed engine, in eval mode;
    `valid_loaders` come from build_valid_loaders; `word_start` (masking.load_word_starts) is
    needed for whole-word masking. Every rank runs the same number of forwards
    per language (ZeRO-3 gathers weights collectively): a rank whose slice is a batch short
    feeds one row of </s>, which has nothing to mask and adds nothing.
    """
    sums = torch.zeros(len(valid_loaders), len(SUMS), dtype=torch.float64, device=device)
    for i, (lang, loader) in enumerate(valid_loaders.items()):
        done = 0
        for batch in loader:
            input_ids, labels = mask_validation(batch["input_ids"], batch["index"], lang, masking, seed, vocab_size,
                                                word_start)
            out = forward(input_ids.to(device), labels.to(device))
            # per-sequence sums added in float64: no dependence on which rows share a batch
            sums[i, 0] += out.seq_loss_sum.double().sum()
            sums[i, 1] += out.num_masked
            sums[i, 2] += out.num_correct
            sums[i, 3] += len(input_ids)
            done += 1
        filler = torch.full((1, loader.dataset.spec.seq_len), EOS, dtype=torch.long, device=device)
        for _ in range(loader.dataset.max_batches - done):
            forward(filler, torch.full_like(filler, IGNORE_INDEX))
    return sums


def summarize(langs: list[str], sums: torch.Tensor) -> dict:
    """{"languages": {lang: row}, "all": pooled over every masked token, "macro": the plain
    mean over languages}. A row: sequences, masked_tokens, loss (nats per masked token),
    perplexity = exp(loss), accuracy (argmax == target); None where nothing was masked.
    The macro perplexity is exp(macro loss), the geometric mean of the languages'."""
    rows = {lang: _row(*s) for lang, s in zip(langs, sums.tolist())}
    scored = [r for r in rows.values() if r["masked_tokens"]]
    macro_loss = sum(r["loss"] for r in scored) / len(scored) if scored else None
    macro = {"languages": len(scored), "loss": macro_loss,
             "perplexity": math.exp(macro_loss) if scored else None,
             "accuracy": sum(r["accuracy"] for r in scored) / len(scored) if scored else None}
    return {"languages": rows, "all": _row(*sums.sum(dim=0).tolist()), "macro": macro}


def _row(loss_sum: float, masked: float, correct: float, sequences: float) -> dict:
    loss = loss_sum / masked if masked else None
    return {"sequences": int(sequences), "masked_tokens": int(masked), "loss": loss,
            "perplexity": math.exp(loss) if masked else None, "accuracy": correct / masked if masked else None}


def format_table(result: dict) -> str:
    def line(name, sequences, masked, loss, ppl, acc):
        return f"{name:<10} {sequences:>10} {masked:>14} {loss:>8} {ppl:>11} {acc:>9}"

    def cells(name: str, row: dict) -> str:
        scored = row["loss"] is not None
        return line(name, f"{row['sequences']:,}" if "sequences" in row else "",
                    f"{row['masked_tokens']:,}" if "masked_tokens" in row else "",
                    f"{row['loss']:.4f}" if scored else "-", f"{row['perplexity']:.2f}" if scored else "-",
                    f"{row['accuracy']:.4f}" if scored else "-")

    lines = [line("language", "sequences", "masked tokens", "loss", "perplexity", "accuracy")]
    lines += [cells(lang, row) for lang, row in result["languages"].items()]
    lines += [cells("all", result["all"]), cells("macro", result["macro"])]
    return "\n".join(lines)


# ---- fill-mask ---------------------------------------------------------------------------


def check_masked_text(text: str) -> None:
    if text.count(MASK_TOKEN) != 1:
        raise PretrainError(f"fill-mask text {text!r} must hold exactly one {MASK_TOKEN} "
                            f"(it holds {text.count(MASK_TOKEN)})")


def encode_masked(dictionary: Dictionary, text: str) -> list[int]:
    """`<s> text </s>` with the text's one <mask> as the mask id. As HF's XLM-R tokenizer
    does, the text either side of <mask> is encoded on its own (SentencePiece drops the spaces
    around it and marks the piece after it as a word start)."""
    check_masked_text(text)
    pieces = [ids.tolist() for ids in dictionary.encode_lines(text.split(MASK_TOKEN))]
    return [BOS, *pieces[0], dictionary.mask, *pieces[1], EOS]


@torch.no_grad()
def fill_mask(model: XLMR, dictionary: Dictionary, text: str, top_k: int) -> list[tuple[str, float]]:
    """The top_k pieces for the <mask> of `text`, with their probabilities."""
    input_ids = torch.tensor([encode_masked(dictionary, text)])
    limit = model.cfg.max_positions - model.cfg.pad_id - 1
    if input_ids.shape[1] > limit:
        raise PretrainError(f"fill-mask text {text[:40]!r}… is {input_ids.shape[1]} tokens; the model takes {limit}")
    labels = torch.where(input_ids == dictionary.mask, 0, IGNORE_INDEX)  # marks the position; the target is unused
    logits, _, _ = model.masked_logits(input_ids, labels)
    top = logits[0].float().softmax(dim=-1).topk(top_k)
    return [(dictionary.piece(int(i)), float(p)) for p, i in zip(top.values, top.indices)]


# ---- the command -------------------------------------------------------------------------


def _max_sequences(value: str) -> Optional[int]:
    if value == "all":
        return None
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: a number >= 1, or all")
    return int(value)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xlmr-eval", description=(
        "Per-language MLM validation (loss, perplexity, accuracy) of a checkpoint of xlmr-pretrain or an HF "
        "dir, then a fill-mask demo. Defaults for a checkpoint repeat the trainer's validation."))
    p.add_argument("path", type=Path, help="a run dir, a checkpoint tag dir, or a Hugging Face dir")
    p.add_argument("--step", type=int, help="the checkpoint of this step (default: the newest complete one)")
    p.add_argument("--data-dir", type=Path, help="data of xlmr-prep (default: the checkpoint's; required for an HF dir)")
    p.add_argument("--out", type=Path, help="JSON results (default: RUN_DIR/eval/step_XXXXXXXX.json, HF_DIR/eval.json)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward (default 32; results do not depend on it)")
    p.add_argument("--languages", help="comma-separated language codes (default: every language with validation data)")
    # absent unless given: its default comes from the run config (and None means all)
    p.add_argument("--max-sequences", type=_max_sequences, default=argparse.SUPPRESS, metavar="N|all",
                   help="validation sequences per language (default: the run's data.valid_max_sequences_per_lang; all for an HF dir)")
    p.add_argument("--seed", type=int, help="seeds the masks (default: the run's trainer.seed; 0 for an HF dir)")
    p.add_argument("--fill-mask", action="append", metavar="TEXT", help="a sentence with one <mask> (repeatable; replaces the built-in ones)")
    p.add_argument("--top-k", type=int, default=5, help="predictions per fill-mask sentence (default 5)")
    p.add_argument("--no-fill-mask", action="store_true", help="skip the fill-mask demo")
    return p


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
    """Evaluate, print the table and the fill-mask demo, write the JSON."""
    for text in args.fill_mask or []:  # refuse a bad sentence before loading anything
        check_masked_text(text)
    if args.batch_size < 1 or args.top_k < 1:
        raise PretrainError("--batch-size and --top-k must be >= 1")
    loaded, run_cfg, default_out = _load(args.path, args.step)
    data_dir = args.data_dir or loaded.data_dir
    if data_dir is None:
        raise PretrainError(f"{args.path}: the model does not say which data it was trained on: pass --data-dir")
    manifest = _check_data(Path(data_dir), loaded, given=args.data_dir is not None)
    masking = MaskingConfig(**run_cfg.get("masking", {}))
    seed = args.seed if args.seed is not None else (run_cfg.get("trainer") or {}).get("seed", 0)
    max_sequences = getattr(args, "max_sequences", (run_cfg.get("data") or {}).get("valid_max_sequences_per_lang"))

    data_cfg = DataConfig(valid_max_sequences_per_lang=max_sequences, pin_memory=False)
    loaders = build_valid_loaders(data_dir, manifest, data_cfg, 0, 1, args.batch_size)
    if args.languages:
        wanted = args.languages.split(",")
        unknown = [lang for lang in wanted if lang not in loaders]
        if unknown:
            raise PretrainError(f"--languages: no validation data for {', '.join(unknown)} in {data_dir} "
                                f"(there is for {', '.join(loaders)})")
        loaders = {lang: loaders[lang] for lang in wanted}
    if not loaders:
        raise PretrainError(f"data dir {data_dir} holds no validation sequences")

    print(f"model      {loaded.source}")
    print(f"data dir   {data_dir} ({len(loaders)} languages, "
          f"{'every' if max_sequences is None else f'up to {max_sequences}'} validation sequences each, seed {seed})")
    word_start = load_word_starts(loaded.spm_model) if masking.whole_word else None
    sums = evaluate_mlm(loaded.model, loaders, masking, seed=seed, vocab_size=loaded.config.vocab_size,
                        word_start=word_start)
    result = summarize(list(loaders), sums)
    print(format_table(result))

    report = {"source": loaded.source, "path": str(args.path), "step": loaded.step, "data_dir": str(data_dir),
              "settings": {"seed": seed, "max_sequences_per_language": max_sequences, "batch_size": args.batch_size,
                           "masking": dataclasses.asdict(masking)},
              **result}
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


def main(argv: Optional[list[str]] = None) -> None:
    args = _parser().parse_args(argv)
    try:
        run(args)
    except (PretrainError, ShardError) as exc:
        print(f"xlmr-eval: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
