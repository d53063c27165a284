"""How one tensor is stored: the layout that places a rank's shard in the full tensor, and DCP's view of it."""

# Every TP-sharded tensor is written as a DTensor sharded over the TP mesh, so DCP reshards it into any
# other TP size when it is read. Vocabulary-padded tensors (embedding, output layer) are stored in blocks
# of --make-vocab-size-divisible-by rows covering only the true vocabulary, which makes their stored
# shape the same at every TP size.

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from megatron_lite.core.tensor_parallel import split_for_rank
from megatron_lite.parallel_state import ParallelState
from megatron_lite.training.checkpointing.keys import is_vocab_param


@dataclass(frozen=True)
class Layout:
    """Where a rank's local tensor sits in the stored (global) tensor.

    kind "replicated": stored whole. "sharded": split along partition_dim over TP; with a partition
    stride s (rank r holds chunks r, r+tp, ...), the stored tensor has that dim split into [s, rest]
    and is sharded on the second, which makes every rank's part contiguous. "vocab": rows are the
    padded vocabulary; stored as [ceil(V/block), block, ...] holding only the blocks that contain true
    rows, so the stored shape does not depend on TP padding.
    """

    kind: str
    full_shape: tuple[int, ...]
    stored_shape: tuple[int, ...]
    dtype: str
    partition_dim: int = -1
    stride: int = 1
    vocab_size: int = 0
    block: int = 0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Layout:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k in names}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def logical_shape(self) -> tuple[int, ...]:
        """The shape of the tensor the model means (vocab rows without TP padding)."""
        if self.kind == "vocab":
            return (self.vocab_size, *self.full_shape[1:])
        return self.full_shape


def layout_of(
    name: str, tensor: torch.Tensor, param: torch.Tensor, pstate: ParallelState, vocab_size: int, block: int
) -> Layout:
    """The layout of `tensor`, a parameter or a state of that parameter (same shape: same layout)."""
    local = tuple(tensor.shape)
    dtype = str(tensor.dtype).removeprefix("torch.")
    if not getattr(param, "tensor_model_parallel", False) or tensor.shape != param.shape:
        return Layout("replicated", local, local, dtype)
    dim = param.partition_dim
    stride = getattr(param, "partition_stride", 1)
    full = list(local)
    full[dim] *= pstate.tp_size
    rows = local[0]
    if dim == 0 and vocab_size and is_vocab_param(name) and full[0] >= vocab_size:
        # Blocks of `block` rows line up with every rank's shard when the padding is Megatron's.
        if not (
            block
            and rows % block == 0
            and rows == math.ceil(math.ceil(vocab_size / block) / pstate.tp_size) * block
        ):
            block = rows
        stored = (math.ceil(vocab_size / block), block, *local[1:])
        return Layout("vocab", tuple(full), stored, dtype, 0, 1, vocab_size, block)
    stored = list(full)
    if stride > 1:
        stored[dim : dim + 1] = [stride, full[dim] // stride]
    return Layout("sharded", tuple(full), tuple(stored), dtype, dim, stride)


def local_part(
    tensor: torch.Tensor, layout: Layout, pstate: ParallelState
) -> tuple[torch.Tensor, int | None]:
    """A view of `tensor` shaped as its piece of the stored tensor, and the stored dim it is sharded on."""
    if layout.kind == "replicated":
        return tensor, None
    if layout.kind == "sharded":
        if layout.stride == 1:
            return tensor, layout.partition_dim
        dim = layout.partition_dim
        shape = list(tensor.shape)
        shape[dim : dim + 1] = [layout.stride, shape[dim] // layout.stride]
        return tensor.view(shape), dim + 1
    num_blocks = layout.stored_shape[0]
    per_rank = tensor.shape[0] // layout.block
    first = pstate.tp_rank * per_rank
    mine = max(0, min(first + per_rank, num_blocks) - first)
    return tensor[: mine * layout.block].view(mine, *layout.stored_shape[1:]), 0


def to_stored(
    tensor: torch.Tensor, layout: Layout, pstate: ParallelState, *, staged: bool = False
) -> torch.Tensor:
    """The object DCP writes or fills: a DTensor sharded over the TP mesh, or a plain (whole) tensor.

    staged: a private CPU copy of this rank's part, which training may go on changing the original of
    while a background thread writes it (--async-save)."""
    part, shard_dim = local_part(tensor, layout, pstate)
    if staged:
        part = part.to("cpu", copy=True)
    if shard_dim is None or pstate.tp_size == 1:
        return part
    mesh = _cpu_tp_mesh(pstate) if staged else pstate.mesh["tp"]
    shape = torch.Size(layout.stored_shape)
    strides = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    return DTensor.from_local(part, mesh, [Shard(shard_dim)], shape=shape, stride=strides)


_CPU_MESHES: dict[int, tuple[DeviceMesh, DeviceMesh]] = {}


def _cpu_tp_mesh(pstate: ParallelState) -> DeviceMesh:
    """The TP mesh with CPU as its device, for staged copies: DTensor.from_local moves a tensor to its
    mesh's device. DCP only reads a mesh's coordinates, so this one needs no process groups of its own."""
    tp = pstate.mesh["tp"]
    if tp.device_type == "cpu":
        return tp
    cached = _CPU_MESHES.get(id(pstate.mesh))
    if cached is None or cached[0] is not pstate.mesh:
        cpu = DeviceMesh("cpu", tp.mesh, mesh_dim_names=("tp",), _init_backend=False)
        cached = _CPU_MESHES[id(pstate.mesh)] = (pstate.mesh, cpu)
    return cached[1]


def load_target(
    tensor: torch.Tensor, saved: Layout, current: Layout, pstate: ParallelState
) -> tuple[torch.Tensor, Callable[[], None] | None]:
    """Read straight into `tensor` when the stored layout matches ours; otherwise read the whole stored
    tensor (e.g. vocab blocks of another --make-vocab-size-divisible-by) and copy this rank's part."""
    if (saved.kind, saved.stored_shape, saved.stride) == (current.kind, current.stored_shape, current.stride):
        return to_stored(tensor, current, pstate), None
    whole = torch.empty(saved.stored_shape, dtype=saved.torch_dtype)

    def finish() -> None:
        full = logical_full(whole, saved)
        with torch.no_grad():
            if current.kind == "vocab":
                rows = tensor.shape[0]
                first = pstate.tp_rank * rows
                count = max(0, min(rows, current.vocab_size - first))
                tensor[:count].copy_(full[first : first + count])
            elif current.kind == "sharded":
                part = split_for_rank(
                    full, current.partition_dim, pstate.tp_rank, pstate.tp_size, current.stride
                )
                tensor.copy_(part)
            else:
                tensor.copy_(full)

    return whole, finish


def logical_full(stored: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The full tensor the model means, from the whole stored tensor (vocab rows cut to the vocabulary)."""
    if layout.kind == "vocab":
        return stored.reshape(-1, *layout.stored_shape[2:])[: layout.vocab_size]
    return stored.reshape(layout.full_shape)
