"""Rank 0's files of a checkpoint (common.pt, metadata.json, the manifest) and reading common.pt of either layout."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from megatron_lite.config import MegatronConfig
from megatron_lite.errors import fail
from megatron_lite.parallel_state import ParallelState
from megatron_lite.readers import load_torch_file
from megatron_lite.readers.checkpoint import read_backend_metadata
from megatron_lite.training.checkpointing.chunks import safe_globals
from megatron_lite.training.checkpointing.megatron_common import config_of, is_megatron_layout
from megatron_lite.training.checkpointing.names import (
    COMMON_FILENAME,
    DCP_METADATA_FILENAME,
    METADATA_FILENAME,
    resolve_checkpoint,
)
from megatron_lite.training.checkpointing.publish import save_synced
from megatron_lite.training.checkpointing.verify import file_checksum, write_manifest

CHECKPOINT_VERSION = 3.0
# What Megatron writes into a torch_dist checkpoint's metadata.json.
BACKEND_METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}


def build_previous_common(
    iteration: int,
    consumed_train_samples: int,
    cfg: MegatronConfig,
    scheduler: Any,
    optimizer_groups: list[dict[str, Any]] | None,
    pstate: ParallelState,
    layouts: dict[str, dict[str, Any]],
    extra_state: dict[str, Any] | None,
) -> dict[str, Any]:
    """common.pt of this project's previous layout ("model."-prefixed keys, layouts under "tensors"), which
    load_checkpoint still reads; saves now write Megatron's (megatron_common.build_common). Kept so the
    tests can write checkpoints of the previous layout."""
    return copy.deepcopy(
        {
            "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": iteration,
            "consumed_train_samples": int(consumed_train_samples),
            "args": cfg.to_dict(),
            "opt_param_scheduler": scheduler.state_dict() if scheduler is not None else None,
            "optimizer": optimizer_groups,
            "rng_saved": not cfg.no_save_rng,
            "layout": {
                "world_size": pstate.world_size,
                "tensor_model_parallel_size": pstate.tp_size,
                "data_parallel_size": pstate.dp_size,
            },
            "tensors": layouts,
            "extra_state": dict(extra_state or {}),
        }
    )


def write_common_files(tmp: Path, common: dict[str, Any], checksums: dict[str, dict[str, int]]) -> None:
    """Rank 0's files, the checksum manifest last: a directory with a manifest has all its files."""
    save_synced(common, tmp / COMMON_FILENAME)
    with open(tmp / METADATA_FILENAME, "w") as handle:
        json.dump(BACKEND_METADATA, handle)
        handle.flush()
        os.fsync(handle.fileno())
    checksums = dict(checksums)
    for name in (DCP_METADATA_FILENAME, COMMON_FILENAME, METADATA_FILENAME):
        checksums[name] = file_checksum(tmp / name)
    write_manifest(tmp, checksums)


def read_common(ckpt: Path) -> dict[str, Any]:
    """common.pt: Megatron's layout (ours, or Megatron-LM's own) or this project's earlier one."""
    path = ckpt / COMMON_FILENAME
    if not path.exists():
        legacy = ckpt / "mp_rank_00" / "model_optim_rng.pt"
        if legacy.exists() or (ckpt / "mp_rank_00").exists():
            fail(
                f"{ckpt} is a legacy --ckpt-format torch checkpoint ({legacy.relative_to(ckpt.parent)}); "
                "megatron-lite reads torch_dist only: convert it with Megatron-LM, loading it with "
                "--ckpt-format torch --ckpt-convert-format torch_dist --ckpt-convert-save DIR"
            )
        fail(f"{ckpt} is not a torch_dist checkpoint: {COMMON_FILENAME} is missing")
    read_backend_metadata(ckpt)
    common = load_torch_file(
        path,
        "a checkpoint's common state",
        "it was not written by megatron-lite or is damaged: restore it from a copy or load another iteration",
        safe_globals(),
    )
    if not isinstance(common, dict):
        fail(f"{path} holds a {type(common).__name__}, not a checkpoint's common state")
    version = common.get("checkpoint_version")
    if is_megatron_layout(common):
        if version != CHECKPOINT_VERSION:
            fail(
                f"{path} has checkpoint_version {version}; megatron-lite reads Megatron's {CHECKPOINT_VERSION}"
            )
        return common
    if version != CHECKPOINT_VERSION or "tensors" not in common:
        missing = (
            "" if version != CHECKPOINT_VERSION else " but no tensor layouts (not a megatron-lite checkpoint)"
        )
        fail(f"{path} has checkpoint_version {version}, expected {CHECKPOINT_VERSION}{missing}")
    return common


def saved_config(common: dict[str, Any], ckpt: Path) -> MegatronConfig:
    """The config of a checkpoint of either layout."""
    if is_megatron_layout(common):
        return config_of(common, ckpt)
    return MegatronConfig.from_dict(common["args"])


def load_saved_config(ckpt_dir: str | os.PathLike, iteration: int | None = None) -> MegatronConfig:
    """The config a checkpoint was saved with (latest one unless `iteration` is given)."""
    ckpt = resolve_checkpoint(Path(ckpt_dir), iteration)
    return saved_config(read_common(ckpt), ckpt)
