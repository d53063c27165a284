"""Megatron-layout `torch_dist` checkpoints: DCP shards that load at any TP/DP size, written atomically."""

# On disk (Megatron's layout):
#   {dir}/latest_checkpointed_iteration.txt    the newest whole checkpoint's iteration
#   {dir}/iter_{it:07d}/__{rank}_0.distcp       torch.distributed.checkpoint shards, one file per rank
#   {dir}/iter_{it:07d}/.metadata               DCP's index of the shards
#   {dir}/iter_{it:07d}/common.pt               iteration, data position, scheduler, config, tensor layouts
#   {dir}/iter_{it:07d}/rng_state_{rank}.pt     each rank's RNG streams
#   {dir}/iter_{it:07d}/metadata.json           Megatron's backend description
#   {dir}/iter_{it:07d}/checksums.json          size and CRC-32 of every file above, written last
#
# Every TP-sharded tensor is written as a DTensor sharded over the TP mesh, so DCP reshards it into any
# other TP size when it is read. Vocabulary-padded tensors (embedding, output layer) are stored in blocks
# of --make-vocab-size-divisible-by rows covering only the true vocabulary, which makes their stored
# shape the same at every TP size. A save goes to a temporary directory that is renamed into place, and
# only then does the latest pointer move, so a crash at any point leaves the previous checkpoint whole.
# The checksums catch what the renames cannot: a file truncated or altered after it was published. A
# damaged latest checkpoint makes load_checkpoint fall back to the newest intact one, with a warning.
# CRC-32 (zlib, ~1 GB/s per core here, twice sha256's speed) because the threat is storage corruption,
# not tampering; each rank checks a share of the files, so verifying costs well under a second per GB.

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import random
import re
import secrets
import shutil
import sys
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor, Shard

from megatron_lite.config import MegatronConfig
from megatron_lite.core.tensor_parallel import get_rng_tracker, model_parallel_manual_seed, split_for_rank
from megatron_lite.errors import UserError, fail
from megatron_lite.parallel_state import ParallelState
from megatron_lite.training.optimizer import unwrap_model
from megatron_lite.training.state import TrainProgress

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
COMMON_FILENAME = "common.pt"
METADATA_FILENAME = "metadata.json"
CHECKSUMS_FILENAME = "checksums.json"
DCP_METADATA_FILENAME = ".metadata"
CHECKPOINT_VERSION = 3.0
# What Megatron writes into a torch_dist checkpoint's metadata.json.
_BACKEND_METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
# Megatron's names of the parameters whose rows are the (TP-padded) vocabulary.
VOCAB_PARAM_SUFFIXES = ("word_embeddings.weight", "output_layer.weight", "output_layer.bias")
_ITER_DIR = re.compile(r"^iter_(\d{7})$")
_LEFTOVER = re.compile(r"^(iter_\d{7})\.(tmp|old)-[0-9a-f]+$")


def iteration_dir_name(iteration: int) -> str:
    """Megatron's directory name of one checkpoint."""
    return f"iter_{iteration:07d}"


def rng_file_name(rank: int) -> str:
    return f"rng_state_{rank}.pt"


# ================================================================================================
# Reading the pointer and the common file
# ================================================================================================


def read_latest_iteration(ckpt_dir: str | os.PathLike) -> int | None:
    """The iteration the latest pointer names, or None when the directory holds no whole checkpoint."""
    path = Path(ckpt_dir) / TRACKER_FILENAME
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as err:
        fail(f"cannot read {path}: {err.strerror}")
    if text == "release":
        return 0
    try:
        return int(text)
    except ValueError:
        fail(f"{path} holds {text!r}, not an iteration number; fix it or delete it")


def load_saved_config(ckpt_dir: str | os.PathLike, iteration: int | None = None) -> MegatronConfig:
    """The config a checkpoint was saved with (latest one unless `iteration` is given)."""
    ckpt = _resolve_checkpoint(Path(ckpt_dir), iteration)
    return MegatronConfig.from_dict(_read_common(ckpt)["args"])


def _resolve_checkpoint(ckpt_dir: Path, iteration: int | None) -> Path:
    if iteration is None:
        iteration = read_latest_iteration(ckpt_dir)
        if iteration is None:
            fail(f"{ckpt_dir} holds no checkpoint ({TRACKER_FILENAME} is missing)")
    return _iteration_dir(ckpt_dir, iteration)


def _iteration_dir(ckpt_dir: Path, iteration: int) -> Path:
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


