"""Data loading for pretraining: streams the prepared WebDataset shards, mixes languages by
temperature sampling, splits the work over ranks and workers, and resumes exactly.

Modules: ``manifest`` (what the prep wrote), ``shards`` (reading one tar), ``dealing`` (which
slot reads which samples in which epoch), ``position`` (how far the stream got, carried
over a change of ranks or workers), ``loader`` (the train and validation loaders).
"""

from pretrain.data.loader import (
    DataConfig, TrainStream, ValidSet, build_train_loader, build_valid_loaders, carry_over_plan,
)
from pretrain.data.manifest import load_manifest, languages, mixing_probs, train_token_counts
from pretrain.data.shards import ShardError

__all__ = [
    "DataConfig",
    "ShardError",
    "TrainStream",
    "ValidSet",
    "build_train_loader",
    "build_valid_loaders",
    "carry_over_plan",
    "languages",
    "load_manifest",
    "mixing_probs",
    "train_token_counts",
]
