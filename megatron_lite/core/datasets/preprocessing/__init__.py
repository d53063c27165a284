"""Preprocessing: JSONL text -> Megatron .bin/.idx token datasets, and merging them.

inputs (reading JSONL files in blocks) -> encoding (tokenising workers) -> writing (one shard per
key); merging concatenates shards; cli holds tools/preprocess_data.py and tools/merge_datasets.py.
"""

from megatron_lite.core.datasets.preprocessing.cli import (
    build_merge_parser,
    build_preprocess_parser,
    merge_main,
    preprocess_main,
)
from megatron_lite.core.datasets.preprocessing.encoding import ChunkEncoder, ChunkResult
from megatron_lite.core.datasets.preprocessing.inputs import Chunk, read_chunks, resolve_inputs
from megatron_lite.core.datasets.preprocessing.merging import find_dataset_prefixes, merge_datasets
from megatron_lite.core.datasets.preprocessing.writing import OutputStats, PreprocessStats, preprocess

__all__ = [
    "Chunk",
    "ChunkEncoder",
    "ChunkResult",
    "OutputStats",
    "PreprocessStats",
    "build_merge_parser",
    "build_preprocess_parser",
    "find_dataset_prefixes",
    "merge_datasets",
    "merge_main",
    "preprocess",
    "preprocess_main",
    "read_chunks",
    "resolve_inputs",
]