def _read_common(ckpt: Path) -> dict[str, Any]:
    path = ckpt / COMMON_FILENAME
    if not path.exists():
        if (ckpt / "mp_rank_00").exists():
            fail(f"{ckpt} is a legacy --ckpt-format torch checkpoint; megatron-lite reads torch_dist only")
        fail(f"{ckpt} is not a megatron-lite checkpoint: {COMMON_FILENAME} is missing")
    try:
        common = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        fail(f"cannot read {path} ({type(err).__name__}); it was not written by megatron-lite or is damaged")
    if common.get("checkpoint_version") != CHECKPOINT_VERSION or "tensors" not in common:
        fail(
            f"{path} has checkpoint_version {common.get('checkpoint_version')}, expected {CHECKPOINT_VERSION}"
        )
    return common


# ================================================================================================
# Save
# ================================================================================================


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
    """
    pstate = pstate or ParallelState()
    save_dir = Path(save_dir)
    module = unwrap_model(model)
    final = save_dir / iteration_dir_name(iteration)
    nonce = _broadcast_from_rank0(pstate, secrets.token_hex(4) if pstate.rank == 0 else None)
    tmp = save_dir / f"{final.name}.tmp-{nonce}"
    step = _SaveStep(pstate, save_dir, iteration)
    try:
        step.run(lambda: _prepare_directory(save_dir, tmp), rank0_only=True)
        shards, layouts = _model_shards(module, cfg, pstate)
        optimizer_groups = None
        if optimizer is not None and not cfg.no_save_optim:
            optim_shards, optim_layouts, optimizer_groups = _optimizer_shards(optimizer, module, cfg, pstate)
            shards.update(optim_shards)
            # Under ZeRO each DP rank holds other parameters' states: rank 0 records them all.
            for part in _all_gather_objects(pstate, optim_layouts):
                layouts.update(part)
        rank_sums: dict[str, dict[str, int]] = {}
        step.run(
            lambda: rank_sums.update(_write_rank_files(shards, tmp, pstate, save_rng=not cfg.no_save_rng))
        )
        all_sums = {}
        for part in _all_gather_objects(pstate, rank_sums):
            all_sums.update(part)
        common = {
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
        step.run(lambda: _write_common_files(tmp, common, all_sums), rank0_only=True)
        step.run(lambda: _publish(save_dir, tmp, final, iteration, nonce), rank0_only=True)
    except BaseException:
        if pstate.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if pstate.rank == 0 and cfg.save_keep_last:
        _delete_old_checkpoints(save_dir, iteration, cfg.save_keep_last)


class _SaveStep:
    """Runs one phase of a save on every rank (or rank 0) and makes every rank raise if any rank failed,
    so no rank waits in a collective for a rank that has given up."""

    def __init__(self, pstate: ParallelState, save_dir: Path, iteration: int) -> None:
        self.pstate = pstate
        self.save_dir = save_dir
        self.iteration = iteration

    def run(self, action: Callable[[], None], *, rank0_only: bool = False) -> None:
        failure = None
        local_error: BaseException | None = None
        if not rank0_only or self.pstate.rank == 0:
            try:
                action()
            except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
                local_error = err
                failure = (self.pstate.rank, _os_error_text(err), f"{type(err).__name__}: {err}")
        failures = [f for f in _all_gather_objects(self.pstate, failure) if f is not None]
        if not failures:
            return
        rank, os_text, text = next((f for f in failures if f[1] is not None), failures[0])
        if os_text is not None:
            raise UserError(
                f"cannot save checkpoint iteration {self.iteration} to {self.save_dir}: {os_text}; "
                "check that --save is a writable directory with free space (earlier checkpoints are untouched)"
            ) from local_error
        if local_error is not None:
            raise local_error
        raise RuntimeError(f"saving checkpoint iteration {self.iteration} failed on rank {rank}: {text}")


def _os_error_text(err: BaseException) -> str | None:
    """The OS-level reason (disk full, permission denied) behind a failed write, if that is what it was."""
    candidates: list[BaseException] = [err]
    if isinstance(err, CheckpointException):
        candidates += [wrapped[0] for wrapped in err.failures.values()]
    for exc in candidates:
        while exc is not None:
            if isinstance(exc, OSError):
                return os.strerror(exc.errno) if exc.errno else str(exc)
            exc = exc.__cause__ or exc.__context__
    return None


def _prepare_directory(save_dir: Path, tmp: Path) -> None:
    save_dir.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(save_dir)
    tmp.mkdir()


def _clean_leftovers(save_dir: Path) -> None:
    """Remove what crashed saves left behind; a replaced checkpoint whose successor never arrived comes back."""
    for entry in save_dir.iterdir():
        if entry.name.startswith(TRACKER_FILENAME + ".tmp-"):
            entry.unlink()
            continue
        match = _LEFTOVER.match(entry.name)
        if match is None:
            continue
        final = save_dir / match.group(1)
        if match.group(2) == "old" and not final.exists():
            os.rename(entry, final)
        else:
            shutil.rmtree(entry)


def _write_rank_files(
    shards: dict[str, Any], tmp: Path, pstate: ParallelState, *, save_rng: bool
) -> dict[str, dict[str, int]]:
    """Write this rank's DCP shards and RNG file; returns their checksums (read back while still cached)."""
    writer = dcp.FileSystemWriter(tmp, single_file_per_rank=True, sync_files=True)
    with _quiet_single_process():
        dcp.save(shards, storage_writer=writer, no_dist=pstate.world_size == 1)
    mine = sorted(tmp.glob(f"__{pstate.rank}_*.distcp"))
    if save_rng:
        _save_synced(_capture_rng(pstate), tmp / rng_file_name(pstate.rank))
        mine.append(tmp / rng_file_name(pstate.rank))
    return {path.name: file_checksum(path) for path in mine}


