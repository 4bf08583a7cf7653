"""Small corpora for tests, cut from the bundled sample (real text), written in any layout."""
from __future__ import annotations

import lzma
from pathlib import Path
from typing import Dict, List

from tests.conftest import SAMPLE_CORPUS


def sample_docs(lang: str, max_docs: int = 1000, max_bytes: int = 60_000) -> List[List[str]]:
    """The first documents of a language of the bundled sample, as lists of paragraphs."""
    with lzma.open(SAMPLE_CORPUS / f"{lang}.txt.xz", "rt", encoding="utf-8") as f:
        text = f.read()
    docs, size = [], 0
    for block in text.split("\n\n"):
        paragraphs = [p for p in block.split("\n") if p.strip()]
        if paragraphs and len(docs) < max_docs and size < max_bytes:
            docs.append(paragraphs)
            size += sum(len(p.encode()) + 1 for p in paragraphs)
    return docs


def cc100_text(docs: List[List[str]]) -> str:
    return "".join("\n".join(doc) + "\n\n" for doc in docs)


def write_corpus(directory: Path, langs: Dict[str, List[List[str]]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for lang, docs in langs.items():
        (directory / f"{lang}.txt").write_text(cc100_text(docs), encoding="utf-8")
    return directory


SMALL_LANGS = ("en", "de", "fr", "ru")
# Settings for small crafted corpora: a vocabulary that trains in about a second.
SMALL_ARGS = ["vocab.size=400", "pack.seq_len=32", "shard.target_mb=0.02", "progress=false", "vocab.character_coverage=0.999"]


def small_corpus(directory: Path) -> Path:
    return write_corpus(directory, {lang: sample_docs(lang, max_bytes=40_000) for lang in SMALL_LANGS})
