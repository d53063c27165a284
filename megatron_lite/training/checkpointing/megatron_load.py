"""Loading a checkpoint in Megatron's torch_dist layout (ours, or one Megatron-LM wrote) at any TP/DP size."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from megatron_lite.config import MegatronConfig
from megatron_lite.errors import fail
from megatron_lite.parallel_state import ParallelState
from megatron_lite.readers.checkpoint import SafeFileSystemReader, read_dcp_metadata
from megatron_lite.training.checkpointing import megatron_common as mc
from megatron_lite.training.checkpointing.chunks import ChunkLoadPlanner, ObjectSlot
from megatron_lite.training.checkpointing.collectives import quiet_single_process, raise_read_failure
from megatron_lite.training.checkpointing.megatron_keys import rng_state_key
from megatron_lite.training.checkpointing.megatron_state import (
    full_model_tensors,
    install_optimizer_state,
    model_load_targets,
    optimizer_load_targets,
)
from megatron_lite.training.checkpointing.rng import RNG_STATE_ERRORS, restore_rng
from megatron_lite.training.optimizer import unwrap_model
from megatron_lite.training.state import TrainProgress


def read_metadata(ckpt: Path) -> Metadata:
    return read_dcp_metadata(ckpt)


def read_dcp(targets: dict[str, Any], ckpt: Path, pstate: ParallelState) -> None:
    """Fill `targets` (Chunks, tensors, or objects for stored ShardedObjects) from checkpoint ckpt."""
    try:
        with quiet_single_process():
            dcp.load(
                targets,
                storage_reader=SafeFileSystemReader(ckpt),
                planner=ChunkLoadPlanner(),
                no_dist=pstate.world_size == 1,
            )
    except (Exception, CheckpointException) as err:
        raise_read_failure(err, ckpt)


def load_weights(module: torch.nn.Module, cfg_layers: int, ckpt: Path, pstate: ParallelState) -> None:
    metadata = read_metadata(ckpt)
    targets, finishers = model_load_targets(module, cfg_layers, metadata, pstate, str(ckpt))
    read_dcp(targets, ckpt, pstate)
    for finish in finishers:
        finish()


def load_training_state(
    ckpt: Path,
    iteration: int,
    common: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    cfg: MegatronConfig,
    pstate: ParallelState,
    *,
    release: bool = False,
) -> TrainProgress:
    """Weights, and unless --finetune (or a release checkpoint): the optimizer's moments, the schedule,
    the RNG streams and the data position."""
    ours = mc.extras(common)
    metadata = read_metadata(ckpt)
    has_optim = any(k.startswith("optimizer.state.") for k in metadata.state_dict_metadata)
    groups = mc.optimizer_groups(common)
    load_optim = optimizer is not None and not (cfg.no_load_optim or cfg.finetune or release)
    load_rng = not (cfg.no_load_rng or cfg.finetune or release)
    if load_optim and not has_optim:
        if ours is not None or groups is not None:
            fail(
                f"checkpoint {ckpt} holds no optimizer state (saved with --no-save-optim); "
                "pass --no-load-optim or --finetune"
            )
        fail(
            f"checkpoint {ckpt} holds no optimizer moments this reader knows (Megatron's distributed "
            "optimizer stores flattened buckets); pass --no-load-optim to start the optimizer afresh"
        )
    rng_key = rng_state_key(pstate)
    if load_rng:
        saved_rng = ours["rng_saved"] if ours is not None else _has_rng(metadata)
        if not saved_rng:
            fail(f"checkpoint {ckpt} holds no RNG state (saved with --no-save-rng); pass --no-load-rng")

    module = unwrap_model(model)
    targets, finishers = model_load_targets(module, cfg.num_layers, metadata, pstate, str(ckpt))
    new_states: dict[torch.nn.Parameter, dict[str, torch.Tensor]] = {}
    if load_optim:
        optim_targets, optim_finishers, new_states, problems = optimizer_load_targets(
            optimizer, module, cfg.num_layers, metadata, pstate
        )
        if problems:
            fail(f"checkpoint {ckpt}: its optimizer state does not fit this model: {'; '.join(problems[:3])}")
        targets.update(optim_targets)
        finishers += optim_finishers
    megatron_rng = load_rng and ours is None and rng_key in metadata.state_dict_metadata
    if megatron_rng:
        targets[rng_key] = rng_slot = ObjectSlot()
    read_dcp(targets, ckpt, pstate)
    for finish in finishers:
        finish()
    if load_optim:
        install_optimizer_state(optimizer, new_states, groups, mc.optimizer_step(groups))
    sched = mc.scheduler_state(common)
    if scheduler is not None and not cfg.finetune and not release and sched is not None:
        scheduler.load_state_dict(sched)
    if load_rng:
        if ours is not None:
            restore_rng(ckpt, ours, cfg, pstate, iteration)
        elif megatron_rng:
            try:
                _set_megatron_rng(rng_slot.value, pstate)
            except RNG_STATE_ERRORS as err:
                fail(
                    f"checkpoint {ckpt}: its {rng_key} is not an RNG state ({type(err).__name__}); pass --no-load-rng"
                )
        else:
            restore_rng(ckpt, {"layout": {"tensor_model_parallel_size": -1}}, cfg, pstate, iteration)
    if cfg.finetune or release:
        return TrainProgress()
    extra_state = dict(ours["extra_state"]) if ours is not None else {}
    if ours is None:
        extra_state["floating_point_operations"] = float(
            common.get("num_floating_point_operations_so_far", 0)
        )
    return TrainProgress(
        iteration=iteration,
        consumed_train_samples=mc.consumed_samples(common),
        skipped_iterations=int(extra_state.get("skipped_iterations", 0)),
        extra_state=extra_state,
    )


def _has_rng(metadata: Metadata) -> bool:
    return any(
        key.startswith("rng_state/") and isinstance(value, BytesStorageMetadata)
        for key, value in metadata.state_dict_metadata.items()
    )


def _set_megatron_rng(saved: Any, pstate: ParallelState) -> None:
    """Megatron-LM's rng_state of this (PP, TP) place: a list of per-DP-rank states (one unless
    --data-parallel-random-init). Python, numpy and torch streams are restored; its CUDA tracker's
    streams belong to CUDA and are re-seeded by our own seeding instead."""
    states = saved[0] if isinstance(saved, list) and saved and isinstance(saved[0], list) else saved
    state = states[pstate.dp_rank] if len(states) > pstate.dp_rank else states[0]
    version, internal, gauss = state["random_rng_state"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])


def full_tensors(ckpt: Path, cfg: MegatronConfig) -> dict[str, torch.Tensor]:
    """Every model tensor as one full tensor named as ours, vocabulary rows cut to the true vocabulary."""
    metadata = read_metadata(ckpt)
    full = full_model_tensors(metadata, lambda buffers: read_dcp(buffers, ckpt, ParallelState()))
    from megatron_lite.training.checkpointing.keys import is_vocab_param

    vocab = cfg.vocab_size
    return {name: (t[:vocab] if vocab and is_vocab_param(name) else t) for name, t in full.items()}
