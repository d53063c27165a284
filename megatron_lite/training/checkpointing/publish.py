"""Atomic publishing of a written checkpoint: fsync, rename into place, move the pointer; and crash leftovers."""

# A save goes to a temporary directory that is renamed into place, and only then does the latest
# pointer move, so a crash at any point leaves the previous checkpoint whole.

from __future__ import annotations

import errno
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from megatron_lite.training.checkpointing.names import (
    ITER_DIR,
    LEFTOVER,
    TRACKER_FILENAME,
    iteration_dir_name,
)


def prepare_directory(save_dir: Path, tmp: Path) -> None:
    save_dir.mkdir(parents=True, exist_ok=True)
    clean_leftovers(save_dir)
    tmp.mkdir()


def clean_leftovers(save_dir: Path) -> None:
    """Remove what crashed saves left behind; a replaced checkpoint whose successor never arrived comes back."""
    for entry in save_dir.iterdir():
        if entry.name.startswith(TRACKER_FILENAME + ".tmp-"):
            entry.unlink()
            continue
        match = LEFTOVER.match(entry.name)
        if match is None:
            continue
        final = save_dir / match.group(1)
        if match.group(2) == "old" and not final.exists():
            os.rename(entry, final)
        else:
            shutil.rmtree(entry)


def publish(save_dir: Path, tmp: Path, final: Path, iteration: int, nonce: str) -> None:
    """Rename the finished directory into place, then move the latest pointer (rank 0, after all wrote)."""
    fsync_files(tmp)
    replaced = None
    if final.exists():
        # rename() cannot replace a non-empty directory: park the old one, and readers fall back to it
        # (see names.iteration_dir) if we die before the new one is in place.
        replaced = final.with_name(f"{final.name}.old-{nonce}")
        os.rename(final, replaced)
    os.rename(tmp, final)
    fsync_dir(save_dir)
    pointer_tmp = save_dir / f"{TRACKER_FILENAME}.tmp-{nonce}"
    with open(pointer_tmp, "w") as handle:
        handle.write(str(iteration))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(pointer_tmp, save_dir / TRACKER_FILENAME)
    fsync_dir(save_dir)
    if replaced is not None:
        shutil.rmtree(replaced)


def delete_old_checkpoints(save_dir: Path, iteration: int, keep_last: int) -> None:
    """Keep the checkpoint just saved and the keep_last - 1 newest before it; never touch later ones."""
    older = sorted(
        (int(m.group(1)), save_dir / m.group(0))
        for m in map(ITER_DIR.match, os.listdir(save_dir))
        if m is not None and int(m.group(1)) < iteration
    )
    doomed = older[: max(0, len(older) - (keep_last - 1))]
    for _, path in doomed:
        try:
            shutil.rmtree(path)
        except OSError as err:
            print(f"warning: --save-keep-last could not delete {path}: {err.strerror}", file=sys.stderr)


def delete_unretained(save_dir: Path, previous: int, iteration: int, retain_interval: int) -> None:
    """Megatron's --save-retain-interval: once a new checkpoint is published, the one before it goes
    unless its iteration is a multiple of the interval (a symbolic link is left alone)."""
    if previous == iteration or previous % retain_interval == 0:
        return
    path = save_dir / iteration_dir_name(previous)
    if path.is_symlink() or not path.is_dir():
        return
    try:
        shutil.rmtree(path)
    except OSError as err:
        print(f"warning: --save-retain-interval could not delete {path}: {err.strerror}", file=sys.stderr)


def save_synced(obj: Any, path: Path) -> None:
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_files(directory: Path) -> None:
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        # Some file systems cannot sync a directory; the renames are still ordered on them.
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)
