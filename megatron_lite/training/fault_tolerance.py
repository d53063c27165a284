"""Turns a collective that timed out or lost a peer into one clear line, and --exit-signal into a clean stop."""

from __future__ import annotations

import contextlib
import signal
import threading
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


class ExitSignal:
    """--exit-signal-handler: --exit-signal (default SIGTERM) becomes a flag the loop checks after each
    iteration (then every rank saves and exits 0). Off (Megatron's default) it installs nothing: SIGTERM
    keeps its default action and Ctrl-C raises KeyboardInterrupt, which run_cli reports in one line.
    With --exit-signal SIGINT a second Ctrl-C aborts at once.
    """

    def __init__(self, signal_name: str | None = None) -> None:
        self.signum: int | None = signal.Signals[signal_name] if signal_name else None
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @classmethod
    def from_config(cls, cfg) -> ExitSignal:
        return cls(cfg.exit_signal if cfg.exit_signal_handler else None)

    def install(self) -> None:
        if self.signum is None or threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        self._previous[self.signum] = signal.signal(self.signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
