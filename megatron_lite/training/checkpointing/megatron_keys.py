"""Megatron-LM's torch_dist layout of a GPT: each parameter's stored key, its place on the layer axis, its pieces."""

# megatron-core's GPTModel.sharded_state_dict() names tensors without a `model.` prefix, stacks each
# layer's tensor along a leading axis of global layer indices (which lets Megatron reshard across
# pipeline sizes: a stage writes its layers at their global index), stores the norms under Transformer
# Engine's names even for the local spec, and writes every TP-sharded tensor as this rank's pieces of
# the full tensor (SwiGLU's fc1 as two pieces: its gate and up halves). Expert axes go in front of the
# per-expert dims in the same way when experts land.

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from megatron_lite.parallel_state import ParallelState
from megatron_lite.training.checkpointing.chunks import Chunks

LAYERS = "decoder.layers."
# Our (megatron-core local spec) module names -> the names Megatron's checkpoints store them under.
TE_NORM_NAMES = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}
# Multi-latent attention's, as megatron-core's Transformer Engine MLA spec stores them (the layout of
# Megatron-LM's DeepSeek checkpoints): input_layernorm stays a norm of its own (the two down projections
# share its output), the latent norms fuse into the up projections. Its local spec keeps all the local names.
MLA_TE_NORM_NAMES = {
    "self_attention.q_layernorm.": "self_attention.linear_q_up_proj.layer_norm_",
    "self_attention.kv_layernorm.": "self_attention.linear_kv_up_proj.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}
# A layer (and so a model) with this parameter is an MLA one.
MLA_MARKER = "self_attention.linear_kv_down_proj.weight"
# The layer modules whose `_extra_state` megatron-core saves as ShardedObjects (None for the local spec,
# FP8 metadata for Transformer Engine's): our checkpoints write them so Megatron's strict load finds them.
EXTRA_STATE_MODULES = (
    "self_attention.linear_proj",
    "self_attention.linear_qkv",
    "self_attention.linear_q_proj",
    "self_attention.linear_q_down_proj",
    "self_attention.linear_q_up_proj",
    "self_attention.linear_kv_down_proj",
    "self_attention.linear_kv_up_proj",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)
OPTIMIZER_STATE = "optimizer.state."
_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Place:
    """Where one of our tensors is stored: Megatron's key, and its global layer index (None: no layer axis)."""

    key: str
    layer: int | None


def is_mla(names) -> bool:
    """Whether parameter names (ours, or stored keys) are those of a multi-latent attention model."""
    return any(name.endswith(MLA_MARKER) for name in names)


def place_of(name: str, layer_offset: int = 0, mla: bool = False) -> Place:
    """The stored key of our parameter `name`; layer_offset is this pipeline stage's first global layer;
    mla: the model's attention is multi-latent (its norms are stored under other names)."""
    match = _LAYER_NAME.match(name)
    if match is None:
        return Place(name, None)
    rest = match.group(2)
    for ours, theirs in (MLA_TE_NORM_NAMES if mla else TE_NORM_NAMES).items():
        if rest.startswith(ours):
            rest = theirs + rest[len(ours) :]
            break
    return Place(LAYERS + rest, int(match.group(1)) + layer_offset)


def name_of(key: str, layer: int | None, mla: bool = False) -> str:
    """Inverse of place_of: our parameter name of stored key `key` at `layer`."""
    if layer is None:
        return key
    rest = key[len(LAYERS) :]
    for ours, theirs in (MLA_TE_NORM_NAMES if mla else TE_NORM_NAMES).items():
        if rest.startswith(theirs):
            rest = ours + rest[len(theirs) :]
            break
    return f"{LAYERS}{layer}.{rest}"


def optimizer_key(state: str, key: str) -> str:
    """Megatron's key of optimizer state `state` (exp_avg, exp_avg_sq) of the tensor stored under `key`."""
    return f"{OPTIMIZER_STATE}{state}.{key}"


def extra_state_key(module: str, layer: int, num_layers: int) -> str:
    """The DCP key of a layer module's `_extra_state` ShardedObject (offset and grid on the layer axis)."""
    return f"{LAYERS}{module}._extra_state/shard_{layer}_{num_layers}"


def rng_state_key(pstate: ParallelState) -> str:
    """The DCP key of this rank's rng_state ShardedObject: one per (PP, TP) place."""
    return f"rng_state/shard_{pstate.pp_rank}.{pstate.tp_rank}_{pstate.pp_size}.{pstate.tp_size}"


def global_shape(
    tensor: torch.Tensor, param: torch.Tensor, pstate: ParallelState, place: Place, num_layers: int
):
    """The stored shape of `tensor` (a parameter or a state shaped like it): full over TP, with the layer axis."""
    shape = list(tensor.shape)
    if _is_tp_sharded(tensor, param):
        shape[param.partition_dim] *= pstate.tp_size
    return tuple(([num_layers] if place.layer is not None else []) + shape)


def add_pieces(
    chunks: Chunks, tensor: torch.Tensor, param: torch.Tensor, pstate: ParallelState, place: Place
) -> None:
    """Add this rank's pieces of `tensor` to the stored tensor `chunks`: views, so reads land in `tensor`."""
    lead = (place.layer,) if place.layer is not None else ()

    def put(offsets: list[int], piece: torch.Tensor) -> None:
        chunks.add(lead + tuple(offsets), piece.unsqueeze(0) if lead else piece)

    if not _is_tp_sharded(tensor, param):
        put([0] * tensor.dim(), tensor)
        return
    dim = param.partition_dim
    stride = getattr(param, "partition_stride", 1)
    size = tensor.shape[dim] // stride
    for k in range(stride):
        offsets = [0] * tensor.dim()
        # Rank r holds the full tensor's chunks r, r + tp, ... (split_for_rank's order).
        offsets[dim] = (k * pstate.tp_size + pstate.tp_rank) * size
        put(offsets, tensor.narrow(dim, k * size, size))


def _is_tp_sharded(tensor: torch.Tensor, param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False)) and tensor.shape == param.shape
