"""Cross-lingual probes of an encoder, cheap enough to run while pretraining: parallel-sentence
retrieval (XTREME's Tatoeba/BUCC style) and a zero-shot transfer probe (a classifier trained on
English embeddings only, tested in every language), per language.

Both read sentence embeddings: the hidden states after `layer` blocks (a middle layer by
default, as XTREME's retrieval baselines), mean-pooled over the sentence's tokens (<s> and </s>
included, pads not). Every distinct sentence of the probe set is embedded once; with several
ranks the batches are dealt over them and the embeddings all-reduced, every rank running the
same number of forwards (ZeRO-3 gathers weights collectively). The probes draw no random
numbers: their results are a function of the weights and the probe set, and the trainer's RNG
streams are untouched (it runs them under torch.random.fork_rng besides).

Inputs (README "Cross-lingual probes"): RETRIEVAL_DIR/LANG.tsv[.xz|.gz], one pair per line,
`English<TAB>translation`; TRANSFER_DIR/train.tsv[.xz|.gz] and test.tsv[.xz|.gz], one example
per line, `text<TAB>label<TAB>language`, train rows English only. The bundled set
(probe_set/, built by build_probe_set.py from Debian's gettext catalogs) is the default.
"""
from __future__ import annotations

import gzip
import lzma
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from data_prep.dictionary import BOS, EOS, PAD, Dictionary
from pretrain.config import PretrainError, ProbeConfig

PIVOT = "en"  # retrieval pairs and transfer training are English-centred (XTREME, the XLM-R paper)
BUNDLED = Path(__file__).parent / "probe_set"
SUFFIXES = (".tsv", ".tsv.xz", ".tsv.gz")


# ---- reading the probe files -----------------------------------------------------------


def _open_text(path: Path):
    opener = {".xz": lzma.open, ".gz": gzip.open}.get(path.suffix, open)
    return opener(path, "rt", encoding="utf-8")


def _tsv_files(directory: Path) -> dict[str, Path]:
    """name (without the suffix) -> file, for the .tsv[.xz|.gz] files of a directory."""
    if not directory.is_dir():
        raise PretrainError(f"probe dir {directory} does not exist (or is not a directory)")
    files = {}
    for path in sorted(directory.iterdir()):
        suffix = next((s for s in SUFFIXES if path.name.endswith(s)), None)
        if suffix:
            name = path.name[:-len(suffix)]
            if name in files:
                raise PretrainError(f"{directory}: both {files[name].name} and {path.name}: keep one")
            files[name] = path
    return files


