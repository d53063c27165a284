"""The model and optimizer in Megatron's torch_dist layout: what each rank writes, and DCP targets to read into."""

# Every stored tensor is a Chunks of views into our parameters (or optimizer states): saving copies
# nothing, and reading lands in place. A stored tensor whose global shape differs from ours only in its
# vocabulary rows (padded for another TP size or --make-vocab-size-divisible-by) is read whole and
# its rows copied. Adam's moments are `optimizer.state.{exp_avg,exp_avg_sq}.<key>`, shaped and placed
# like their parameter; its step count lives in the param groups in common.pt, as in Megatron.

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from megatron_lite.errors import fail
from megatron_lite.parallel_state import ParallelState
from megatron_lite.training.checkpointing.chunks import Chunks
from megatron_lite.training.checkpointing.keys import is_vocab_param, named_model_tensors
from megatron_lite.training.checkpointing.megatron_keys import (
    EXTRA_STATE_MODULES,
    LAYERS,
    OPTIMIZER_STATE,
    Place,
    add_pieces,
    extra_state_key,
    global_shape,
    is_mla,
    name_of,
    optimizer_key,
    place_of,
)
from megatron_lite.training.checkpointing.state_dict import local_optimizer

Finisher = Callable[[], None]


def global_layer_numbers(module: torch.nn.Module) -> dict[int, int]:
    """Our local layer index -> its global layer number (a pipeline stage holds some layers of the model)."""
    layers = getattr(getattr(module, "decoder", None), "layers", None) or []
    return {i: int(getattr(layer, "layer_number", i)) for i, layer in enumerate(layers)}


def _place(name: str, numbers: dict[int, int], mla: bool = False) -> Place:
    place = place_of(name, mla=mla)
    if place.layer is None:
        return place
    return Place(place.key, numbers.get(place.layer, place.layer))


def _stacked(
    items: list[tuple[str, torch.Tensor, torch.Tensor]],
    pstate: ParallelState,
    num_layers: int,
    numbers: dict[int, int],
) -> tuple[dict[str, Chunks], dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]]]:
    """Chunks keyed by stored key from (our name, tensor, its parameter) triples, and which triples each holds."""
    stored: dict[str, Chunks] = {}
    members: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
    mla = is_mla(name for name, _, _ in items)
    for name, tensor, param in items:
        place = _place(name, numbers, mla)
        chunks = stored.get(place.key)
        if chunks is None:
            chunks = stored[place.key] = Chunks(global_shape(tensor, param, pstate, place, num_layers))
        add_pieces(chunks, tensor, param, pstate, place)
        members.setdefault(place.key, []).append((name, tensor, param))
    return stored, members


def model_save_dict(
    module: torch.nn.Module, num_layers: int, pstate: ParallelState, *, staged: bool = False
) -> dict[str, Any]:
    """This rank's model tensors under Megatron's keys, plus the layers' `_extra_state` objects."""
    numbers = global_layer_numbers(module)
    items = []
    for name, tensor, param in named_model_tensors(module):
        tensor = tensor.detach()
        items.append((name, tensor.to("cpu", copy=True) if staged else tensor, param))
    state: dict[str, Any] = dict(_stacked(items, pstate, num_layers, numbers)[0])
    names = {name for name, _, _ in items}
    for local, number in numbers.items():
        for submodule in EXTRA_STATE_MODULES:
            if f"{LAYERS}{local}.{submodule}.weight" in names:
                state[extra_state_key(submodule, number, num_layers)] = [None]
    return state


def _optimizer_items(
    optimizer: torch.optim.Optimizer, module: torch.nn.Module
) -> tuple[list[tuple[str, str, torch.Tensor, torch.Tensor]], float | None]:
    """(state name, parameter name, state tensor, parameter) for every moment this rank holds, and the step."""
    names = {id(p): n for n, p in module.named_parameters()}
    local = local_optimizer(optimizer)
    items, step = [], None
    for group in local.param_groups:
        for param in group["params"]:
            for state_name, value in local.state.get(param, {}).items():
                if state_name == "step":
                    step = float(value)
                elif torch.is_tensor(value) and value.shape == param.shape:
                    items.append((state_name, names[id(param)], value.detach(), param))
                else:
                    fail(f"cannot checkpoint optimizer state {state_name!r} of {names[id(param)]}")
    return items, step


