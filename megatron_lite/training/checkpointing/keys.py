"""Which tensors a checkpoint holds and the key each is stored under: the one place on-disk naming lives."""

# The previous layout's keys: "model.<parameter or buffer name>" for the model,
# "optimizer.state.<parameter name>.<state>" for the optimizer, still read by load. Saves use Megatron's
# keys (megatron_keys); named_model_tensors and is_vocab_param serve both.

from __future__ import annotations

from collections.abc import Iterator

import torch

MODEL_PREFIX = "model."
OPTIMIZER_STATE_PREFIX = "optimizer.state."
# Megatron's names of the parameters whose rows are the (TP-padded) vocabulary.
VOCAB_PARAM_SUFFIXES = ("word_embeddings.weight", "output_layer.weight", "output_layer.bias")


def model_key(name: str) -> str:
    """The stored key of the model tensor `name` (a parameter or persistent buffer)."""
    return MODEL_PREFIX + name


def is_model_key(key: str) -> bool:
    return key.startswith(MODEL_PREFIX)


def model_name(key: str) -> str:
    """The model tensor name a model key stands for."""
    return key[len(MODEL_PREFIX) :]


def optimizer_state_key(param_name: str, state: str) -> str:
    """The stored key of optimizer state `state` (e.g. exp_avg) of parameter `param_name`."""
    return f"{OPTIMIZER_STATE_PREFIX}{param_name}.{state}"


def is_optimizer_state_key(key: str) -> bool:
    return key.startswith(OPTIMIZER_STATE_PREFIX)


def is_vocab_param(name: str) -> bool:
    """Whether the rows of parameter `name` (or of its optimizer states) are the padded vocabulary."""
    return name.endswith(VOCAB_PARAM_SUFFIXES)


def named_model_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, tensor, parameter whose layout it has): parameters once each (a tied weight under its
    first name), then persistent buffers."""
    seen = set()
    for name, param in module.named_parameters():
        seen.add(id(param))
        yield name, param, param
    for name, value in module.state_dict(keep_vars=True).items():
        if torch.is_tensor(value) and id(value) not in seen:
            seen.add(id(value))
            yield name, value, value