def read_tsv(path: Path, columns: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The rows of a TSV with exactly these columns, no header; a malformed line is an error
    naming the file and line (a probe computed on a silently shortened set would mislead)."""
    rows = []
    try:
        with _open_text(path) as f:
            for number, line in enumerate(f, 1):
                line = line.rstrip("\n").rstrip("\r")
                if not line.strip():
                    continue
                fields = line.split("\t")
                if len(fields) != len(columns) or not all(x.strip() for x in fields):
                    found = f"{len(fields)}" + (", one empty" if len(fields) == len(columns) else "")
                    raise PretrainError(f"{path} line {number}: expected {len(columns)} non-empty tab-separated "
                                        f"fields ({', '.join(columns)}), found {found}")
                rows.append(tuple(x.strip() for x in fields))
    except (UnicodeDecodeError, lzma.LZMAError, OSError) as exc:  # OSError: gzip's BadGzipFile too
        raise PretrainError(f"{path}: not readable as UTF-8 text ({exc})") from None
    return rows


def read_retrieval(directory: Path) -> dict[str, tuple[list[str], list[str]]]:
    """lang -> (English sentences, their translations), from LANG.tsv files."""
    pairs = {}
    for lang, path in _tsv_files(directory).items():
        rows = read_tsv(path, ("English", "translation"))
        if rows:
            pairs[lang] = ([en for en, _ in rows], [xx for _, xx in rows])
    if not pairs:
        raise PretrainError(f"retrieval dir {directory} holds no LANG.tsv file with pairs")
    return pairs


@dataclass
class TransferTask:
    train_texts: list[str]  # English only
    train_labels: list[str]
    test: dict[str, tuple[list[str], list[str]]]  # lang -> (texts, labels), English included
    labels: list[str] = field(default_factory=list)  # sorted, the classifier's classes


def read_transfer(directory: Path) -> TransferTask:
    files = _tsv_files(directory)
    missing = [name for name in ("train", "test") if name not in files]
    if missing:
        raise PretrainError(f"transfer dir {directory} has no {' or '.join(f'{n}.tsv' for n in missing)}")
    columns = ("text", "label", "language")
    train = read_tsv(files["train"], columns)
    others = sorted({lang for _, _, lang in train if lang != PIVOT})
    if others:  # the probe measures zero-shot transfer: it must not learn from other languages
        raise PretrainError(f"{files['train']}: the transfer probe trains on {PIVOT} only, "
                            f"but it holds rows in {', '.join(others)}")
    test: dict[str, tuple[list[str], list[str]]] = {}
    for text, label, lang in read_tsv(files["test"], columns):
        texts, labels = test.setdefault(lang, ([], []))
        texts.append(text)
        labels.append(label)
    labels = sorted({label for _, label, _ in train})
    if len(labels) < 2:
        raise PretrainError(f"{files['train']}: needs examples of at least two labels (has {labels})")
    if PIVOT not in test:
        raise PretrainError(f"{files['test']}: no {PIVOT} rows: the transfer gap is measured against them")
    unknown = sorted({label for _, ls in test.values() for label in ls} - set(labels))
    if unknown:
        raise PretrainError(f"{files['test']}: labels {', '.join(unknown)} never occur in {files['train'].name}")
    return TransferTask([t for t, _, _ in train], [label for _, label, _ in train], test, labels)


# ---- embeddings --------------------------------------------------------------------------


def tokenize(dictionary: Dictionary, texts: list[str], max_tokens: int) -> list[list[int]]:
    """`<s> pieces </s>` per text, cut to max_tokens (</s> kept last)."""
    return [[BOS, *ids[:max_tokens - 2].tolist(), EOS] for ids in dictionary.encode_lines(texts)]


Encode = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids [B, T], mask [B, T]) -> [B, T, H]
AllReduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over ranks in place (the trainer's all_reduce_sum)


@torch.no_grad()
def embed(encode: Encode, token_ids: list[list[int]], hidden_size: int, *, batch_size: int,
          device: torch.device, rank: int = 0, world_size: int = 1,
          all_reduce: Optional[AllReduce] = None) -> torch.Tensor:
    """Mean-pooled embeddings [N, H] (float32, on every rank) of the tokenized sentences.

    Sentences are batched in length order (little padding); batch k is embedded by rank
    k % world_size, and a rank with one batch fewer runs a one-token filler, so every rank
    makes the same number of forwards.
    """
    order = sorted(range(len(token_ids)), key=lambda i: (len(token_ids[i]), i))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    out = torch.zeros(len(token_ids), hidden_size, dtype=torch.float32, device=device)
    for k in range(rank, -(-len(batches) // world_size) * world_size, world_size):
        rows = batches[k] if k < len(batches) else []
        seqs = [token_ids[i] for i in rows] or [[EOS]]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, :len(s)] = torch.tensor(s)
        ids = ids.to(device)
        mask = ids.ne(PAD)
        hidden = encode(ids, mask).float()
        pooled = (hidden * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True)
        if rows:
            out[torch.tensor(rows, device=device)] = pooled
    return all_reduce(out) if world_size > 1 else out


# ---- the two probes ----------------------------------------------------------------------


def retrieval_accuracies(xx: torch.Tensor, en: torch.Tensor, xx_texts: list[str],
                         en_texts: list[str]) -> tuple[float, float]:
    """(xx->en, en->xx): the share of sentences whose nearest neighbour by cosine on the other
    side is their own translation (or a sentence of the same text: a duplicate is no miss).
    Ties go to the lower index. One similarity matrix serves both directions."""
    sims = F.normalize(xx.double(), dim=1) @ F.normalize(en.double(), dim=1).T
    to_en, from_en = sims.argmax(dim=1).tolist(), sims.argmax(dim=0).tolist()
    return (sum(en_texts[j] == en_texts[i] for i, j in enumerate(to_en)) / len(en_texts),
            sum(xx_texts[j] == xx_texts[i] for i, j in enumerate(from_en)) / len(xx_texts))


def fit_logistic_regression(features: torch.Tensor, targets: torch.Tensor, num_classes: int,
                            c: float = 1.0, max_iter: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, the objective of scikit-learn's LogisticRegression(C=c):
    c * sum of cross-entropies + |W|^2 / 2 (bias not penalized), minimized by L-BFGS from zero in
    float64. Deterministic: no random initialization, no shuffling."""
    x = features.double()
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = c * F.cross_entropy(x @ w + b, targets, reduction="sum") + 0.5 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def transfer_probe(train: torch.Tensor, train_labels: list[str], test: dict[str, tuple[torch.Tensor, list[str]]],
                   labels: list[str]) -> dict[str, dict]:
    """Per language {accuracy, majority (the most frequent label's share: what guessing it
    scores), examples}. The classifier sees English training embeddings and labels only;
    test labels are read after its predictions, to score them."""
    index = {label: i for i, label in enumerate(labels)}
    mean, std = train.double().mean(dim=0), train.double().std(dim=0).clamp(min=1e-8)
    targets = torch.tensor([index[y] for y in train_labels], device=train.device)
    w, b = fit_logistic_regression((train.double() - mean) / std, targets, len(labels))
    rows = {}
    for lang, (emb, gold) in test.items():
        predicted = (((emb.double() - mean) / std) @ w + b).argmax(dim=1).tolist()
        counts = [gold.count(label) for label in labels]
        rows[lang] = {"examples": len(gold),
                      "accuracy": sum(labels[p] == y for p, y in zip(predicted, gold)) / len(gold),
                      "majority": max(counts) / len(gold)}
    return rows


# ---- the probe set, tokenized once, and one run of both probes --------------------------


class Probes:
    """The probe set with every distinct sentence tokenized once; `run` embeds and scores."""

    def __init__(self, cfg: ProbeConfig, spm_model: Path, num_layers: int, say: Callable[[str], None] = print,
                 languages: Optional[list[str]] = None):
        """languages: only these (and English, the pivot); default every language of the set."""
        self.cfg = cfg
        self.layer = num_layers // 2 if cfg.layer is None else cfg.layer
        if not 0 <= self.layer <= num_layers:
            raise PretrainError(f"probe.layer={cfg.layer}: the model has layers 0 (embeddings) to {num_layers}")
        if cfg.max_tokens < 3 or cfg.batch_size < 1:
            raise PretrainError("probe.max_tokens must be >= 3 and probe.batch_size >= 1")
        self.retrieval_dir = Path(cfg.retrieval_dir) if cfg.retrieval_dir else BUNDLED / "retrieval"
        self.transfer_dir = Path(cfg.transfer_dir) if cfg.transfer_dir else BUNDLED / "transfer"
        self.pairs = read_retrieval(self.retrieval_dir)
        self.task = read_transfer(self.transfer_dir)
        if languages:
            self.pairs = {lang: p for lang, p in self.pairs.items() if lang in languages}
            self.task.test = {lang: t for lang, t in self.task.test.items() if lang in languages or lang == PIVOT}
        texts = [t for en, xx in self.pairs.values() for t in (*en, *xx)] + self.task.train_texts
        texts += [t for ts, _ in self.task.test.values() for t in ts]
        self.sentences = list(dict.fromkeys(texts))  # distinct, in first-seen order
        self.row = {t: i for i, t in enumerate(self.sentences)}
        self.token_ids = tokenize(Dictionary(spm_model), self.sentences, cfg.max_tokens)
        self.tokens = sum(len(t) for t in self.token_ids)
        say(f"probes: retrieval {len(self.pairs)} languages ({self.retrieval_dir}), transfer "
            f"{len(self.task.test)} languages, {len(self.task.labels)} labels ({self.transfer_dir}); "
            f"{len(self.sentences):,} sentences, {self.tokens:,} tokens, layer {self.layer}")

    def run(self, model, device: torch.device, rank: int = 0, world_size: int = 1,
            all_reduce: Optional[AllReduce] = None) -> dict:
        """Both probes on `model` (an XLMR, or a DeepSpeed engine's .module), left in the mode
        it was in. Returns the result tables (see `summarize`)."""
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            emb = embed(lambda ids, mask: model.encode(ids, mask, num_layers=self.layer), self.token_ids,
                        model.cfg.hidden_size, batch_size=self.cfg.batch_size, device=device, rank=rank,
                        world_size=world_size, all_reduce=all_reduce)
        finally:
            model.train(was_training)

        def rows(texts):  # scored where the embeddings are: on the GPU in a GPU run
            return emb[torch.tensor([self.row[t] for t in texts], device=emb.device)]

        retrieval = {}
        for lang, (en, xx) in self.pairs.items():
            to_en, from_en = retrieval_accuracies(rows(xx), rows(en), xx, en)
            retrieval[lang] = {"pairs": len(en), "to_en": to_en, "from_en": from_en}
        task = self.task
        transfer = transfer_probe(rows(task.train_texts), task.train_labels,
                                  {lang: (rows(ts), ls) for lang, (ts, ls) in task.test.items()}, task.labels)
        return summarize(retrieval, transfer, self.layer, time.perf_counter() - started)


def summarize(retrieval: dict, transfer: dict, layer: int, seconds: float) -> dict:
    """{"retrieval": {"languages": {lang: {pairs, to_en, from_en}}, "macro": {...}},
        "transfer": {"languages": {lang: {examples, accuracy, majority, gap}}, "en": accuracy,
                     "macro": {accuracy, gap} over the other languages}, "layer", "seconds"}.
    gap = English accuracy - the language's (the XLM-R paper's transfer gap)."""
    macro = None
    if retrieval:
        macro = {key: sum(r[key] for r in retrieval.values()) / len(retrieval) for key in ("to_en", "from_en")}
        macro["mean"] = (macro["to_en"] + macro["from_en"]) / 2
    en = transfer[PIVOT]["accuracy"]
    for lang, row in transfer.items():
        row["gap"] = en - row["accuracy"] if lang != PIVOT else None
    others = [row for lang, row in transfer.items() if lang != PIVOT]
    transfer_macro = {"languages": len(others),
                      "accuracy": sum(r["accuracy"] for r in others) / len(others) if others else None,
                      "gap": sum(r["gap"] for r in others) / len(others) if others else None}
    return {"layer": layer, "seconds": seconds,
            "retrieval": {"languages": retrieval, "macro": macro},
            "transfer": {"languages": transfer, "en": en, "macro": transfer_macro}}


def metrics_record(result: dict) -> dict:
    """The flat keys of metrics.jsonl and W&B (README "Metrics"); none without a value."""
    r, t = result["retrieval"], result["transfer"]
    record = {"retrieval/to_en": r["macro"]["to_en"], "retrieval/from_en": r["macro"]["from_en"],
              "retrieval/mean": r["macro"]["mean"], "transfer/en": t["en"],
              "transfer/accuracy": t["macro"]["accuracy"], "transfer/gap": t["macro"]["gap"],
              "probe/seconds": result["seconds"]}
    for lang, row in r["languages"].items():
        record[f"retrieval_to_en/{lang}"] = row["to_en"]
        record[f"retrieval_from_en/{lang}"] = row["from_en"]
    for lang, row in t["languages"].items():
        record[f"transfer_acc/{lang}"] = row["accuracy"]
        record[f"transfer_gap/{lang}"] = row["gap"]  # None for English: dropped below
    return {key: value for key, value in record.items() if value is not None}


def progress_line(step: int, record: dict) -> str:
    line = f"step {step:>6} | retrieval {record['retrieval/mean']:.3f} | transfer en {record['transfer/en']:.3f}"
    if "transfer/accuracy" in record:  # absent when the test set is English only
        line += f" others {record['transfer/accuracy']:.3f} (gap {record['transfer/gap']:+.3f})"
    return line + f" | probes {record['probe/seconds']:.1f} s"


def format_tables(result: dict) -> str:
    r, t = result["retrieval"], result["transfer"]
    lines = []
    if r["languages"]:
        lines += [f"retrieval (layer {result['layer']}: nearest neighbour by cosine; chance = 1 / pairs)",
                  f"{'language':<10} {'pairs':>6} {'xx->en':>8} {'en->xx':>8}"]
        lines += [f"{lang:<10} {row['pairs']:>6} {row['to_en']:>8.4f} {row['from_en']:>8.4f}"
                  for lang, row in r["languages"].items()]
        lines += [f"{'macro':<10} {'':>6} {r['macro']['to_en']:>8.4f} {r['macro']['from_en']:>8.4f}", ""]
    lines += [f"zero-shot transfer (layer {result['layer']}: trained on English only; "
              "gap = English accuracy - the language's)",
              f"{'language':<10} {'examples':>8} {'accuracy':>9} {'majority':>9} {'gap':>8}"]
    for lang, row in t["languages"].items():
        gap = "-" if row["gap"] is None else f"{row['gap']:+.4f}"
        lines.append(f"{lang:<10} {row['examples']:>8} {row['accuracy']:>9.4f} {row['majority']:>9.4f} {gap:>8}")
    macro = t["macro"]
    if macro["accuracy"] is not None:
        lines.append(f"{'macro':<10} {'':>8} {macro['accuracy']:>9.4f} {'':>9} {macro['gap']:>+8.4f}")
    return "\n".join(lines)