def optimizer_save_dict(
    optimizer: torch.optim.Optimizer,
    module: torch.nn.Module,
    num_layers: int,
    pstate: ParallelState,
    *,
    staged: bool = False,
) -> tuple[dict[str, Any], float | None, list[dict[str, Any]]]:
    """This rank's optimizer moments under Megatron's keys, Adam's step, and the param groups to record."""
    numbers = global_layer_numbers(module)
    items, step = _optimizer_items(optimizer, module)
    state: dict[str, Any] = {}
    for state_name in sorted({s for s, _, _, _ in items}):
        triples = [
            (name, value.to("cpu", copy=True) if staged else value, param)
            for s, name, value, param in items
            if s == state_name
        ]
        stored, _ = _stacked(triples, pstate, num_layers, numbers)
        state.update({optimizer_key(state_name, key): chunks for key, chunks in stored.items()})
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    return state, step, groups


def _read_into(
    stored: dict[str, Chunks],
    members: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]],
    metadata: Metadata,
    pstate: ParallelState,
    problems: list[str],
) -> tuple[dict[str, Any], list[Finisher]]:
    """DCP targets for `stored`: the Chunks themselves where the stored shape is ours, else a whole buffer
    (vocabulary rows padded differently) and a finisher that copies this rank's rows."""
    targets: dict[str, Any] = {}
    finishers: list[Finisher] = []
    for key, chunks in stored.items():
        saved = metadata.state_dict_metadata.get(key)
        if not isinstance(saved, TensorStorageMetadata):
            problems.append(f"it has no tensor {key}")
            continue
        if tuple(saved.size) == tuple(chunks.shape):
            targets[key] = chunks
            continue
        name, tensor, param = members[key][0]
        if is_vocab_param(name) and tuple(saved.size[1:]) == tuple(chunks.shape[1:]):
            whole = torch.empty(tuple(saved.size), dtype=saved.properties.dtype)
            targets[key] = whole
            finishers.append(_vocab_rows(whole, tensor, pstate))
            continue
        problems.append(f"{key} is {list(saved.size)} in it, {list(chunks.shape)} in the model")
    return targets, finishers


def _vocab_rows(whole: torch.Tensor, tensor: torch.Tensor, pstate: ParallelState) -> Finisher:
    def finish() -> None:
        rows = tensor.shape[0]
        first = pstate.tp_rank * rows
        count = max(0, min(rows, whole.shape[0] - first))
        with torch.no_grad():
            tensor[:count].copy_(whole[first : first + count])

    return finish


def model_load_targets(
    module: torch.nn.Module, num_layers: int, metadata: Metadata, pstate: ParallelState, where: str
) -> tuple[dict[str, Any], list[Finisher]]:
    """DCP targets that read a Megatron-layout checkpoint into the model's own parameters."""
    numbers = global_layer_numbers(module)
    items = [(n, t.detach(), p) for n, t, p in named_model_tensors(module)]
    stored, members = _stacked(items, pstate, num_layers, numbers)
    problems: list[str] = []
    targets, finishers = _read_into(stored, members, metadata, pstate, problems)
    extra = sorted(
        key
        for key, value in metadata.state_dict_metadata.items()
        if isinstance(value, TensorStorageMetadata)
        and not key.startswith(OPTIMIZER_STATE)
        and key not in stored
        # routed experts (by global index) that other expert-parallel ranks hold
        and not (".experts.local_experts." in key and any(".experts.local_experts." in k for k in stored))
    )
    if pstate.pp_size == 1:  # a pipeline stage holds only some of the model's tensors
        problems += [f"the model has no tensor {key}" for key in extra]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        fail(f"checkpoint {where} does not fit this model: {'; '.join(problems[:3])}{more}")
    return targets, finishers


