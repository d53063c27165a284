"""The RNG tracker: named streams, fork semantics, Megatron's seeds, dropout and recompute replay."""

import pytest
import torch

from megatron_lite.core.tensor_parallel import (
    MODEL_PARALLEL_RNG,
    Dropout,
    RNGStatesTracker,
    checkpoint_with_rng_tracker,
    get_rng_tracker,
    model_parallel_manual_seed,
)


def _draws(seed, n=4, skip=0):
    gen = torch.Generator().manual_seed(seed)
    torch.rand(skip, generator=gen)
    return torch.rand(n, generator=gen)


def test_fork_draws_from_the_stream_and_restores_the_default_generator():
    tracker = RNGStatesTracker()
    tracker.add("a", 11)
    torch.manual_seed(0)
    expected_default = torch.rand(4)
    torch.manual_seed(0)
    with tracker.fork("a"):
        first = torch.rand(4)
    with tracker.fork("a"):
        second = torch.rand(4)  # the stream continues where it stopped
    assert torch.equal(first, _draws(11)) and torch.equal(second, _draws(11, skip=4))
    assert torch.equal(torch.rand(4), expected_default)


def test_states_round_trip_and_duplicates_are_refused():
    tracker = RNGStatesTracker()
    tracker.add("a", 1)
    saved = tracker.get_states()
    with tracker.fork("a"):
        drawn = torch.rand(3)
    tracker.set_states(saved)
    with tracker.fork("a"):
        assert torch.equal(torch.rand(3), drawn)
    with pytest.raises(ValueError, match="seed 1 already exists"):
        tracker.add("b", 1)
    with pytest.raises(ValueError, match="'a' already exists"):
        tracker.add("a", 2)
    with pytest.raises(KeyError, match="'missing' is not in the tracker"):
        with tracker.fork("missing"):
            pass
    assert set(saved) == {"a"} and saved["a"]["cpu"].dtype == torch.uint8


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_model_parallel_seed_is_seed_plus_2718_plus_tp_rank(tp_rank):
    model_parallel_manual_seed(100, tp_rank)
    with get_rng_tracker().fork(MODEL_PARALLEL_RNG):
        assert torch.equal(torch.rand(4), _draws(100 + 2718 + tp_rank))
    assert torch.equal(torch.rand(4), _draws(100))  # the default generator: seed, same on all TP ranks


def test_dropout_uses_the_stream_only_when_asked():
    x = torch.ones(1000)
    model_parallel_manual_seed(5, 0)
    tracked = Dropout(0.5, use_model_parallel_rng=True)(x)
    after_tracked = torch.rand(2)
    model_parallel_manual_seed(5, 0)
    plain = Dropout(0.5)(x)
    assert torch.equal(after_tracked, _draws(5, 2))  # the tracked dropout left the default generator alone
    assert not torch.equal(tracked, plain)
    assert set(plain.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(Dropout(0.5).eval()(x), x) and torch.equal(Dropout(0.0)(x), x)


def test_checkpoint_replays_both_generators_so_gradients_match():
    model_parallel_manual_seed(3, 0)
    weight = torch.randn(16, 16, requires_grad=True)
    tracked, plain = Dropout(0.5, use_model_parallel_rng=True), Dropout(0.5)

    def block(x):
        return plain(tracked(x @ weight).tanh() @ weight)

    x = torch.randn(8, 16)
    grads = []
    for use_checkpoint in (False, True):
        model_parallel_manual_seed(3, 0)
        out = checkpoint_with_rng_tracker(block, x) if use_checkpoint else block(x)
        with get_rng_tracker().fork():  # move the stream on before backward, as later layers would
            torch.rand(10)
        torch.rand(10)
        out.sum().backward()
        grads.append(weight.grad.clone())
        weight.grad = None
    assert torch.equal(grads[0], grads[1])
