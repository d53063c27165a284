"""Turns a collective that timed out or lost a peer into one clear line and a non-zero exit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from megatron_lite.errors import UserError
from megatron_lite.parallel_state import ParallelState

# What gloo and NCCL put in the error of a collective whose peer stalled past the process-group timeout.
_TIMEOUT_MARKERS = ("Timed out waiting", "timed out", "Watchdog caught collective operation timeout")
# ... and of one whose peer process went away (killed, crashed, or exited after its own error).
_PEER_LOST_MARKERS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Connection refused",
    "NCCL communicator was aborted",
)


class CollectiveFailure(UserError):
    """A collective did not complete: another rank died or stalled. torchrun restarts the job on it."""


def describe_collective_failure(err: BaseException, rank: int, timeout_minutes: float) -> str | None:
    """The one-line explanation of `err` if it is a failed collective (looking through its causes), else None."""
    seen: set[int] = set()
    exc: BaseException | None = err
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        # DistBackendError is a RuntimeError; DCP wraps a rank's failure in a CheckpointException whose
        # text carries the original message.
        if isinstance(exc, RuntimeError) or type(exc).__name__ == "CheckpointException":
            if any(marker in text for marker in _TIMEOUT_MARKERS):
                return (
                    f"rank {rank}: a collective did not complete within {timeout_minutes:g} minutes "
                    "(--distributed-timeout-minutes); another rank may have died or stalled, see its log. "
                    "Exiting so that torchrun --max-restarts can restart the job from the last checkpoint"
                )
            if any(marker in text for marker in _PEER_LOST_MARKERS):
                return (
                    f"rank {rank}: lost the connection to another rank during a collective; that rank "
                    "probably died, see its log. Exiting so that torchrun --max-restarts can restart the "
                    "job from the last checkpoint"
                )
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def collective_failures_as_errors(pstate: ParallelState, timeout_minutes: float) -> Iterator[None]:
    """Re-raise a failed collective inside the block as CollectiveFailure (one line, exit 2 under run_cli)."""
    try:
        yield
    except (UserError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # DCP's CheckpointException is a BaseException
        message = (
            describe_collective_failure(err, pstate.rank, timeout_minutes) if pstate.is_distributed else None
        )
        if message is None:
            raise
        raise CollectiveFailure(message) from err