def optimizer_load_targets(
    optimizer: torch.optim.Optimizer,
    module: torch.nn.Module,
    num_layers: int,
    metadata: Metadata,
    pstate: ParallelState,
) -> tuple[dict[str, Any], list[Finisher], dict[torch.nn.Parameter, dict[str, torch.Tensor]], list[str]]:
    """Fresh moment tensors for every parameter this rank's optimizer owns, their DCP targets, and the
    stored optimizer states this model has no place for."""
    numbers = global_layer_numbers(module)
    names = {id(p): n for n, p in module.named_parameters()}
    state_names = sorted(
        {
            key[len(OPTIMIZER_STATE) :].split(".", 1)[0]
            for key in metadata.state_dict_metadata
            if key.startswith(OPTIMIZER_STATE)
        }
    )
    local = local_optimizer(optimizer)
    owned = [p for group in local.param_groups for p in group["params"]]
    new_states: dict[torch.nn.Parameter, dict[str, torch.Tensor]] = {p: {} for p in owned}
    targets: dict[str, Any] = {}
    finishers: list[Finisher] = []
    problems: list[str] = []
    mla = is_mla(names.values())
    for state_name in state_names:
        triples = []
        for param in owned:
            key = optimizer_key(state_name, _place(names[id(param)], numbers, mla).key)
            saved = metadata.state_dict_metadata.get(key)
            dtype = saved.properties.dtype if isinstance(saved, TensorStorageMetadata) else param.dtype
            buffer = torch.zeros_like(param, dtype=dtype)
            new_states[param][state_name] = buffer
            triples.append((names[id(param)], buffer, param))
        stored, members = _stacked(triples, pstate, num_layers, numbers)
        prefixed = {optimizer_key(state_name, k): v for k, v in stored.items()}
        grouped = {optimizer_key(state_name, k): v for k, v in members.items()}
        more_targets, more_finishers = _read_into(prefixed, grouped, metadata, pstate, problems)
        targets.update(more_targets)
        finishers += more_finishers
    return targets, finishers, new_states, problems


def install_optimizer_state(
    optimizer: torch.optim.Optimizer,
    new_states: dict[torch.nn.Parameter, dict[str, torch.Tensor]],
    groups: list[dict[str, Any]] | None,
    step: float | None,
) -> None:
    """Put the read moments (and Adam's step) into the optimizer, and the saved learning rates."""
    local = local_optimizer(optimizer)
    for param, state in new_states.items():
        if not state:
            local.state.pop(param, None)
            continue
        group = next(g for g in local.param_groups if any(p is param for p in g["params"]))
        on_device = bool(group.get("fused") or group.get("capturable"))
        full = dict(state)
        if step is not None and "exp_avg" in state:
            full["step"] = torch.tensor(
                step, dtype=torch.float32, device=param.device if on_device else "cpu"
            )
        local.state[param] = full
    if groups is not None and len(groups) == len(optimizer.param_groups):
        for group, saved in zip(optimizer.param_groups, groups):
            if "lr" in saved:
                group["lr"] = saved["lr"]


def full_model_tensors(metadata: Metadata, read: Callable[[dict[str, Any]], None]) -> dict[str, torch.Tensor]:
    """Every stored model tensor as our full, unsharded parameters (the layer axis split back into layers)."""
    buffers = {
        key: torch.empty(tuple(value.size), dtype=value.properties.dtype)
        for key, value in metadata.state_dict_metadata.items()
        if isinstance(value, TensorStorageMetadata) and not key.startswith(OPTIMIZER_STATE)
    }
    read(buffers)
    full: dict[str, torch.Tensor] = {}
    mla = is_mla(buffers)
    for key, tensor in buffers.items():
        if key.startswith(LAYERS):
            # Only the layers that hold the tensor wrote it (a dense layer has no router): the others' rows
            # of the layer axis were never written.
            chunks = metadata.state_dict_metadata[key].chunks
            written = {c.offsets[0] + i for c in chunks for i in range(c.sizes[0])}
            for layer in sorted(written):
                full[name_of(key, layer, mla)] = tensor[layer]
        else:
            full[key] = tensor
    return full
