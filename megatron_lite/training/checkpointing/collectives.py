"""The collectives a save or load needs (no-ops in one process), and how a failure on one rank reaches all."""

from __future__ import annotations

import contextlib
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megatron_lite.errors import UserError
from megatron_lite.parallel_state import ParallelState


@contextlib.contextmanager
def quiet_single_process() -> Iterator[None]:
    """DCP warns on every single-process call that it assumes one process; here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
        yield


def broadcast_from_rank0(pstate: ParallelState, value: Any) -> Any:
    if pstate.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(pstate: ParallelState, value: Any) -> list[Any]:
    if pstate.world_size == 1:
        return [value]
    gathered: list[Any] = [None] * pstate.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def os_error_text(err: BaseException) -> str | None:
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


# What torch.load and DCP raise for a data file whose bytes are not what its index says.
_DAMAGE_ERRORS = (
    EOFError,
    ValueError,
    RuntimeError,
    KeyError,
    IndexError,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
)


def raise_read_failure(err: BaseException, ckpt: Path) -> NoReturn:
    """Re-raise a failed DCP read as one line: a reader's UserError as it is, an OS error or damaged data
    naming the checkpoint; anything else (a bug) unchanged."""
    wrapped = [w[0] for w in err.failures.values()] if isinstance(err, CheckpointException) else []
    for exc in [err, *wrapped]:
        if isinstance(exc, UserError):
            raise exc
    os_text = os_error_text(err)
    if os_text is not None:
        raise UserError(f"cannot read checkpoint {ckpt}: {os_text}") from err
    for exc in [err, *wrapped]:
        if isinstance(exc, _DAMAGE_ERRORS):
            raise UserError(
                f"cannot read checkpoint {ckpt}: a data file does not match its .metadata "
                f"({type(exc).__name__}); restore the checkpoint from a copy or load another iteration"
            ) from err
    raise err


class SaveStep:
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
                failure = (self.pstate.rank, os_error_text(err), f"{type(err).__name__}: {err}")
        failures = [f for f in all_gather_objects(self.pstate, failure) if f is not None]
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
