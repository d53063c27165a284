"""Saving a checkpoint: every rank writes its own shards, then it is published atomically (or, with
--async-save, written by a background thread and published once every rank's write has finished)."""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from megatron_lite.config import MegatronConfig
from megatron_lite.config.checkpointing import check_checkpointing
from megatron_lite.parallel_state import ParallelState
from megatron_lite.training.checkpointing.async_save import (
    abandon_async_save,
    async_write_in_progress,
    finalize_async_save,
    start_async_save,
)
from megatron_lite.training.checkpointing.collectives import (
    all_gather_objects,
    broadcast_from_rank0,
    quiet_single_process,
)
from megatron_lite.training.checkpointing.commit import (
    SaveInProgress,
    abandon,
    commit_save,
    rank_file_checksums,
)
from megatron_lite.training.checkpointing.megatron_common import build_common
from megatron_lite.training.checkpointing.megatron_keys import rng_state_key
from megatron_lite.training.checkpointing.megatron_state import model_save_dict, optimizer_save_dict
from megatron_lite.training.checkpointing.publish import prepare_directory
from megatron_lite.training.checkpointing.rng import capture_rng, megatron_rng_state
from megatron_lite.training.checkpointing.state_dict import save_planner
from megatron_lite.training.optimizer import unwrap_model


def save_checkpoint(
    save_dir: str | os.PathLike,
    iteration: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    cfg: MegatronConfig,
    pstate: ParallelState | None,
    *,
    consumed_train_samples: int,
    extra_state: dict[str, Any] | None = None,
) -> None:
    """Write checkpoint `iteration` under save_dir (collective: every rank calls it).

    Each rank writes only its own shards. The checkpoint becomes visible (renamed into place, then the
    latest pointer moved) only once every rank's files are written and synced; a failure removes the
    partial directory and raises, leaving earlier checkpoints untouched. Disk-full or permission
    errors raise UserError naming the directory. With --save-keep-last K older checkpoints beyond the
    newest K are deleted afterwards.

    With --async-save this returns once the state is copied to CPU memory; a background thread writes
    it, and finalize_async_save (called by every rank: non-blocking after each iteration, blocking before
    the next save and at exit) publishes it. A save still pending is published before a new one starts.
    """
    pstate = pstate or ParallelState()
    check_checkpointing(cfg)  # as Megatron, which refuses an async save of another format when saving
    if pstate.rank == 0 and async_write_in_progress():
        print(
            "WARNING: Starting a checkpoint save before previous has finished. "
            "Consider increasing the checkpoint interval.",
            file=sys.stderr,
            flush=True,
        )
    finalize_async_save(pstate)
    save_dir = Path(save_dir)
    module = unwrap_model(model)
    nonce = broadcast_from_rank0(pstate, secrets.token_hex(4) if pstate.rank == 0 else None)
    save = SaveInProgress(pstate, save_dir, iteration, nonce, cfg.save_keep_last, cfg.save_retain_interval)
    step = save.step()
    # Background writes get private CPU copies: training goes on changing the originals.
    staged = cfg.async_save
    try:
        step.run(lambda: prepare_directory(save_dir, save.tmp), rank0_only=True)
        shards = model_save_dict(module, cfg.num_layers, pstate, staged=staged)
        optimizer_groups = None
        if optimizer is not None and not cfg.no_save_optim:
            optim_shards, adam_step, optimizer_groups = optimizer_save_dict(
                optimizer, module, cfg.num_layers, pstate, staged=staged
            )
            shards.update(optim_shards)
            # Under ZeRO a DP rank may own no state yet; Adam's step is the same wherever it exists.
            steps = [s for s in all_gather_objects(pstate, adam_step) if s is not None]
            for group in optimizer_groups:
                group["step"] = steps[0] if steps else None
        layout = {
            "world_size": pstate.world_size,
            "tensor_model_parallel_size": pstate.tp_size,
            "data_parallel_size": pstate.dp_size,
            "pipeline_model_parallel_size": pstate.pp_size,
            "context_parallel_size": pstate.cp_size,
        }
        save.common = build_common(
            iteration, consumed_train_samples, cfg, scheduler, optimizer_groups, layout, extra_state
        )
        if not cfg.no_save_rng and pstate.dp_rank == 0:
            # Megatron's rng_state ShardedObject (one per TP place), for Megatron-LM's reader; our own
            # per-rank RNG files beside it keep every DP rank's streams.
            shards[rng_state_key(pstate)] = [[megatron_rng_state(pstate)]]
        rng_state = None if cfg.no_save_rng else capture_rng(pstate)
        if cfg.async_save:
            step.run(lambda: start_async_save(save, shards, rng_state, cfg))
            return
        rank_sums: dict[str, dict[str, int]] = {}
        step.run(lambda: rank_sums.update(_write_rank_files(shards, save, rng_state, cfg)))
        commit_save(save, rank_sums)
    except BaseException:
        if staged:
            abandon_async_save()
        abandon(save)
        raise


def _write_rank_files(
    shards: dict[str, Any], save: SaveInProgress, rng_state: dict[str, Any] | None, cfg: MegatronConfig
) -> dict[str, dict[str, int]]:
    """Write this rank's DCP shards and RNG file now; returns their checksums."""
    writer = dcp.FileSystemWriter(save.tmp, single_file_per_rank=True, sync_files=True)
    with quiet_single_process():
        dcp.save(
            shards,
            storage_writer=writer,
            planner=save_planner(cfg, save.pstate),
            no_dist=save.pstate.world_size == 1,
        )
    return rank_file_checksums(save.tmp, save.pstate, rng_state)
