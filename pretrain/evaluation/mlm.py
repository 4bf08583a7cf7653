"""Validation MLM loss per language, the loop the trainer runs at validation time and
`xlmr-eval` (evaluation/cli.py) runs on a checkpoint or a Hugging Face dir; and the fill-mask
demo.

A validation sequence's mask is drawn from (seed, language, the sequence's index in the
language's validation set) alone, and losses are summed per sequence, so a language's result
is a function of the data, the weights and the seed: the same whether 1, 2 or 4 ranks share
the set, and whatever the batch size (up to float rounding). The trainer's validation at a
step and `xlmr-eval` on that step's checkpoint therefore report the same numbers.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from data_prep.dictionary import BOS, EOS, Dictionary
from pretrain.config import PretrainError
from pretrain.masking import MaskingConfig, keyed_generator, mask_batch
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
    input_ids = torch.tensor([encode_masked(dictionary, text)], device=model.tok_emb.weight.device)
    limit = model.cfg.max_positions - model.cfg.pad_id - 1
    if input_ids.shape[1] > limit:
        raise PretrainError(f"fill-mask text {text[:40]!r}… is {input_ids.shape[1]} tokens; the model takes {limit}")
    labels = torch.where(input_ids == dictionary.mask, 0, IGNORE_INDEX)  # marks the position; the target is unused
    logits, _, _ = model.masked_logits(input_ids, labels)
    top = logits[0].float().softmax(dim=-1).topk(top_k)
    return [(dictionary.piece(int(i)), float(p)) for p, i in zip(top.values, top.indices)]