def _write_common_files(tmp: Path, common: dict[str, Any], checksums: dict[str, dict[str, int]]) -> None:
    """Rank 0's files, the checksum manifest last: a directory with a manifest has all its files."""
    _save_synced(common, tmp / COMMON_FILENAME)
    with open(tmp / METADATA_FILENAME, "w") as handle:
        json.dump(_BACKEND_METADATA, handle)
        handle.flush()
        os.fsync(handle.fileno())
    checksums = dict(checksums)
    for name in (DCP_METADATA_FILENAME, COMMON_FILENAME, METADATA_FILENAME):
        checksums[name] = file_checksum(tmp / name)
    with open(tmp / CHECKSUMS_FILENAME, "w") as handle:
        json.dump({"algorithm": "crc32", "files": dict(sorted(checksums.items()))}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def file_checksum(path: Path) -> dict[str, int]:
    """Size and CRC-32 of a file, read in 16 MiB pieces."""
    crc = 0
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(16 << 20):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"size": size, "crc32": crc}


def _publish(save_dir: Path, tmp: Path, final: Path, iteration: int, nonce: str) -> None:
    """Rename the finished directory into place, then move the latest pointer (rank 0, after all wrote)."""
    _fsync_files(tmp)
    replaced = None
    if final.exists():
        # rename() cannot replace a non-empty directory: park the old one, and readers fall back to it
        # (see _iteration_dir) if we die before the new one is in place.
        replaced = final.with_name(f"{final.name}.old-{nonce}")
        os.rename(final, replaced)
    os.rename(tmp, final)
    _fsync_dir(save_dir)
    pointer_tmp = save_dir / f"{TRACKER_FILENAME}.tmp-{nonce}"
    with open(pointer_tmp, "w") as handle:
        handle.write(str(iteration))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(pointer_tmp, save_dir / TRACKER_FILENAME)
    _fsync_dir(save_dir)
    if replaced is not None:
        shutil.rmtree(replaced)


def _delete_old_checkpoints(save_dir: Path, iteration: int, keep_last: int) -> None:
    """Keep the checkpoint just saved and the keep_last - 1 newest before it; never touch later ones."""
    older = sorted(
        (int(m.group(1)), save_dir / m.group(0))
        for m in map(_ITER_DIR.match, os.listdir(save_dir))
        if m is not None and int(m.group(1)) < iteration
    )
    doomed = older[: max(0, len(older) - (keep_last - 1))]
    for _, path in doomed:
        try:
            shutil.rmtree(path)
        except OSError as err:
            print(f"warning: --save-keep-last could not delete {path}: {err.strerror}", file=sys.stderr)


def _save_synced(obj: Any, path: Path) -> None:
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_files(directory: Path) -> None:
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        # Some file systems cannot sync a directory; the renames are still ordered on them.
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


# ================================================================================================
# Load
# ================================================================================================


