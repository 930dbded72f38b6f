"""Data: corpus sources, tokenizers, the shard format, preparation and the training loader.

See docs/data.md. ``prepare`` lives in :mod:`muonq.data.prepare` (it pulls in tokenizer
libraries); the names below are what the trainer uses.
"""

from muonq.data.loader import DatasetMeta, TokenLoader, check_dataset, require_windows, validation_batches
from muonq.data.paths import dataset_dir, resolve_data_dir, tokenizer_tag

__all__ = [
    "DatasetMeta",
    "TokenLoader",
    "check_dataset",
    "dataset_dir",
    "require_windows",
    "resolve_data_dir",
    "tokenizer_tag",
    "validation_batches",
]
