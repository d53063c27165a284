"""Readers of a checkpoint's index files: the latest-iteration tracker, metadata.json and DCP's .metadata."""

# DCP's own FileSystemReader unpickles .metadata with pickle.load, which runs whatever a hostile file
# names, and then opens each relative_path the file lists, `../../x` included. Ours unpickles with an
# allow-list of DCP's metadata classes and accepts only plain file names of the checkpoint directory.

from __future__ import annotations

import enum
import io
import os
import pathlib
import pickle
import re
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint import FileSystemReader

from megatron_lite.errors import fail
from megatron_lite.readers.files import file_inside, read_bytes, read_json, read_text

# Iterations are int64 counters everywhere they are stored.
_ITERATION = re.compile(r"[0-9]{1,18}")
_TRACKER_LIMIT = 64
_DAMAGED_FIX = "the checkpoint is damaged: restore it from a copy or load another iteration"


def read_tracker(path: str | os.PathLike) -> int | None:
    """The iteration latest_checkpointed_iteration.txt names (0 for `release`), None when it is missing."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    fix = "fix it or delete it"
    text = read_text(path, fix, limit=_TRACKER_LIMIT).strip()
    if text == "release":
        return 0
    if not _ITERATION.fullmatch(text):
        fail(f"{path} holds {text!r}, not an iteration number; {fix}")
    return int(text)


def read_backend_metadata(ckpt: str | os.PathLike) -> dict[str, Any] | None:
    """metadata.json of a torch_dist checkpoint (None for checkpoints without one); refuses other backends."""
    path = Path(ckpt) / "metadata.json"
    if not path.exists():
        return None
    metadata = read_json(path, _DAMAGED_FIX)
    backend = metadata.get("sharded_backend")
    if backend != "torch_dist":
        fail(
            f"{path}: sharded_backend is {backend!r}; megatron-lite reads torch_dist checkpoints only "
            "(convert others with Megatron-LM's --ckpt-convert-format torch_dist)"
        )
    return metadata


def _allowed_globals() -> dict[tuple[str, str], Any]:
    import torch
    import torch.distributed.checkpoint.filesystem as dcp_filesystem
    import torch.distributed.checkpoint.metadata as dcp_metadata
    import torch.distributed.checkpoint.planner as dcp_planner

    allowed: dict[tuple[str, str], Any] = {}
    # Megatron-LM's planner keeps the save plans (planner.SavePlan, WriteItem) in .metadata too.
    for module in (dcp_metadata, dcp_filesystem, dcp_planner):
        for name, value in vars(module).items():
            # Only the data classes and enums the module defines: their constructors run no code of the file's.
            if (
                isinstance(value, type)
                and value.__module__ == module.__name__
                and (hasattr(value, "__dataclass_fields__") or issubclass(value, enum.Enum))
            ):
                allowed[(module.__name__, name)] = value
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.memory_format, torch.layout)):
            allowed[("torch", name)] = value
    for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"):
        allowed[("pathlib", name)] = getattr(pathlib, name)
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    allowed[("builtins", "set")] = set
    allowed[("builtins", "frozenset")] = frozenset
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    allowed: dict[tuple[str, str], Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"it refers to {module + '.' + name!r}, which DCP metadata never holds"
            ) from None


def read_dcp_metadata(ckpt: str | os.PathLike) -> Any:
    """DCP's .metadata of checkpoint `ckpt`, unpickled with the allow-list, every storage file checked to be
    a file of `ckpt`."""
    from torch.distributed.checkpoint.metadata import Metadata

    ckpt = Path(ckpt)
    path = ckpt / ".metadata"
    if not path.exists():
        fail(f"checkpoint {ckpt} has no .metadata: it is not a torch_dist checkpoint, or it is incomplete")
    data = read_bytes(path, _DAMAGED_FIX)
    if not _MetadataUnpickler.allowed:
        _MetadataUnpickler.allowed = _allowed_globals()
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as err:  # noqa: BLE001 - unpickling damage surfaces as many error types
        detail = f": {err}" if isinstance(err, pickle.UnpicklingError) and "refers to" in str(err) else ""
        fail(f"cannot read {path} ({type(err).__name__}{detail}); {_DAMAGED_FIX}")
    try:
        problem = _metadata_problem(metadata, Metadata)
    except (AttributeError, TypeError, ValueError) as err:
        # An object unpickled without the attributes its class has (a damaged BUILD): not metadata.
        problem = f"is not DCP metadata ({type(err).__name__})"
    if problem is not None:
        fail(f"{path}: {problem}; {_DAMAGED_FIX}")
    for info in (metadata.storage_data or {}).values():
        file_inside(ckpt, info.relative_path, path)
    return metadata


def _metadata_problem(metadata: Any, metadata_type: type) -> str | None:
    """What makes an unpickled .metadata unusable, or None; checked here so that DCP never meets it."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        MetadataIndex,
        TensorStorageMetadata,
    )

    if not isinstance(metadata, metadata_type) or not isinstance(metadata.state_dict_metadata, dict):
        return f"holds a {type(metadata).__name__}, not DCP metadata"
    for key, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, BytesStorageMetadata):
            continue
        if not isinstance(entry, TensorStorageMetadata) or not isinstance(entry.size, torch.Size):
            return f"entry {key!r} is a {type(entry).__name__}, not a tensor's or an object's description"
        if not isinstance(entry.properties.dtype, torch.dtype) or not isinstance(entry.chunks, list):
            return f"entry {key!r} has no dtype or chunk list"
        for chunk in entry.chunks:
            if (
                not isinstance(chunk, ChunkStorageMetadata)
                or len(chunk.offsets) != len(entry.size)
                or len(chunk.sizes) != len(entry.size)
                or any(
                    type(o) is not int or type(s) is not int or o < 0 or s < 0 or o + s > n
                    for o, s, n in zip(chunk.offsets, chunk.sizes, entry.size)
                )
            ):
                return f"entry {key!r} has a chunk outside its shape {list(entry.size)}"
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        return "has no storage index"
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            return "its storage index holds something else than DCP storage entries"
        if type(info.offset) is not int or type(info.length) is not int or info.offset < 0 or info.length < 0:
            return f"the storage entry of {index.fqn!r} has a negative or non-integer offset or length"
    return None


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with read_metadata replaced by read_dcp_metadata (allow-listed, names checked)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        metadata = read_dcp_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
