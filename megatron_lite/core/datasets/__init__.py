"""Datasets: the .bin/.idx store, GPT samples, blending, and the train/valid/test builder.

Names are imported lazily so that tools/preprocess_data.py (which needs only the indexed dataset)
starts without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "IndexedDataset": "indexed_dataset",
    "IndexedDatasetBuilder": "indexed_dataset_builder",
    "optimal_dtype": "indexed_dataset",
    "GPTDataset": "gpt_dataset",
    "GPTDatasetConfig": "gpt_dataset",
    "get_ltor_masks_and_position_ids": "gpt_dataset",
    "BlendedDataset": "blended_dataset",
    "build_train_valid_test_datasets": "builder",
    "parse_and_normalize_split": "utils",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
