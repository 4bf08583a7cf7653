"""metrics.jsonl -> PNG plots: loss (with validation loss), per-language loss, learning
rate (and the masking rate), the language shares of the tokens seen, throughput, and where the run probed (trainer.probe_every) the cross-lingual probes:
retrieval and zero-shot transfer per language. Used by `xlmr-plot RUN_DIR`."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from pretrain.metrics import read_metrics  # noqa: E402


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _per_language(ax, records: list[dict], prefix: str, summary: dict[str, str]) -> None:
    """One thin line per language of `prefix/<lang>`, and the `summary` keys (key -> label) bold."""
    langs = sorted({k.split("/", 1)[1] for r in records for k in r if k.startswith(prefix + "/")})
    for lang in langs:
        ax.plot(*_series(records, f"{prefix}/{lang}"), label=lang, linewidth=0.8, alpha=0.7)
    for key, label in summary.items():
        ax.plot(*_series(records, key), "k-o", label=label, linewidth=2.2, markersize=3)
    ax.grid(alpha=0.3)
    ax.legend(ncol=3, fontsize=6)


def plot_metrics(metrics_path: Path, out_dir: Path) -> list[Path]:
    """Write loss.png, lang_loss.png, lr.png, lang_share.png and throughput.png, and retrieval.png and
    transfer.png where the run probed; returns their paths."""
    records = read_metrics(metrics_path)
    if not any(r.get("loss") is not None for r in records):
        raise ValueError(f"{metrics_path} has no loss records yet")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*_series(records, "loss"), label="train")
    steps, valid = _series(records, "valid/loss")
    if steps:
        ax.plot(steps, valid, "o-", label="valid")
    ax.set(xlabel="step", ylabel="MLM loss (nats per masked token)", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out_dir / "loss.png"))

    langs = sorted({k.split("/", 1)[1] for r in records for k in r if k.startswith("lang_loss/")})
    fig, ax = plt.subplots(figsize=(8, 5))
    for lang in langs:
        ax.plot(*_series(records, f"lang_loss/{lang}"), label=lang, linewidth=1)
    ax.set(xlabel="step", ylabel="MLM loss", title="train loss per language")
    ax.grid(alpha=0.3)
    if langs:
        ax.legend(ncol=3, fontsize=7)
    paths.append(_save(fig, out_dir / "lang_loss.png"))

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(*_series(records, "lr"))
    ax.set(xlabel="step", ylabel="learning rate", title="learning rate (masking rate dashed)")
    ax.grid(alpha=0.3)
    steps, rate = _series(records, "mask_prob")
    if steps:
        ax2 = ax.twinx()
        ax2.plot(steps, rate, "--", color="tab:green")
        ax2.set_ylabel("masking rate")
    paths.append(_save(fig, out_dir / "lr.png"))

    # The language shares of the tokens seen per logged interval, stacked: phases show as steps.
    langs = sorted({k.split("/", 1)[1] for r in records for k in r if k.startswith("lang_share/")})
    fig, ax = plt.subplots(figsize=(8, 5))
    shared = [r for r in records if any(k.startswith("lang_share/") for k in r)]
    if shared:
        ax.stackplot([r["step"] for r in shared], [[r.get(f"lang_share/{lang}", 0.0) for r in shared] for lang in langs],
                     labels=langs)
        ax.legend(ncol=4, fontsize=6, loc="upper left", bbox_to_anchor=(1, 1))
    ax.set(xlabel="step", ylabel="share of tokens", title="language shares over training", ylim=(0, 1))
    paths.append(_save(fig, out_dir / "lang_share.png"))

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(*_series(records, "tokens_per_s"), label="tokens/s")
    ax.set(xlabel="step", ylabel="tokens/s", title="throughput")
    ax.grid(alpha=0.3)
    steps, mfu = _series(records, "mfu")
    if steps:
        ax2 = ax.twinx()
        ax2.plot(steps, [100 * m for m in mfu], color="tab:orange", label="MFU %")
        ax2.set_ylabel("MFU %")
    paths.append(_save(fig, out_dir / "throughput.png"))

    if any("retrieval/mean" in r for r in records):
        fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
        for ax, direction, title in zip(axes, ("to_en", "from_en"), ("xx -> en", "en -> xx")):
            _per_language(ax, records, f"retrieval_{direction}", {f"retrieval/{direction}": "macro"})
            ax.set(xlabel="step", ylabel="accuracy", title=f"parallel-sentence retrieval, {title}")
        paths.append(_save(fig, out_dir / "retrieval.png"))

        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        _per_language(axes[0], records, "transfer_acc", {"transfer/accuracy": "macro (not en)"})
        axes[0].set(xlabel="step", ylabel="accuracy", title="zero-shot transfer accuracy (en thick red)")
        axes[0].plot(*_series(records, "transfer_acc/en"), color="tab:red", linewidth=2.5)
        _per_language(axes[1], records, "transfer_gap", {"transfer/gap": "macro"})
        axes[1].set(xlabel="step", ylabel="English accuracy - the language's", title="transfer gap")
        paths.append(_save(fig, out_dir / "transfer.png"))
    return paths