def load_checkpoint(
    load_dir: str | os.PathLike | None,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    cfg: MegatronConfig,
    pstate: ParallelState | None,
) -> TrainProgress | None:
    """Restore the latest checkpoint in load_dir into model, optimizer, scheduler and the RNGs.

    Returns None when load_dir holds no checkpoint (a UserError with --exit-on-missing-checkpoint).
    The checkpoint may come from any TP and DP size. --no-load-optim skips the optimizer, --no-load-rng
    the RNG states, and --finetune both plus the scheduler, starting again at iteration 0.
    """
    pstate = pstate or ParallelState()
    if load_dir is None:
        return None
    load_dir = Path(load_dir)
    iteration = read_latest_iteration(load_dir)
    if iteration is None:
        if cfg.exit_on_missing_checkpoint:
            fail(
                f"--load {load_dir} holds no checkpoint ({TRACKER_FILENAME} is missing) and --exit-on-missing-checkpoint is set"
            )
        return None
    ckpt, iteration = _newest_intact_checkpoint(load_dir, iteration, pstate)
    common = _read_common(ckpt)
    _check_same_model(MegatronConfig.from_dict(common["args"]), cfg, ckpt)
    load_optim = optimizer is not None and not (cfg.no_load_optim or cfg.finetune)
    load_rng = not (cfg.no_load_rng or cfg.finetune)
    if load_optim and common["optimizer"] is None:
        fail(
            f"checkpoint {ckpt} holds no optimizer state (saved with --no-save-optim); pass --no-load-optim or --finetune"
        )
    if load_rng and not common["rng_saved"]:
        fail(f"checkpoint {ckpt} holds no RNG state (saved with --no-save-rng); pass --no-load-rng")

    module = unwrap_model(model)
    targets, finishers = _model_targets(module, common["tensors"], pstate, ckpt)
    new_states: dict[torch.nn.Parameter, dict[str, Any]] = {}
    if load_optim:
        optim_targets, optim_finishers, new_states = _optimizer_targets(
            optimizer, module, common["tensors"], pstate
        )
        targets.update(optim_targets)
        finishers += optim_finishers
    _read_shards(targets, ckpt, pstate)
    for finish in finishers:
        finish()
    if load_optim:
        _install_optimizer_state(optimizer, new_states, common["optimizer"])
    if scheduler is not None and not cfg.finetune and common["opt_param_scheduler"] is not None:
        scheduler.load_state_dict(common["opt_param_scheduler"])
    if load_rng:
        _restore_rng(ckpt, common, cfg, pstate, iteration)
    if cfg.finetune:
        return TrainProgress()
    extra_state = dict(common["extra_state"])
    return TrainProgress(
        iteration=iteration,
        consumed_train_samples=int(common["consumed_train_samples"]),
        skipped_iterations=int(extra_state.get("skipped_iterations", 0)),
        extra_state=extra_state,
    )


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
    for index, (name, expected) in enumerate(sorted(manifest.items())):
        if index % pstate.world_size == pstate.rank:
            problem = _check_file(ckpt / name, expected)
            if problem is not None:
                problems.append((name, problem))
    found = sorted(p for part in _all_gather_objects(pstate, problems) for p in part)
    return found[0][1] if found else None


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


def _fail_if_damaged(ckpt: Path, pstate: ParallelState) -> None:
    problem = verify_checkpoint(ckpt, pstate)
    if problem is not None:
        fail(f"checkpoint {ckpt} is damaged: {problem}; restore it from a copy or load another iteration")


def _newest_intact_checkpoint(load_dir: Path, latest: int, pstate: ParallelState) -> tuple[Path, int]:
    """The latest checkpoint if intact, else the newest older one that is, with a warning naming what
    was damaged: an unattended restart loop should resume, but never silently from an older iteration."""
    ckpt = _iteration_dir(load_dir, latest)
    problem = verify_checkpoint(ckpt, pstate)
    if problem is None:
        return ckpt, latest
    damaged = [f"iteration {latest}: {problem}"]
    older = sorted(
        (int(m.group(1)) for m in map(_ITER_DIR.match, os.listdir(load_dir)) if m is not None),
        reverse=True,
    )
    for iteration in (it for it in older if it < latest):
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


def load_model_weights(
    model: torch.nn.Module,
    ckpt_dir: str | os.PathLike,
    pstate: ParallelState | None = None,
    iteration: int | None = None,
) -> int:
    """Load only the model weights (latest checkpoint unless `iteration`), at any TP size; returns the iteration."""
    pstate = pstate or ParallelState()
    ckpt = _resolve_checkpoint(Path(ckpt_dir), iteration)
    _fail_if_damaged(ckpt, pstate)
    common = _read_common(ckpt)
    targets, finishers = _model_targets(unwrap_model(model), common["tensors"], pstate, ckpt)
    _read_shards(targets, ckpt, pstate)
    for finish in finishers:
        finish()
    return int(common["iteration"])


