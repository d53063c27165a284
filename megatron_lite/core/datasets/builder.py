"""build_train_valid_test_datasets: --data-path/--split (or per-split paths) -> GPT or blended datasets."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from megatron_lite.config.data import check_data
from megatron_lite.core.datasets.blended_dataset import BlendedDataset
from megatron_lite.core.datasets.blended_dataset import default_cache_dir as blended_cache_dir
from megatron_lite.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron_lite.core.datasets.indexed_dataset import IndexedDataset
from megatron_lite.core.datasets.utils import (
    DEFAULT_SPLIT,
    SPLIT_NAMES,
    atomic_write_text,
    describe,
    file_signature,
    parse_and_normalize_split,
    split_indices,
    split_matrix,
)
from megatron_lite.errors import fail

# Each blended component gets this much more than its share of samples, so rounding in the greedy
# blend never runs a component dry (Megatron's --mid-level-dataset-surplus default).
MID_LEVEL_DATASET_SURPLUS = 0.005

Blend = list[tuple[str, float | None]]


def parse_blend(values: Sequence[str], flag: str) -> Blend:
    """`[w1, p1, w2, p2, ...]` when the list has even length and every other item is a number, else prefixes."""
    # A YAML config may give one string; split it like the command line would.
    values = values.split() if isinstance(values, str) else [str(v) for v in values]
    if len(values) % 2 == 0 and values:
        try:
            weights = [float(v) for v in values[0::2]]
        except ValueError:
            weights = None
        if weights is not None:
            # nan and inf parse as floats, and would reach the sample counts as NaN (issue 16).
            if any(not math.isfinite(w) or w < 0 for w in weights) or not 0 < sum(weights) < math.inf:
                fail(
                    f"{flag}: weights must be finite, non-negative and not all zero, got {' '.join(values[0::2])}"
                )
            return list(zip(values[1::2], weights))
    for v in values:
        try:
            float(v)
        except ValueError:
            continue
        fail(f"{flag}: {v!r} looks like a weight; give either prefixes only or 'weight prefix' pairs")
    return [(p, None) for p in values]


def build_train_valid_test_datasets(
    cfg: Any,
    tokenizer: Any,
    num_samples: tuple[int, int, int],
    *,
    is_builder: bool = True,
    barrier: Callable[[], None] | None = None,
) -> tuple[torch.utils.data.Dataset | None, torch.utils.data.Dataset | None, torch.utils.data.Dataset | None]:
    """The train, valid and test datasets; a split of weight 0 or with 0 samples requested is None.

    In a distributed run call this on every rank with `is_builder=True` on exactly one rank (rank 0)
    and a `barrier` over all ranks: rank 0 writes the index caches, the others then read them.
    """
    check_data(cfg)
    return _Builder(cfg, tokenizer, is_builder, barrier).build(num_samples)


class _Builder:
    def __init__(
        self, cfg: Any, tokenizer: Any, is_builder: bool, barrier: Callable[[], None] | None
    ) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.is_builder = is_builder
        self.barrier = barrier
        self.opened: dict[str, IndexedDataset] = {}

    def build(self, num_samples: Sequence[int]) -> tuple[Any, Any, Any]:
        cfg = self.cfg
        per_split_paths = [getattr(cfg, f"{name}_data_path", None) for name in SPLIT_NAMES]
        if any(per_split_paths):
            if getattr(cfg, "data_path", None):
                fail(
                    "--data-path cannot be combined with --train-data-path/--valid-data-path/--test-data-path"
                )
            if getattr(cfg, "split", None) is not None:
                fail(
                    "--split applies to --data-path only; with --train/valid/test-data-path each split has its own files"
                )
            blends = [
                parse_blend(p, f"--{name}-data-path") if p else None
                for p, name in zip(per_split_paths, SPLIT_NAMES)
            ]
            results = []
            for i, blend in enumerate(blends):
                if blend is None:
                    self._check_not_required(i, num_samples[i], f"there is no --{SPLIT_NAMES[i]}-data-path")
                    results.append(None)
                    continue
                matrix: list[tuple[float, float] | None] = [None, None, None]
                matrix[i] = (0.0, 1.0)
                results.append(self._build_split(i, blend, None, matrix, num_samples[i]))
            return tuple(results)  # type: ignore[return-value]
        if not getattr(cfg, "data_path", None):
            fail("no training data: give --data-path PREFIX (a .bin/.idx pair from tools/preprocess_data.py)")
        split = getattr(cfg, "split", None) or DEFAULT_SPLIT
        matrix = split_matrix(parse_and_normalize_split(split))
        blend = parse_blend(cfg.data_path, "--data-path")
        return tuple(self._build_split(i, blend, split, matrix, num_samples[i]) for i in range(3))  # type: ignore[return-value]

    def _check_not_required(self, split: int, samples: int, why: str) -> None:
        if split == 1 and samples > 0:
            fail(
                f"evaluation is asked for (--eval-iters {getattr(self.cfg, 'eval_iters', '?')}) but {why}; "
                "give the validation split some data, or set --eval-iters 0"
            )

    def _build_split(
        self,
        split: int,
        blend: Blend,
        split_str: str | None,
        matrix: list[tuple[float, float] | None],
        samples: int,
    ) -> torch.utils.data.Dataset | None:
        name = SPLIT_NAMES[split]
        if matrix[split] is None:
            self._check_not_required(
                split, samples, f"--split {split_str!r} gives the validation split weight 0"
            )
            return None
        if samples <= 0:
            return None
        blend = [(p, w) for p, w in blend if w is None or w > 0]
        config = GPTDatasetConfig(
            random_seed=self.cfg.seed,
            sequence_length=self.cfg.seq_length,
            tokenizer_name=getattr(self.tokenizer, "name", type(self.tokenizer).__name__),
            eod=self.tokenizer.eod,
            split=split_str,
            split_matrix=[list(m) if m is not None else None for m in matrix],
            reset_position_ids=bool(getattr(self.cfg, "reset_position_ids", False)),
            reset_attention_mask=bool(getattr(self.cfg, "reset_attention_mask", False)),
            eod_mask_loss=bool(getattr(self.cfg, "eod_mask_loss", False)),
            data_cache_path=getattr(self.cfg, "data_cache_path", None),
            create_attention_mask=bool(getattr(self.cfg, "create_attention_mask_in_dataloader", True)),
        )
        parts = []
        for prefix, weight in blend:
            dataset = self._open(prefix)
            indices = split_indices(len(dataset), matrix[split])  # type: ignore[arg-type]
            if len(indices) == 0:
                how = f"--split {split_str!r}" if split_str is not None else f"--{name}-data-path"
                fail(
                    f"{how} gives the {name} split no documents: {prefix} has only {len(dataset)} documents; "
                    f"give the {name} split a larger share (e.g. --split 90,5,5), weight 0, or more documents"
                )
            parts.append((prefix, weight, dataset, indices))
        kwargs = {"is_builder": self.is_builder, "barrier": self.barrier}
        if len(parts) == 1:
            prefix, _, dataset, indices = parts[0]
            return GPTDataset(dataset, prefix, indices, samples, name, config, **kwargs)
        if all(w is not None for _, w, _, _ in parts):
            weights = [float(w) for _, w, _, _ in parts]  # type: ignore[arg-type]
        else:
            # Prefixes only: blend in proportion to each dataset's tokens in this split.
            weights = [float(d.sequence_lengths[ix].sum(dtype=np.int64)) for _, _, d, ix in parts]
        total = sum(weights)
        weights = [w / total for w in weights]
        components = [
            GPTDataset(
                dataset,
                prefix,
                indices,
                math.ceil(math.ceil(samples * w) * (1 + MID_LEVEL_DATASET_SURPLUS)),
                name,
                config,
                **kwargs,
            )
            for (prefix, _, dataset, indices), w in zip(parts, weights)
        ]
        cache_dir = getattr(self.cfg, "data_cache_path", None) or blended_cache_dir(parts[0][0])
        return BlendedDataset(components, weights, samples, name, cache_dir, **kwargs)

    def _open(self, prefix: str) -> IndexedDataset:
        if prefix not in self.opened:
            dataset = IndexedDataset(prefix, mmap_bin_files=bool(getattr(self.cfg, "mmap_bin_files", True)))
            self._check_vocab(dataset)
            self.opened[prefix] = dataset
        return self.opened[prefix]

    def _check_vocab(self, dataset: IndexedDataset) -> None:
        vocab = int(self.cfg.padded_vocab_size)
        if (
            np.dtype(dataset.dtype).kind in "iu"
            and np.iinfo(dataset.dtype).max < vocab
            and np.iinfo(dataset.dtype).min >= 0
        ):
            return  # no id this dtype can hold reaches the vocabulary size
        max_id = _cached_max_token_id(dataset, getattr(self.cfg, "data_cache_path", None), self.is_builder)
        if max_id >= vocab:
            fail(
                f"{dataset.bin_path}: token id {max_id} does not fit the model's vocabulary of {vocab}; "
                "was it preprocessed with another tokenizer? Use the same --tokenizer-type (and vocab files) as preprocessing"
            )


def _cached_max_token_id(dataset: IndexedDataset, data_cache_path: str | None, is_builder: bool) -> int:
    """The dataset's largest id, remembered next to the index caches: scanning a big .bin takes seconds."""
    cache_dir = data_cache_path or os.path.join(
        os.path.dirname(os.path.abspath(dataset.path_prefix)), "cache", "IndexedDataset_indices"
    )
    _, md5 = describe(
        {
            "dataset_path": os.path.abspath(dataset.path_prefix),
            "idx": file_signature(dataset.idx_path),
            "bin": file_signature(dataset.bin_path),
        }
    )
    path = os.path.join(cache_dir, f"{md5}-IndexedDataset-max_token_id.txt")
    try:
        with open(path, encoding="utf-8") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        pass
    max_id = dataset.max_token_id()
    if is_builder:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            atomic_write_text(path, f"{max_id}\n")
        except OSError:
            pass  # the cache is only a shortcut
    return max_id
