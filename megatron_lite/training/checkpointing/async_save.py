"""--async-save: DCP's async_save writes a staged copy on a background thread; finalize publishes it."""

# The training process copies its shards to CPU memory (state_dict.model_shards(staged=True)), hands them
# to torch.distributed.checkpoint.async_save, and goes on training while a thread of each rank writes
# them, its RNG file and their checksums. Nothing is published by the writer: every rank calls
# finalize_async_save (non-blocking after each iteration, blocking before the next save, at exit and on
# the SIGTERM save), which agrees over all ranks that every write has finished and only then writes rank
# 0's files and renames the directory and pointer, exactly as a synchronous save does. A kill at any
# moment before that leaves a temporary directory that the next save removes, and the previous pointer.
# The writer's collectives run on a gloo group of their own: collectives issued from two threads on
# one group could interleave differently on different ranks.

from __future__ import annotations

import datetime
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import AsyncStager

from megatron_lite.config import MegatronConfig
from megatron_lite.parallel_state import ParallelState
from megatron_lite.training.checkpointing.commit import (
    SaveInProgress,
    abandon,
    commit_save,
    rank_file_checksums,
)
from megatron_lite.training.checkpointing.state_dict import save_planner


@dataclass
class _PendingSave:
    save: SaveInProgress
    written: Future  # this rank's file checksums once its shards and RNG file are on disk


_pending: _PendingSave | None = None
_writer_group: tuple[Any, Any] | None = None  # (the WORLD group it was made for, the writer's gloo group)


class _AlreadyStaged(AsyncStager):
    """The shards handed over are private CPU copies already: DCP need not copy them again."""

    _synchronize_after_execute = False

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def start_async_save(
    save: SaveInProgress, shards: dict[str, Any], rng_state: dict[str, Any] | None, cfg: MegatronConfig
) -> None:
    """Start this rank's background write of `shards` (staged copies) into save.tmp."""
    global _pending
    pstate = save.pstate
    group = _writer_process_group(cfg) if pstate.world_size > 1 else None
    if pstate.world_size == 1:
        # The writer thread's dcp.save warns that it assumes one process; process-wide because the
        # warning is raised on DCP's thread, and one process is the intent.
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
    writer = dcp.FileSystemWriter(save.tmp, single_file_per_rank=True, sync_files=True)
    upload = dcp.async_save(
        shards,
        storage_writer=writer,
        planner=save_planner(cfg, pstate),
        process_group=group,
        async_stager=_AlreadyStaged(),
        no_dist=pstate.world_size == 1,
    )
    written: Future = Future()

    def after_upload(done: Future) -> None:
        # Runs on the writer thread: the RNG file and the checksums stay off the training thread too.
        try:
            done.result()
            written.set_result(rank_file_checksums(save.tmp, pstate, rng_state))
        except BaseException as err:  # noqa: BLE001 - handed to finalize, which reports it on every rank
            written.set_exception(err)

    upload.add_done_callback(after_upload)
    _pending = _PendingSave(save, written)


def async_save_pending() -> bool:
    """Whether a checkpoint written in the background awaits finalize_async_save."""
    return _pending is not None


def async_write_in_progress() -> bool:
    """Whether this rank's background writer is still writing."""
    return _pending is not None and not _pending.written.done()


def finalize_async_save(pstate: ParallelState | None = None, *, blocking: bool = True) -> int | None:
    """Publish the pending async save once every rank's write has finished; returns its iteration, or
    None when nothing was published (none pending, or, non-blocking, some rank still writing).

    Collective when a save is pending (every rank has the same one pending). A failed write on any rank
    raises on every rank, as a synchronous save does, and leaves the previous checkpoint the latest."""
    global _pending
    pending = _pending
    if pending is None:
        return None
    pstate = pstate or pending.save.pstate
    if not blocking and not _done_everywhere(pstate, pending.written.done()):
        return None
    _pending = None
    save = pending.save
    try:
        rank_sums: dict[str, dict[str, int]] = {}
        save.step().run(lambda: rank_sums.update(pending.written.result()))
        commit_save(save, rank_sums)
    except BaseException:
        abandon(save)
        raise
    return save.iteration


def abandon_async_save(*, wait: bool = True) -> None:
    """Forget a pending save after a failure. wait: let this rank's writer end, then remove its
    directory; otherwise the directory is left to the next save's clean-up (the run is stopping)."""
    global _pending
    pending, _pending = _pending, None
    if pending is not None and wait:
        pending.written.exception()  # waits; the error was or will be reported by the failed step
        abandon(pending.save)


def _done_everywhere(pstate: ParallelState, done: bool) -> bool:
    if pstate.world_size == 1:
        return done
    # The training group, on the training thread; NCCL reduces tensors on the GPU only.
    flag = torch.tensor([int(done)], device=pstate.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _writer_process_group(cfg: MegatronConfig) -> Any:
    """The writer threads' gloo group, made once per process group (collectively: every rank saves)."""
    global _writer_group
    world = dist.group.WORLD
    if _writer_group is None or _writer_group[0] is not world:
        timeout = datetime.timedelta(minutes=cfg.distributed_timeout_minutes)
        _writer_group = (world, dist.new_group(backend="gloo", timeout=timeout))
    return _writer_group[1]