def read_full_tensors(
    ckpt_dir: str | os.PathLike, iteration: int | None = None, *, prefix: str = "model."
) -> dict[str, torch.Tensor]:
    """Every stored tensor under `prefix` as one full, unsharded tensor (vocab rows cut to the true
    vocabulary), read in this one process; for converters, inspection and tests."""
    ckpt = _resolve_checkpoint(Path(ckpt_dir), iteration)
    _fail_if_damaged(ckpt, ParallelState())
    layouts = {
        key: _Layout.from_dict(value)
        for key, value in _read_common(ckpt)["tensors"].items()
        if key.startswith(prefix)
    }
    buffers = {key: torch.empty(lay.stored_shape, dtype=lay.torch_dtype) for key, lay in layouts.items()}
    _read_shards(buffers, ckpt, ParallelState())
    return {key[len(prefix) :]: _logical_full(buffers[key], lay) for key, lay in layouts.items()}


# Model-shape settings: a checkpoint only loads into a model that agrees on all of them. The derived
# ones are compared only when the settings they derive from agree, so one cause gives one complaint.
_MODEL_SHAPE_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "vocab_size",
    "position_embedding_type",
    "normalization",
    "swiglu",
    "untie_embeddings_and_output_weights",
    "add_bias_linear",
    "layernorm_epsilon",
)
_DERIVED_SHAPE_FIELDS = ("num_query_groups", "kv_channels", "ffn_hidden_size")


def _check_same_model(saved: MegatronConfig, cfg: MegatronConfig, ckpt: Path) -> None:
    def show(value: Any) -> str:
        if isinstance(value, bool):
            return "on" if value else "off"
        return str(value)

    def differences(names: tuple[str, ...]) -> list[tuple[str, Any, Any]]:
        return [
            (f"--{name.replace('_', '-')}", getattr(saved, name), getattr(cfg, name))
            for name in names
            if getattr(saved, name) != getattr(cfg, name)
        ]

    found = differences(_MODEL_SHAPE_FIELDS)
    if saved.position_embedding_type == cfg.position_embedding_type == "learned_absolute":
        found += differences(("max_position_embeddings",))
    if saved.position_embedding_type == cfg.position_embedding_type == "rope":
        found += differences(("rotary_base", "rotary_percent"))
    if saved.qkv_bias != cfg.qkv_bias:
        found.append(("QKV bias (--add-qkv-bias/--disable-qkv-bias)", saved.qkv_bias, cfg.qkv_bias))
    if not found:
        found = differences(_DERIVED_SHAPE_FIELDS)
    if found:
        problems = "; ".join(
            f"{flag} {show(old)} in the checkpoint, {show(new)} given" for flag, old, new in found
        )
        fail(f"checkpoint {ckpt} holds a different model: {problems}; give the checkpoint's model flags")


def _model_targets(
    module: torch.nn.Module, saved_layouts: dict[str, dict[str, Any]], pstate: ParallelState, ckpt: Path
) -> tuple[dict[str, Any], list[Callable[[], None]]]:
    """DCP load targets that write straight into the model's parameters (or, where the stored layout
    cannot map onto this rank's shard, full buffers plus the copies that finish the job)."""
    targets: dict[str, Any] = {}
    finishers: list[Callable[[], None]] = []
    problems = []
    wanted = set()
    for name, tensor, param in _named_model_tensors(module):
        key = "model." + name
        wanted.add(key)
        if key not in saved_layouts:
            problems.append(f"it has no tensor {name}")
            continue
        saved = _Layout.from_dict(saved_layouts[key])
        current = _layout_of(name, tensor, param, pstate, saved.vocab_size, saved.block)
        if saved.logical_shape != current.logical_shape:
            problems.append(
                f"{name} is {list(saved.logical_shape)} in it, {list(current.logical_shape)} in the model"
            )
            continue
        target, finish = _load_target(tensor.detach(), saved, current, pstate)
        targets[key] = target
        if finish is not None:
            finishers.append(finish)
    extra = sorted(k[len("model.") :] for k in saved_layouts if k.startswith("model.") and k not in wanted)
    problems += [f"the model has no tensor {name}" for name in extra]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        fail(f"checkpoint {ckpt} does not fit this model: {'; '.join(problems[:3])}{more}")
    return targets, finishers


