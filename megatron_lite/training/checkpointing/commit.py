"""Completing a save on every rank: checksum each rank's files, write rank 0's, publish, prune old ones."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_lite.errors import UserError
from megatron_lite.parallel_state import ParallelState
from megatron_lite.training.checkpointing.collectives import SaveStep, all_gather_objects
from megatron_lite.training.checkpointing.common import write_common_files
from megatron_lite.training.checkpointing.names import (
    iteration_dir_name,
    read_latest_iteration,
    rng_file_name,
)
from megatron_lite.training.checkpointing.publish import (
    delete_old_checkpoints,
    delete_unretained,
    publish,
    save_synced,
)
from megatron_lite.training.checkpointing.verify import file_checksum


@dataclass
class SaveInProgress:
    """One checkpoint from its temporary directory's creation until it is published or abandoned."""

    pstate: ParallelState
    save_dir: Path
    iteration: int
    nonce: str
    keep_last: int | None
    retain_interval: int | None = None
    common: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> Path:
        return self.save_dir / iteration_dir_name(self.iteration)

    @property
    def tmp(self) -> Path:
        return self.save_dir / f"{self.final.name}.tmp-{self.nonce}"

    def step(self) -> SaveStep:
        return SaveStep(self.pstate, self.save_dir, self.iteration)


def rank_file_checksums(
    tmp: Path, pstate: ParallelState, rng_state: dict[str, Any] | None
) -> dict[str, dict[str, int]]:
    """Write this rank's RNG file next to its DCP shards; the checksums of both (read while still cached)."""
    mine = sorted(tmp.glob(f"__{pstate.rank}_*.distcp"))
    if rng_state is not None:
        save_synced(rng_state, tmp / rng_file_name(pstate.rank))
        mine.append(tmp / rng_file_name(pstate.rank))
    return {path.name: file_checksum(path) for path in mine}


def commit_save(save: SaveInProgress, rank_sums: dict[str, dict[str, int]]) -> None:
    """Collective, once every rank's files are written: rank 0 writes common.pt, metadata.json and the
    manifest, renames the directory into place and moves the pointer; then --save-keep-last and --save-retain-interval apply."""
    step = save.step()
    all_sums: dict[str, dict[str, int]] = {}
    for part in all_gather_objects(save.pstate, rank_sums):
        all_sums.update(part)
    step.run(lambda: write_common_files(save.tmp, save.common, all_sums), rank0_only=True)
    previous = _previous_iteration(save) if save.pstate.rank == 0 and save.retain_interval else None
    step.run(
        lambda: publish(save.save_dir, save.tmp, save.final, save.iteration, save.nonce), rank0_only=True
    )
    if save.pstate.rank == 0 and save.keep_last:
        delete_old_checkpoints(save.save_dir, save.iteration, save.keep_last)
    if save.pstate.rank == 0 and save.retain_interval and previous:
        delete_unretained(save.save_dir, previous, save.iteration, save.retain_interval)


def _previous_iteration(save: SaveInProgress) -> int | None:
    # The pointer is about to be replaced anyway: an unreadable one means there is nothing to prune.
    try:
        return read_latest_iteration(save.save_dir)
    except UserError:
        return None


def abandon(save: SaveInProgress) -> None:
    """Remove a failed save's temporary directory (rank 0); earlier checkpoints are untouched."""
    if save.pstate.rank == 0:
        shutil.rmtree(save.tmp, ignore_errors=True)
