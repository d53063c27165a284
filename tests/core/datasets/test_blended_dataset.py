"""BlendedDataset: the greedy assignment (fast path equals the plain loop), weights, caching."""

import time

import numpy as np
import pytest

from megatron_lite.core.datasets.blended_dataset import (
    BlendedDataset,
    build_blending_indices,
    greedy_reference,
)


@pytest.mark.parametrize(
    "weights",
    [
        [1.0],
        [0.5, 0.5],
        [0.3, 0.7],
        [1 / 3, 1 / 3, 1 / 3],
        [0.25, 0.25, 0.5],
        [0.1, 0.2, 0.3, 0.4],
        [0.0, 1.0],
        [0.001, 0.999],
        list(np.random.default_rng(0).dirichlet(np.ones(2))),
        list(np.random.default_rng(1).dirichlet(np.ones(3))),
        list(np.random.default_rng(2).dirichlet(np.ones(7))),
    ],
)
def test_fast_assignment_equals_the_greedy_loop(weights):
    size = 20_000
    ours = build_blending_indices(weights, size)
    assert ours.dtype == np.int16
    np.testing.assert_array_equal(ours, greedy_reference(weights, size))


def test_greedy_first_choices():
    # k=0 and k=1 both use max(k, 1) = 1; ties go to the first dataset.
    assert greedy_reference([0.5, 0.5], 6).tolist() == [0, 1, 0, 1, 0, 1]
    assert greedy_reference([0.25, 0.75], 8).tolist() == [1, 0, 1, 1, 0, 1, 1, 1]


def test_every_prefix_follows_the_weights():
    weights = [0.2, 0.5, 0.3]
    index = build_blending_indices(weights, 100_000)
    counts = np.cumsum(np.eye(3, dtype=np.int64)[index], axis=0)
    k = np.arange(1, 100_001)[:, None]
    assert np.abs(counts - k * np.array(weights)).max() <= 1.5


def test_two_datasets_million_samples_fast():
    start = time.perf_counter()
    index = build_blending_indices([0.37, 0.63], 1_000_000)
    assert time.perf_counter() - start < 2.0
    assert abs(np.mean(index == 0) - 0.37) < 1e-5


class Numbers:
    """A stand-in dataset whose sample j is (tag, j)."""

    def __init__(self, tag, n):
        self.tag, self.n = tag, n
        self.unique_description_hash = f"numbers-{tag}-{n}"

    def __len__(self):
        return self.n

    def __getitem__(self, j):
        assert 0 <= j < self.n
        return (self.tag, j)


def test_blended_dataset_samples_and_cache(tmp_path):
    parts = [Numbers("a", 400), Numbers("b", 700)]
    blend = BlendedDataset(parts, [3.0, 7.0], 1000, "train", str(tmp_path))
    assert blend.cache.built and len(blend) == 1000
    samples = [blend[i] for i in range(1000)]
    a = [j for tag, j in samples if tag == "a"]
    b = [j for tag, j in samples if tag == "b"]
    assert a == list(range(300)) and b == list(range(700))  # each dataset's samples in order, no repeats
    again = BlendedDataset(parts, [0.3, 0.7], 1000, "train", str(tmp_path))
    assert not again.cache.built
    np.testing.assert_array_equal(again.dataset_sample_index, blend.dataset_sample_index)
    other = BlendedDataset(parts, [0.4, 0.6], 1000, "train", str(tmp_path))
    assert other.cache.built
    with pytest.raises(RuntimeError, match="needs 500 samples of dataset 0"):
        BlendedDataset(parts, [0.5, 0.5], 1000, "valid", str(tmp_path))