def _read_shards(targets: dict[str, Any], ckpt: Path, pstate: ParallelState) -> None:
    try:
        with _quiet_single_process():
            dcp.load(targets, storage_reader=dcp.FileSystemReader(ckpt), no_dist=pstate.world_size == 1)
    except (Exception, CheckpointException) as err:
        os_text = _os_error_text(err)
        if os_text is None:
            raise
        fail(f"cannot read checkpoint {ckpt}: {os_text}")


def _named_model_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, tensor, parameter whose layout it has): parameters once each (a tied weight under its
    first name), then persistent buffers."""
    seen = set()
    for name, param in module.named_parameters():
        seen.add(id(param))
        yield name, param, param
    for name, value in module.state_dict(keep_vars=True).items():
        if torch.is_tensor(value) and id(value) not in seen:
            seen.add(id(value))
            yield name, value, value


# ================================================================================================
# How one tensor is stored: the layout that makes a shard's place in the full tensor explicit
# ================================================================================================


@dataclass(frozen=True)
class _Layout:
    """Where a rank's local tensor sits in the stored (global) tensor.

    kind "replicated": stored whole. "sharded": split along partition_dim over TP; with a partition
    stride s (rank r holds chunks r, r+tp, ...), the stored tensor has that dim split into [s, rest]
    and is sharded on the second, which makes every rank's part contiguous. "vocab": rows are the
    padded vocabulary; stored as [ceil(V/block), block, ...] holding only the blocks that contain true
    rows, so the stored shape does not depend on TP padding.
    """

    kind: str
    full_shape: tuple[int, ...]
    stored_shape: tuple[int, ...]
    dtype: str
    partition_dim: int = -1
    stride: int = 1
    vocab_size: int = 0
    block: int = 0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> _Layout:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k in names}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def logical_shape(self) -> tuple[int, ...]:
        """The shape of the tensor the model means (vocab rows without TP padding)."""
        if self.kind == "vocab":
            return (self.vocab_size, *self.full_shape[1:])
        return self.full_shape


def _layout_of(
    name: str, tensor: torch.Tensor, param: torch.Tensor, pstate: ParallelState, vocab_size: int, block: int
) -> _Layout:
    """The layout of `tensor`, a parameter or a state of that parameter (same shape: same layout)."""
    local = tuple(tensor.shape)
    dtype = str(tensor.dtype).removeprefix("torch.")
    if not getattr(param, "tensor_model_parallel", False) or tensor.shape != param.shape:
        return _Layout("replicated", local, local, dtype)
    dim = param.partition_dim
    stride = getattr(param, "partition_stride", 1)
    full = list(local)
    full[dim] *= pstate.tp_size
    rows = local[0]
    if dim == 0 and vocab_size and name.endswith(VOCAB_PARAM_SUFFIXES) and full[0] >= vocab_size:
        # Blocks of `block` rows line up with every rank's shard when the padding is Megatron's.
        if not (
            block
            and rows % block == 0
            and rows == math.ceil(math.ceil(vocab_size / block) / pstate.tp_size) * block
        ):
            block = rows
        stored = (math.ceil(vocab_size / block), block, *local[1:])
        return _Layout("vocab", tuple(full), stored, dtype, 0, 1, vocab_size, block)
    stored = list(full)
    if stride > 1:
        stored[dim : dim + 1] = [stride, full[dim] // stride]
    return _Layout("sharded", tuple(full), tuple(stored), dtype, dim, stride)


def _local_part(
    tensor: torch.Tensor, layout: _Layout, pstate: ParallelState
) -> tuple[torch.Tensor, int | None]:
    """A view of `tensor` shaped as its piece of the stored tensor, and the stored dim it is sharded on."""
    if layout.kind == "replicated":
        return tensor, None
    if layout.kind == "sharded":
        if layout.stride == 1:
            return tensor, layout.partition_dim
        dim = layout.partition_dim
        shape = list(tensor.shape)
        shape[dim : dim + 1] = [layout.stride, shape[dim] // layout.stride]
        return tensor.view(shape), dim + 1
    num_blocks = layout.stored_shape[0]
    per_rank = tensor.shape[0] // layout.block
    first = pstate.tp_rank * per_rank
    mine = max(0, min(first + per_rank, num_blocks) - first)
    return tensor[: mine * layout.block].view(mine, *layout.stored_shape[1:]), 0


def _to_stored(tensor: torch.Tensor, layout: _Layout, pstate: ParallelState) -> torch.Tensor:
    """The object DCP writes or fills: a DTensor sharded over the TP mesh, or a plain (whole) tensor."""
    part, shard_dim = _local_part(tensor, layout, pstate)
    if shard_dim is None or pstate.tp_size == 1:
        return part
    shape = torch.Size(layout.stored_shape)
    strides = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    return DTensor.from_local(part, pstate.mesh["tp"], [Shard(shard_dim)], shape=shape, stride=strides)


def _load_target(
    tensor: torch.Tensor, saved: _Layout, current: _Layout, pstate: ParallelState
) -> tuple[torch.Tensor, Callable[[], None] | None]:
    """Read straight into `tensor` when the stored layout matches ours; otherwise read the whole stored
    tensor (e.g. vocab blocks of another --make-vocab-size-divisible-by) and copy this rank's part."""
    if (saved.kind, saved.stored_shape, saved.stride) == (current.kind, current.stored_shape, current.stride):
        return _to_stored(tensor, current, pstate), None
    whole = torch.empty(saved.stored_shape, dtype=saved.torch_dtype)

    def finish() -> None:
        full = _logical_full(whole, saved)
        with torch.no_grad():
            if current.kind == "vocab":
                rows = tensor.shape[0]
                first = pstate.tp_rank * rows
                count = max(0, min(rows, current.vocab_size - first))
                tensor[:count].copy_(full[first : first + count])
            elif current.kind == "sharded":
                part = split_for_rank(
                    full, current.partition_dim, pstate.tp_rank, pstate.tp_size, current.stride
                )
                tensor.copy_(part)
            else:
                tensor.copy_(full)

    return whole, finish


