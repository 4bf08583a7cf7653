"""Stage 5, report: what happened to every language, as a table and a plot.

report/report.md (the printed table), report/report.json, report/languages.png (each
language's share before and after temperature sampling) and report/lid_confidence.png (each
language's lid.176 confidence distribution, kept vs dropped) are rebuilt from the manifest on
every run; they are cheap.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from .atomic import atomic_open, write_json
from .clean import FILTERS
from .manifest import DROP_REASONS

COLUMNS = ["lang", "docs", "lines", "chars", "tokens", "sequences", "unk %", *FILTERS, "p %", "q %"]


def report_rows(manifest: Dict) -> List[List]:
    rows = []
    for lang, rec in manifest["languages"].items():
        share = manifest["sampling"]["languages"][lang]
        rows.append([
            lang, rec["docs"], rec["lines"], rec["chars"],
            rec["train"]["tokens"] + rec["valid"]["tokens"],
            rec["train"]["sequences"] + rec["valid"]["sequences"],
            round(100 * rec["unk_rate"], 3), *(rec["removed"][f] for f in FILTERS),
            round(100 * share["p"], 2), round(100 * share["q"], 2),
        ])
    for lang, ex in manifest["excluded_languages"].items():
        rows.append([f"{lang} (excluded)", 0, 0, 0, 0, 0, "-", *(ex["removed"].get(f, 0) for f in FILTERS), 0, 0])
    return rows


def format_table(rows: List[List]) -> str:
    cells = [COLUMNS] + [[f"{v:,}" if isinstance(v, int) else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *map(line, cells[1:])])


def plot_languages(manifest: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = manifest["sampling"]["languages"]
    langs = sorted(shares, key=lambda lang: -shares[lang]["p"])
    x = range(len(langs))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(langs)), 4))
    ax.bar([i - 0.2 for i in x], [100 * shares[lang]["p"] for lang in langs], width=0.4, label="corpus share p")
    ax.bar([i + 0.2 for i in x], [100 * shares[lang]["q"] for lang in langs], width=0.4,
           label=f"sampled share q (α={manifest['sampling']['alpha']})")
    ax.set_xticks(list(x), langs, rotation=90)
    ax.set_yscale("log")
    ax.set_ylabel(f"% of {manifest['sampling']['count']}")
    ax.set_title("Language distribution before and after temperature sampling")
    ax.legend()
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def plot_lid_confidence(manifest: Dict, path: Path) -> None:
    """One small panel per judged language: documents by lid.176 confidence, kept vs dropped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    records = {**manifest["languages"], **manifest["excluded_languages"]}
    langs = [lang for lang in sorted(records) if records[lang].get("lid", {}).get("judged")]
    if not langs:
        return
    cols = min(6, len(langs))
    rows = -(-len(langs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 1.9 * rows), squeeze=False, sharex=True)
    for ax, lang in zip(axes.flat, langs):
        hist = records[lang]["lid"]["confidence_hist"]
        edges = np.linspace(0, 1, len(hist["kept"]) + 1)
        ax.stairs(hist["kept"], edges, fill=True, alpha=0.6, label="kept")
        ax.stairs(hist["dropped"], edges, fill=True, alpha=0.6, color="tab:red", label="dropped")
        ax.axvline(manifest["lid"]["threshold"], color="k", lw=0.8, ls="--")
        ax.set_title(lang, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(langs):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"lid.176 confidence per {manifest['lid']['unit']} (threshold dashed)", fontsize=10)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def write_report(manifest: Dict, out_dir: Path) -> str:
    rows = report_rows(manifest)
    table = format_table(rows)
    dropped = manifest.get("dropped_records") or {}
    if any(dropped.get(reason) for reason in DROP_REASONS):
        table += "\n\ndropped records: " + ", ".join(
            f"{name} ({', '.join(f'{n} {reason}' for reason, n in counts.items())})"
            for name, counts in dropped["by_file"].items())
    with atomic_open(out_dir / "report.md", "w", encoding="utf-8") as f:
        f.write(table + "\n")
    write_json(out_dir / "report.json", {"columns": COLUMNS, "rows": rows,
                                         "skipped_files": manifest["skipped_files"], "dropped_records": dropped,
                                         "lid_unjudged_languages": manifest["lid"]["unjudged_languages"]})
    plot_languages(manifest, out_dir / "languages.png")
    if manifest["lid"]["enabled"]:
        plot_lid_confidence(manifest, out_dir / "lid_confidence.png")
    return table
