"""BlendedDataset: interleave datasets by weight with Megatron's greedy (largest-deficit-first) rule."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from megatron_lite.core.datasets.utils import IndexCache

logger = logging.getLogger(__name__)

INDEX_NAMES = ("dataset_index", "dataset_sample_index")


class BlendedDataset(torch.utils.data.Dataset):
    """`size` samples drawn from `datasets` so that every prefix follows `weights` as closely as possible.

    Sample k comes from the dataset with the largest deficit `w_i * max(k, 1) - count_i` (first on
    ties) and is that dataset's next unused sample.
    """

    def __init__(
        self,
        datasets: Sequence[torch.utils.data.Dataset],
        weights: Sequence[float],
        size: int,
        index_split: str,
        cache_dir: str,
        *,
        is_builder: bool = True,
        barrier: Callable[[], None] | None = None,
    ) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("BlendedDataset needs one weight per dataset and at least one dataset")
        if len(datasets) > np.iinfo(np.int16).max:
            raise ValueError("BlendedDataset supports at most 32767 datasets")
        total = float(sum(weights))
        self.datasets = list(datasets)
        self.weights = [float(w) / total for w in weights]
        self.size = int(size)
        self.index_split = index_split
        description = {
            "class": type(self).__name__,
            "datasets": [getattr(d, "unique_description_hash", type(d).__name__) for d in self.datasets],
            "weights": self.weights,
            "size": self.size,
            "index_split": index_split,
        }
        self.cache = IndexCache(cache_dir, "BlendedDataset", index_split, description)
        self.unique_description_hash = self.cache.md5
        arrays = self.cache.load_or_build(INDEX_NAMES, self._build, is_builder, barrier)
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]

    def _build(self) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        dataset_index = build_blending_indices(self.weights, self.size)
        counts = np.bincount(dataset_index, minlength=len(self.datasets))
        # Each dataset's samples are used in order: the k-th pick of dataset i is its sample k.
        order = np.argsort(dataset_index, kind="stable")
        dataset_sample_index = np.empty(self.size, dtype=np.int64)
        dataset_sample_index[order] = np.arange(self.size) - np.repeat(np.cumsum(counts) - counts, counts)
        for i, (count, dataset) in enumerate(zip(counts, self.datasets)):
            if count > len(dataset):
                raise RuntimeError(
                    f"blend needs {count} samples of dataset {i}, which has only {len(dataset)}"
                )
        logger.info(
            "built BlendedDataset %s indices in %.2f s", self.index_split, time.perf_counter() - start
        )
        return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return self.datasets[int(self.dataset_index[idx])][int(self.dataset_sample_index[idx])]


def default_cache_dir(first_path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(first_path)), "cache", "BlendedDataset_indices")


def build_blending_indices(weights: Sequence[float], size: int) -> np.ndarray:
    """The dataset of each of `size` samples under the greedy rule, as int16, exactly as a plain loop.

    A plain Python loop costs ~1 us per sample. Instead, a block of choices is guessed with stride
    scheduling (dataset i's c-th pick is due at c / w_i; exact for two datasets) and checked against
    the greedy rule in numpy; the agreeing prefix plus the first corrected choice is kept. Where the
    guess keeps failing (three or more irregular weights) a stretch is done with the plain loop.
    """
    w = np.asarray(weights, dtype=np.float64)
    k_datasets = len(w)
    out = np.empty(size, dtype=np.int16)
    counts = np.zeros(k_datasets, dtype=np.int64)
    k = 0
    block = 256
    while k < size:
        n = min(block, size - k)
        guess = _stride_guess(w, counts, n)
        agree, correct = _first_disagreement(w, counts, k, guess)
        if agree < n:
            guess = guess[: agree + 1]
            guess[agree] = correct
        out[k : k + len(guess)] = guess
        counts += np.bincount(guess, minlength=k_datasets)
        k += len(guess)
        block = min(2 * block, 1 << 16) if agree == n else max(64, 2 * agree)
        if agree < 32 and k < size:
            stop = min(k + 4096, size)
            out[k:stop] = _greedy_loop(w, counts, k, stop)
            counts += np.bincount(out[k:stop], minlength=k_datasets)
            k = stop
    return out


def _stride_guess(w: np.ndarray, counts: np.ndarray, n: int) -> np.ndarray:
    times, ids = [], []
    for i, wi in enumerate(w):
        if wi > 0:
            m = int(np.ceil(n * wi)) + 2
            times.append((counts[i] + np.arange(m)) / wi)
            ids.append(np.full(m, i, dtype=np.int64))
    due, which = np.concatenate(times), np.concatenate(ids)
    return which[np.lexsort((which, due))[:n]]


def _first_disagreement(w: np.ndarray, counts: np.ndarray, k0: int, guess: np.ndarray) -> tuple[int, int]:
    """How many leading choices of `guess` the greedy rule confirms, and the rule's choice after them."""
    n = len(guess)
    picked = np.zeros((len(w), n), dtype=np.int64)
    picked[guess, np.arange(n)] = 1
    counts_before = np.cumsum(picked, axis=1) - picked + counts[:, None]
    k = np.maximum(np.arange(k0, k0 + n), 1).astype(np.float64)
    # Same expression and evaluation order as the reference loop; argmax keeps the first maximum.
    truth = np.argmax(w[:, None] * k[None, :] - counts_before, axis=0)
    wrong = np.flatnonzero(truth != guess)
    return (int(wrong[0]), int(truth[wrong[0]])) if len(wrong) else (n, -1)


def _greedy_loop(w: np.ndarray, counts: np.ndarray, start: int, stop: int) -> list[int]:
    weights = [float(x) for x in w]
    c = [int(x) for x in counts]
    others = range(1, len(weights))
    out = []
    for k in range(start, stop):
        kd = float(max(k, 1))
        best, best_error = 0, weights[0] * kd - c[0]
        for i in others:
            error = weights[i] * kd - c[i]
            if error > best_error:
                best, best_error = i, error
        out.append(best)
        c[best] += 1
    return out


def greedy_reference(weights: Sequence[float], size: int) -> np.ndarray:
    """The greedy rule as a plain loop (for tests and as the definition)."""
    w = np.asarray(weights, dtype=np.float64)
    return np.array(_greedy_loop(w, np.zeros(len(w), dtype=np.int64), 0, size), dtype=np.int16)
