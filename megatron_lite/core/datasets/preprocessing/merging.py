"""Merging shards: concatenate .bin/.idx datasets into one (Megatron's add_index), all-or-nothing."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from megatron_lite.core.datasets.indexed_dataset import IndexedDataset, bin_path_of, idx_path_of
from megatron_lite.core.datasets.indexed_dataset_builder import IndexedDatasetBuilder
from megatron_lite.core.datasets.preprocessing.writing import OutputStats
from megatron_lite.errors import fail


def find_dataset_prefixes(directory: str, exclude: str | None = None) -> list[str]:
    """Every .bin/.idx pair in `directory`, sorted by name; a file without its partner is an error."""
    if not os.path.isdir(directory):
        fail(f"{directory}: --input directory not found")
    names = sorted(os.listdir(directory))
    stems = {os.path.splitext(n)[0] for n in names if n.endswith((".bin", ".idx"))}
    skip = os.path.abspath(exclude) if exclude else None
    prefixes = []
    for stem in sorted(stems):
        prefix = os.path.join(directory, stem)
        if os.path.abspath(prefix) == skip:
            continue
        for path, other in (
            (idx_path_of(prefix), bin_path_of(prefix)),
            (bin_path_of(prefix), idx_path_of(prefix)),
        ):
            if os.path.isfile(path) and not os.path.isfile(other):
                fail(
                    f"{path}: no matching {os.path.basename(other)} next to it; each dataset is a .bin/.idx pair"
                )
        prefixes.append(prefix)
    if not prefixes:
        fail(f"{directory}: no .bin/.idx pairs to merge")
    return prefixes


def merge_datasets(prefixes: Sequence[str], output_prefix: str) -> OutputStats:
    """Concatenate datasets in the order given into `{output_prefix}.bin/.idx` (all-or-nothing)."""
    prefixes = [p[:-4] if p.endswith((".bin", ".idx")) else p for p in prefixes]
    dtype = IndexedDataset(prefixes[0]).dtype
    try:
        with IndexedDatasetBuilder(output_prefix, dtype) as builder:
            for prefix in prefixes:
                builder.add_index(prefix)
            builder.finalize()
    except OSError as err:
        fail(
            f"{err.filename or output_prefix}: cannot write the output ({err.strerror or err}); check --output-prefix"
        )
    return OutputStats(
        prefix=output_prefix,
        dtype=np.dtype(dtype).name,
        documents=builder.num_documents,
        tokens=builder.num_tokens,
    )
