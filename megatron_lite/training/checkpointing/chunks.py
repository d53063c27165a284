"""A stored tensor of which this rank holds several pieces (per-layer slices, SwiGLU halves), and DCP planners for it."""

# Megatron's torch_dist checkpoints store each layer's tensor as one chunk of a tensor stacked along a
# leading layer axis, and SwiGLU's fc1 as two chunks per TP rank. Chunks gives DCP exactly that: a global
# shape and this rank's pieces at their offsets, each a view of a parameter (or optimizer state), so
# saving writes the parameters themselves and loading reads straight into them. DCP matches pieces by
# overlap, so pieces written at one layout are read at any other.

from __future__ import annotations

import argparse
import io
from collections.abc import Iterable
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType


class Chunks:
    """A tensor of global shape `shape` of which this rank holds `pieces`: (offsets, tensor) pairs."""

    def __init__(
        self, shape: Iterable[int], pieces: list[tuple[tuple[int, ...], torch.Tensor]] | None = None
    ):
        self.shape = torch.Size(shape)
        self.pieces: list[tuple[tuple[int, ...], torch.Tensor]] = list(pieces or [])

    def add(self, offsets: Iterable[int], tensor: torch.Tensor) -> None:
        offsets = tuple(offsets)
        if len(offsets) != len(self.shape) or tensor.dim() != len(self.shape):
            raise ValueError(
                f"piece at {offsets} of shape {list(tensor.shape)} in a {list(self.shape)} tensor"
            )
        self.pieces.append((offsets, tensor))

    def size(self) -> torch.Size:
        return self.shape

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [
            WriteItem(
                index=MetadataIndex(fqn, torch.Size(offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=tensor.shape),
                    properties=TensorProperties.create_from_tensor(tensor),
                    size=self.shape,
                ),
            )
            for offsets, tensor in self.pieces
        ]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [
            ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=tensor.shape)
            for offsets, tensor in self.pieces
        ]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        if index.index is not None and index.index < len(self.pieces):
            offsets, tensor = self.pieces[index.index]
            if torch.Size(offsets) == index.offset:
                return tensor
        for offsets, tensor in self.pieces:
            if torch.Size(offsets) == index.offset:
                return tensor
        raise ValueError(f"{index.fqn} has no piece at {list(index.offset or [])}")


class ObjectSlot:
    """A place for a stored object (a ShardedObject's value) that dcp.load fills: DCP hands Stateful
    entries their loaded value, where it would put a plain entry into a copy of the caller's dict."""

    def __init__(self) -> None:
        self.value: Any = None

    def state_dict(self) -> Any:
        return self.value

    def load_state_dict(self, value: Any) -> None:
        self.value = value


def _lookup(state_dict: dict[str, Any], index: MetadataIndex) -> Any:
    obj = state_dict.get(index.fqn)
    if isinstance(obj, Chunks):
        return obj.__get_tensor_shard__(index)
    return None


class ChunkSavePlanner(DefaultSavePlanner):
    """DCP's planner, which also writes Chunks; a piece that is a view of a larger tensor is written alone.
    Entries are not flattened: a ShardedObject's value is stored whole as one pickled object, as Megatron's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("flatten_state_dict", False)
        super().__init__(*args, **kwargs)

    def lookup_object(self, index: MetadataIndex) -> Any:
        piece = _lookup(self.state_dict, index)
        if piece is None:
            return super().lookup_object(index)
        if (
            piece.untyped_storage().nbytes() != piece.numel() * piece.element_size()
            or not piece.is_contiguous()
        ):
            # torch.save of a view writes its whole storage: copy out just the piece.
            piece = piece.contiguous().clone()
        return piece


# What a Megatron checkpoint's pickled objects (common.pt, rng_state, _extra_state) may hold besides
# tensors and plain data: its args, and the numpy RNG state.
def safe_globals() -> list[Any]:
    import numpy as np

    allowed: list[Any] = [argparse.Namespace, np.ndarray, np.dtype, np.core.multiarray._reconstruct]
    allowed += [type(np.dtype(name)) for name in ("uint32", "int64", "float64", "float32", "int32", "bool")]
    return allowed


def load_pickled(data: bytes | io.BytesIO) -> Any:
    """An object pickled by torch.save in a checkpoint, read with weights_only=True and Megatron's allow-list."""
    stream = data if isinstance(data, io.BytesIO) else io.BytesIO(data)
    with torch.serialization.safe_globals(safe_globals()):
        return torch.load(stream, map_location="cpu", weights_only=True)


class ChunkLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, which also reads into Chunks; stored objects are unpickled weights_only.
    Nothing is flattened: DCP's flattening would drop the Chunks entries it does not know."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("flatten_state_dict", False)
        kwargs.setdefault("flatten_sharded_tensors", False)
        super().__init__(*args, **kwargs)

    def set_up_planner(
        self, state_dict: dict[str, Any], metadata: Any = None, is_coordinator: bool = False
    ) -> None:
        # DCP's set-up replaces, in place, every entry of a type it does not know with None.
        kept = {key: value for key, value in state_dict.items() if isinstance(value, Chunks)}
        super().set_up_planner(state_dict, metadata, is_coordinator)
        state_dict.update(kept)
        self.state_dict.update(kept)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        piece = _lookup(self.state_dict, index)
        return super().lookup_tensor(index) if piece is None else piece

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        # set_up_planner may have replaced the caller's dict with a flattened copy: fill both.
        obj = load_pickled(value)
        self.state_dict[read_item.dest_index.fqn] = obj
        self.original_state_dict[read_item.dest_index.fqn] = obj
