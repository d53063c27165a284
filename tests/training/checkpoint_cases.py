"""Shared steps of the one-process checkpoint tests: train a tiny model, save, load, compare bit for bit."""

from __future__ import annotations

import pytest
import torch
from test_checkpointing_support import (
    build,
    make_cfg,
    train_steps,
)

from megatron_lite.errors import UserError
from megatron_lite.parallel_state import ParallelState
from megatron_lite.training.checkpointing import (
    load_checkpoint,
    save_checkpoint,
)

POINTER = "latest_checkpointed_iteration.txt"
ONE = ParallelState()


def trained(steps: int = 2, **overrides):
    cfg = make_cfg(**overrides)
    model, optimizer, scheduler = build(cfg)
    train_steps(model, optimizer, scheduler, cfg, ONE, range(steps))
    return cfg, model, optimizer, scheduler


def save(path, iteration, cfg, model, optimizer, scheduler, **kwargs):
    kwargs.setdefault("consumed_train_samples", iteration * cfg.global_batch_size)
    save_checkpoint(path, iteration, model, optimizer, scheduler, cfg, None, **kwargs)


def load_error(path, cfg, model, optimizer, scheduler) -> str:
    """The one-line UserError that loading `path` raises."""
    with pytest.raises(UserError) as caught:
        load_checkpoint(path, model, optimizer, scheduler, cfg, None)
    return str(caught.value)


def fresh(**overrides):
    """A model, optimizer and schedule that differ from the trained ones (other seed, more steps)."""
    cfg = make_cfg(**overrides)
    model, optimizer, scheduler = build(cfg, seed=77)
    train_steps(model, optimizer, scheduler, cfg, ONE, range(10, 15))
    return cfg, model, optimizer, scheduler


def assert_same(actual: dict, expected: dict, rows: int | None = None) -> None:
    """Parameters, owned Adam states and the buffer equal bit for bit (first `rows` vocab rows if given)."""

    def cut(name, tensor):
        if rows is not None and name.startswith(("embedding.word", "output_layer")) and tensor.dim() > 0:
            return tensor[:rows]
        return tensor

    assert actual["params"].keys() == expected["params"].keys()
    for name, value in expected["params"].items():
        assert torch.equal(cut(name, actual["params"][name]), cut(name, value)), name
    assert actual["states"].keys() == expected["states"].keys()
    for name, state in expected["states"].items():
        assert actual["states"][name].keys() == state.keys(), name
        for key, value in state.items():
            assert torch.equal(cut(name, actual["states"][name][key]), cut(name, value)), (name, key)
    assert torch.equal(actual["buffer"], expected["buffer"])


def assert_same_draws(actual: dict, expected: dict) -> None:
    assert actual["random"] == expected["random"]
    assert actual["np"] == expected["np"]
    assert torch.equal(actual["torch"], expected["torch"])
    assert torch.equal(actual["tracker"], expected["tracker"])
