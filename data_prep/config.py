"""Typed configuration of `xlmr-prep`, mirrored by conf/prep.yaml.

The dataclasses are registered in Hydra's ConfigStore as the schema of the YAML tree, so a
misspelled key fails at load time with Hydra's message instead of deep inside a stage.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore

STAGES = ("clean", "dedup", "vocab", "encode", "manifest", "report")


@dataclass
class LidConfig:
    """Language identification of each document with fastText's lid.176, as CCNet did (lid.py)."""

    enabled: bool = True
    threshold: float = 0.5  # documents whose top language scores below it are dropped (CCNet: 0.5)
    unit: str = "document"  # document | line: what one decision is about
    action: str = "drop"  # drop | route: a document in another language of the corpus is filed there
    route_unlabelled: bool = False  # records without `lang` and *.txt files not named LANG.txt: by LID


@dataclass
class CleanConfig:
    min_line_chars: int = 2  # after normalization; shorter lines are dropped
    max_line_chars: int = 100_000  # longer lines are dropped (never held in memory whole)
    max_control_fraction: float = 0.1  # lines with more control/replacement chars are junk
    dedup: bool = True  # exact line dedup per language by hash, as CCNet does (the dedup stage)
    chunk_mb: float = 64.0  # text per clean unit (parts cut at document boundaries; not for compressed files)
    index_every_mb: float = 1.0  # spacing of document-boundary offsets for parallel encoding
    lid: LidConfig = field(default_factory=LidConfig)


@dataclass
class DedupConfig:
    # Per process: a language's line keys are split into buckets that fit. Small, so that from
    # ~1 GB of a language up every bucket is near the budget and dedup's memory stays flat.
    memory_mb: float = 64.0


@dataclass
class VocabConfig:
    size: int = 8000  # SentencePiece pieces; the model vocabulary is size + 2 (<pad>, <mask>)
    model_type: str = "unigram"
    sample_lines: int = 300_000  # cap on the temperature-sampled training sample
    character_coverage: float = 0.9995  # keeps CJK and rare scripts covered
    byte_fallback: bool = False
    max_sentence_bytes: int = 8192  # longer sample lines are skipped (SentencePiece's limit)
    gb_per_million_lines: float = 7.0  # trainer memory guidance used for the up-front estimate
    threads: int = 0  # 0: all cores
    model: Optional[str] = None  # an existing SentencePiece model to use instead of training


@dataclass
class SamplingConfig:
    alpha: float = 0.3  # q_i ∝ p_i^alpha; XLM-R used 0.3


@dataclass
class SplitConfig:
    valid_fraction: float = 0.01  # share of each language's documents held out
    valid_min_docs: int = 1  # held out even for tiny languages (if they have >= 2 documents)
    valid_max_docs: int = 2000


@dataclass
class PackConfig:
    seq_len: int = 512
    chunk_mb: float = 64.0  # text per encode task; each task ends with one short sequence


@dataclass
class ShardConfig:
    target_mb: float = 256.0  # 100-500 MB on real data


@dataclass
class TaskConfig:
    """This process's share of the clean, dedup and encode units when it runs as a job array (SLURM)."""

    index: int = 0
    count: int = 1


@dataclass
class PrepConfig:
    input_dir: str = "???"
    output_dir: str = "???"
    workers: int = 0  # processes; 0: all cores
    seed: int = 0
    stages: List[str] = field(default_factory=lambda: list(STAGES))  # stages left out must be complete
    force: Optional[str] = None  # rebuild this stage and everything after it
    progress: bool = True
    clean: CleanConfig = field(default_factory=CleanConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    vocab: VocabConfig = field(default_factory=VocabConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    task: TaskConfig = field(default_factory=TaskConfig)


def register_configs() -> None:
    ConfigStore.instance().store(name="prep_schema", node=PrepConfig)