def _logical_full(stored: torch.Tensor, layout: _Layout) -> torch.Tensor:
    if layout.kind == "vocab":
        return stored.reshape(-1, *layout.stored_shape[2:])[: layout.vocab_size]
    return stored.reshape(layout.full_shape)


def _model_shards(
    module: torch.nn.Module, cfg: MegatronConfig, pstate: ParallelState
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    shards, layouts = {}, {}
    for name, tensor, param in _named_model_tensors(module):
        layout = _layout_of(
            name, tensor, param, pstate, cfg.vocab_size or 0, cfg.make_vocab_size_divisible_by
        )
        shards["model." + name] = _to_stored(tensor.detach(), layout, pstate)
        layouts["model." + name] = layout.to_dict()
    return shards, layouts


# ================================================================================================
# Optimizer: AdamW state keyed by parameter name, stored with its parameter's layout
# ================================================================================================


def _local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds this rank's state: under ZeRO, the one over this DP rank's share."""
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        return optimizer.optim
    return optimizer


def _parameter_names(module: torch.nn.Module) -> dict[int, str]:
    return {id(param): name for name, param in module.named_parameters()}


def _optimizer_shards(
    optimizer: torch.optim.Optimizer, module: torch.nn.Module, cfg: MegatronConfig, pstate: ParallelState
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], list[dict[str, Any]]]:
    names = _parameter_names(module)
    local = _local_optimizer(optimizer)
    shards, layouts = {}, {}
    for group in local.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            for key, value in local.state.get(param, {}).items():
                is_python = not torch.is_tensor(value)
                tensor = torch.tensor(value) if is_python else value.detach()
                layout = _layout_of(
                    name, tensor, param, pstate, cfg.vocab_size or 0, cfg.make_vocab_size_divisible_by
                )
                full_key = f"optimizer.state.{name}.{key}"
                shards[full_key] = _to_stored(tensor, layout, pstate)
                layouts[full_key] = {**layout.to_dict(), "param": name, "state": key, "python": is_python}
    groups = [
        {"lr": group["lr"], "params": [names[id(p)] for p in group["params"]]}
        for group in optimizer.param_groups
    ]
    return shards, layouts, groups


def _optimizer_targets(
    optimizer: torch.optim.Optimizer,
    module: torch.nn.Module,
    saved_layouts: dict[str, dict[str, Any]],
    pstate: ParallelState,
) -> tuple[dict[str, Any], list[Callable[[], None]], dict[torch.nn.Parameter, dict[str, Any]]]:
    """Fresh state tensors for every parameter this rank's optimizer owns, and their DCP targets."""
    by_param: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for key, values in saved_layouts.items():
        if key.startswith("optimizer.state."):
            by_param.setdefault(values["param"], []).append((key, values))
    names = _parameter_names(module)
    local = _local_optimizer(optimizer)
    targets: dict[str, Any] = {}
    finishers: list[Callable[[], None]] = []
    new_states: dict[torch.nn.Parameter, dict[str, Any]] = {}
    for group in local.param_groups:
        on_device = bool(group.get("fused") or group.get("capturable"))
        for param in group["params"]:
            name = names[id(param)]
            state: dict[str, Any] = {}
            for key, values in by_param.get(name, []):
                saved = _Layout.from_dict(values)
                param_layout = _Layout.from_dict(saved_layouts["model." + name])
                if saved.kind != "replicated" or saved.full_shape == param_layout.full_shape:
                    buffer = torch.zeros_like(param, dtype=saved.torch_dtype)
                else:
                    device = param.device if on_device else torch.device("cpu")
                    buffer = torch.zeros(saved.stored_shape, dtype=saved.torch_dtype, device=device)
                current = _layout_of(name, buffer, param, pstate, saved.vocab_size, saved.block)
                target, finish = _load_target(buffer, saved, current, pstate)
                targets[key] = target
                if finish is not None:
                    finishers.append(finish)
                state[values["state"]] = (buffer, values["python"])
            new_states[param] = state
    return targets, finishers, new_states


def _install_optimizer_state(
    optimizer: torch.optim.Optimizer,
    new_states: dict[torch.nn.Parameter, dict[str, Any]],
    saved_groups: list[dict[str, Any]],
) -> None:
    local = _local_optimizer(optimizer)
    for param, state in new_states.items():
        if state:
            local.state[param] = {k: (t.item() if is_python else t) for k, (t, is_python) in state.items()}
        else:
            local.state.pop(param, None)
    if len(saved_groups) == len(optimizer.param_groups):
        for group, saved in zip(optimizer.param_groups, saved_groups):
            group["lr"] = saved["lr"]


# ================================================================================================
# RNG: every rank's streams, re-seeded where the parallel layout changed
# ================================================================================================


def _capture_rng(pstate: ParallelState) -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "tp_rank": pstate.tp_rank,
        "dp_rank": pstate.dp_rank,
        "random": (version, list(internal), gauss),
        # As tensors and numbers: torch.load(weights_only=True) takes no numpy arrays.
        "np": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "rng_tracker_states": get_rng_tracker().get_states(),
    }


