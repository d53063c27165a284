"""Checksums of every checkpoint file: the manifest written last at save, checked at load with fallback."""

# The checksums catch what the renames cannot: a file truncated or altered after it was published. A
# damaged latest checkpoint makes load_checkpoint fall back to the newest intact one, with a warning.
# CRC-32 (zlib, ~1 GB/s per core here, twice sha256's speed) because the threat is storage corruption,
# not tampering; each rank checks a share of the files, so verifying costs well under a second per GB.

from __future__ import annotations

import json
import os
import sys
import zlib
from pathlib import Path
from typing import Any

from megatron_lite.errors import fail
from megatron_lite.parallel_state import ParallelState
from megatron_lite.readers import is_plain_name
from megatron_lite.training.checkpointing.collectives import all_gather_objects
from megatron_lite.training.checkpointing.names import (
    CHECKSUMS_FILENAME,
    iteration_dir,
    iteration_dir_name,
    saved_iterations,
)


def file_checksum(path: Path) -> dict[str, int]:
    """Size and CRC-32 of a file, read in 16 MiB pieces."""
    crc = 0
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(16 << 20):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"size": size, "crc32": crc}


def write_manifest(directory: Path, checksums: dict[str, dict[str, int]]) -> None:
    """checksums.json, synced: written last, so a directory with a manifest has all its files."""
    with open(directory / CHECKSUMS_FILENAME, "w") as handle:
        json.dump({"algorithm": "crc32", "files": dict(sorted(checksums.items()))}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def verify_checkpoint(ckpt: str | os.PathLike, pstate: ParallelState | None = None) -> str | None:
    """The first damaged file of checkpoint directory `ckpt` as one sentence, or None when every file
    matches checksums.json (or the checkpoint predates checksums). Collective: the ranks split the files."""
    pstate = pstate or ParallelState()
    ckpt = Path(ckpt)
    problems: list[tuple[str, str]] = []
    manifest_path = ckpt / CHECKSUMS_FILENAME
    try:
        manifest = json.loads(manifest_path.read_text())["files"]
    except FileNotFoundError:
        manifest = {}
    except (OSError, ValueError, KeyError, TypeError):
        manifest = {}
        problems.append(("", f"{manifest_path} is unreadable or not a checksum list"))
    if not isinstance(manifest, dict):
        manifest = {}
        problems.append(("", f"{manifest_path} is unreadable or not a checksum list"))
    for index, (name, expected) in enumerate(sorted(manifest.items())):
        if index % pstate.world_size == pstate.rank:
            problem = _manifest_entry_problem(manifest_path, name, expected) or _check_file(
                ckpt / name, expected
            )
            if problem is not None:
                problems.append((name, problem))
    found = sorted(p for part in all_gather_objects(pstate, problems) for p in part)
    return found[0][1] if found else None


def _manifest_entry_problem(manifest_path: Path, name: Any, expected: Any) -> str | None:
    """A manifest entry must name a plain file of this directory and give its size and CRC-32 as integers:
    a name such as ../../etc/hostname would make the loader look outside the checkpoint."""
    if not is_plain_name(name):
        return f"{manifest_path} names {name!r}, which is not a file name inside the checkpoint"
    fields = ("size", "crc32")
    if not isinstance(expected, dict) or not all(type(expected.get(f)) is int for f in fields):
        return f"{manifest_path} gives {name!r} no integer size and crc32"
    return None


def _check_file(path: Path, expected: dict[str, int]) -> str | None:
    try:
        actual = file_checksum(path)
    except FileNotFoundError:
        return f"{path} is missing"
    except OSError as err:
        return f"{path} cannot be read ({err.strerror})"
    if actual["size"] != expected["size"]:
        return f"{path} has {actual['size']} bytes, {expected['size']} expected (truncated or overwritten)"
    if actual["crc32"] != expected["crc32"]:
        return (
            f"{path} does not match its checksum (CRC-32 {actual['crc32']:08x}, "
            f"{expected['crc32']:08x} expected): its contents changed"
        )
    return None


def fail_if_damaged(ckpt: Path, pstate: ParallelState) -> None:
    problem = verify_checkpoint(ckpt, pstate)
    if problem is not None:
        fail(f"checkpoint {ckpt} is damaged: {problem}; restore it from a copy or load another iteration")


def newest_intact_checkpoint(load_dir: Path, latest: int, pstate: ParallelState) -> tuple[Path, int]:
    """The latest checkpoint if intact, else the newest older one that is, with a warning naming what
    was damaged: an unattended restart loop should resume, but never silently from an older iteration."""
    ckpt = iteration_dir(load_dir, latest)
    problem = verify_checkpoint(ckpt, pstate)
    if problem is None:
        return ckpt, latest
    damaged = [f"iteration {latest}: {problem}"]
    for iteration in (it for it in reversed(saved_iterations(load_dir)) if it < latest):
        candidate = load_dir / iteration_dir_name(iteration)
        other = verify_checkpoint(candidate, pstate)
        if other is None:
            if pstate.rank == 0:
                print(
                    f"warning: checkpoint damaged in {load_dir} ({'; '.join(damaged)}); resuming from "
                    f"iteration {iteration}, the newest intact checkpoint, and losing the iterations after it",
                    file=sys.stderr,
                    flush=True,
                )
            return candidate, iteration
        damaged.append(f"iteration {iteration}: {other}")
    fail(
        f"no intact checkpoint in --load {load_dir} ({'; '.join(damaged)}); restore the damaged files from a "
        "copy, or move the directory away to start from scratch"
    )
