"""Where a checkpoint lives: Megatron's directory and file names, the latest pointer, finding an iteration."""

from __future__ import annotations

import os
import re
from pathlib import Path

from megatron_lite.errors import fail
from megatron_lite.readers.checkpoint import read_tracker

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
COMMON_FILENAME = "common.pt"
METADATA_FILENAME = "metadata.json"
CHECKSUMS_FILENAME = "checksums.json"
DCP_METADATA_FILENAME = ".metadata"
ITER_DIR = re.compile(r"^iter_(\d{7})$")
# What a crashed save leaves: its temporary directory, or the previous copy it parked while replacing it.
LEFTOVER = re.compile(r"^(iter_\d{7})\.(tmp|old)-[0-9a-f]+$")


def iteration_dir_name(iteration: int) -> str:
    """Megatron's directory name of one checkpoint."""
    return f"iter_{iteration:07d}"


def rng_file_name(rank: int) -> str:
    return f"rng_state_{rank}.pt"


def read_latest_iteration(ckpt_dir: str | os.PathLike) -> int | None:
    """The iteration the latest pointer names, or None when the directory holds no whole checkpoint."""
    return read_tracker(Path(ckpt_dir) / TRACKER_FILENAME)


def saved_iterations(ckpt_dir: Path) -> list[int]:
    """The iterations of the published checkpoint directories under ckpt_dir, oldest first."""
    return sorted(int(m.group(1)) for m in map(ITER_DIR.match, os.listdir(ckpt_dir)) if m is not None)


def resolve_checkpoint(ckpt_dir: Path, iteration: int | None) -> Path:
    """The directory of checkpoint `iteration` (the latest one when None)."""
    if iteration is None:
        iteration = read_latest_iteration(ckpt_dir)
        if iteration is None:
            fail(f"{ckpt_dir} holds no checkpoint ({TRACKER_FILENAME} is missing)")
    return iteration_dir(ckpt_dir, iteration)


def iteration_dir(ckpt_dir: Path, iteration: int) -> Path:
    final = ckpt_dir / iteration_dir_name(iteration)
    if final.is_dir():
        return final
    # A save that replaced this iteration crashed between its two renames: the previous copy is whole.
    previous = sorted(ckpt_dir.glob(f"{final.name}.old-*"))
    if previous:
        return previous[-1]
    if iteration == 0 and (ckpt_dir / "release").is_dir():
        return ckpt_dir / "release"
    fail(f"{ckpt_dir / TRACKER_FILENAME} names iteration {iteration} but {final} does not exist")