def _set_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["np"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_rng_tracker().set_states(state["rng_tracker_states"])


def _restore_rng(
    ckpt: Path, common: dict[str, Any], cfg: MegatronConfig, pstate: ParallelState, iteration: int
) -> None:
    """Each rank takes the streams of the saved rank at the same (DP, TP) place. When the TP size changed,
    or this DP rank did not exist, it is re-seeded from (seed, iteration, DP rank): the same value on all
    TP ranks of a DP group, whose replicated activations must keep drawing identical dropout masks."""
    saved = common["layout"]
    if saved["tensor_model_parallel_size"] == pstate.tp_size and pstate.dp_rank < saved["data_parallel_size"]:
        rank = pstate.tp_rank + pstate.tp_size * pstate.dp_rank
        _set_rng(torch.load(ckpt / rng_file_name(rank), map_location="cpu", weights_only=True))
        return
    seed = reseed_value(cfg.seed, iteration, pstate.dp_rank)
    random.seed(seed)
    np.random.seed(seed)
    model_parallel_manual_seed(seed, pstate.tp_rank)


def reseed_value(seed: int, iteration: int, dp_rank: int) -> int:
    """The seed of a rank whose saved RNG state does not exist; differs from the run's start seed so a
    resumed run does not replay the first iterations' dropout masks."""
    return (seed + 1_000_003 * (iteration + 1) + 10_007 * dp_rank) % (2**31 - 1)


# ================================================================================================
# Collectives over all ranks (no-ops in one process)
# ================================================================================================


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every single-process call that it assumes one process; here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
        yield


def _broadcast_from_rank0(pstate: ParallelState, value: Any) -> Any:
    if pstate.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather_objects(pstate: ParallelState, value: Any) -> list[Any]:
    if pstate.world_size == 1:
        return [value]
    gathered: list[Any] = [None] * pstate.world_size
    dist.all_gather_object(gathered, value)
    return gathered
