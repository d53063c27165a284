"""Fault tolerance under torchrun with 2 real gloo ranks: SIGKILL of a rank with restarts, SIGTERM of one
rank, and a stalled rank; the losses after a restart equal those of an uninterrupted run."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from dist_utils import free_port
from helpers import PRETRAIN_GPT, start_python, tiny_flags, torchrun_args
from megatron_log import parse_lines

from megatron_lite.training.checkpointing import read_latest_iteration

# dropout on: identical losses after a restart need the RNG streams restored, not only the weights
TINY = tiny_flags(
    global_batch_size=8,
    vocab_size=100,
    num_workers=0,
    peak_tflops=1,
    lr_warmup_iters=2,
    hidden_dropout=0.1,
    attention_dropout=0.1,
    eval_iters=0,
    log_interval=1,
    train_iters=8,
)

pytestmark = pytest.mark.slow


def worker_pids(torchrun_pid: int) -> dict[int, int]:
    """RANK -> pid of the worker processes torchrun runs now (its children, read from /proc)."""
    ranks = {}
    with open(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children") as handle:
        children = [int(pid) for pid in handle.read().split()]
    for pid in children:
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                env = dict(item.split(b"=", 1) for item in handle.read().split(b"\0") if b"=" in item)
        except FileNotFoundError:
            continue
        if b"RANK" in env:
            ranks[int(env[b"RANK"])] = pid
    return ranks


def torchrun(
    tmp_path: Path, args: list[str], *, max_restarts: int = 0, on_line: Callable | None = None
) -> tuple[int, str]:
    """Run pretrain_gpt.py on 2 ranks; on_line(line, workers) is called for every output line (stdout and
    stderr together) until it returns True. Returns the exit status and the whole output."""
    launcher = [
        f"--max-restarts={max_restarts}",
        "--monitor-interval=0.2",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
    ]
    proc = start_python(
        torchrun_args(PRETRAIN_GPT, TINY + args, launcher_flags=launcher), tmp_path, merge_stderr=True
    )
    out = []
    try:
        watching = on_line is not None
        for line in proc.stdout:
            out.append(line)
            if watching and on_line(line, lambda: worker_pids(proc.pid)):
                watching = False
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, "".join(out)


def losses_by_iteration(text: str) -> dict[int, tuple[str, str]]:
    """iteration -> (consumed samples, lm loss) of every training line; a replayed iteration keeps its last line."""
    return {int(f["iteration"]): (f["consumed"], f["loss"]) for f in parse_lines(text)}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("straight")
    status, text = torchrun(tmp_path, [])
    assert status == 0, text[-3000:]
    losses = losses_by_iteration(text)
    assert sorted(losses) == list(range(1, 9))
    return losses


def at_iteration(iteration: int) -> Callable[[str], bool]:
    return lambda line: f" iteration {iteration:8d}/" in line


@pytest.mark.parametrize("victim, kill_after", [(0, 5), (1, 6)])
def test_sigkill_of_a_rank_restarts_and_resumes_with_identical_losses(tmp_path, straight, victim, kill_after):
    ckpt = tmp_path / "ckpt"

    def kill(line, workers):
        if at_iteration(kill_after)(line):
            os.kill(workers()[victim], signal.SIGKILL)
            return True
        return False

    status, text = torchrun(
        tmp_path,
        ["--save", str(ckpt), "--load", str(ckpt), "--save-interval", "2"],
        max_restarts=1,
        on_line=kill,
    )
    assert status == 0, text[-3000:]
    # The first attempt started fresh (empty directory); the restart resumed from the newest checkpoint.
    assert text.count("> resuming from") == 1
    iterations = [int(f["iteration"]) for f in parse_lines(text)]
    restart = next(i for i in range(1, len(iterations)) if iterations[i] <= iterations[i - 1])
    reached = iterations[restart - 1]
    assert reached >= kill_after and iterations[:restart] == list(range(1, reached + 1))
    resumed_at = iterations[restart] - 1
    # A checkpoint (--save-interval 2) from just before the kill; the kill may land before or during
    # the save of the iteration the watcher saw.
    assert resumed_at % 2 == 0 and reached - 2 <= resumed_at <= reached
    assert f"> resuming from {ckpt} at iteration {resumed_at}, {resumed_at * 8} consumed samples" in text
    # Every iteration up to the kill, then the replayed ones from the checkpoint on: nothing skipped.
    assert iterations[restart:] == list(range(resumed_at + 1, 9))
    lines = parse_lines(text)
    # Same consumed samples and bit-identical losses (as printed) as the uninterrupted run, replays included.
    for f in lines:
        assert (f["consumed"], f["loss"]) == straight[int(f["iteration"])], f["iteration"]
    assert read_latest_iteration(ckpt) == 8


def test_sigterm_to_one_rank_saves_on_every_rank_and_exits_zero(tmp_path):
    ckpt = tmp_path / "ckpt"

    def term(line, workers):
        if at_iteration(3)(line):
            os.kill(workers()[0], signal.SIGTERM)
            return True
        return False

    status, text = torchrun(
        tmp_path,
        [
            "--train-iters",
            "100000",
            "--save",
            str(ckpt),
            "--save-interval",
            "100000",
            "--exit-signal-handler",
        ],
        on_line=term,
    )
    assert status == 0, text[-3000:]
    last = int(parse_lines(text)[-1]["iteration"])
    assert f"exiting at iteration {last} (signal)" in text
    assert read_latest_iteration(ckpt) == last
    names = sorted(p.name for p in (ckpt / f"iter_{last:07d}").iterdir())
    assert names == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "checksums.json",
        "common.pt",
        "metadata.json",
        "rng_state_0.pt",
        "rng_state_1.pt",
    ]


def test_a_stalled_rank_times_out_the_others_and_torchrun_restarts_the_job(tmp_path, straight):
    ckpt = tmp_path / "ckpt"
    stalled = {}

    def stall(line, workers):
        if at_iteration(3)(line) and not stalled:
            stalled["pid"] = workers()[0]
            os.kill(stalled["pid"], signal.SIGSTOP)  # alive but stuck, as in a hung kernel or disk
        elif "a collective did not complete" in line:
            os.kill(stalled["pid"], signal.SIGCONT)  # so torchrun can stop it without its 30 s grace period
            return True
        return False

    status, text = torchrun(
        tmp_path,
        [
            "--save",
            str(ckpt),
            "--load",
            str(ckpt),
            "--save-interval",
            "2",
            "--distributed-timeout-minutes",
            "0.1",
        ],
        max_restarts=1,
        on_line=stall,
    )
    assert status == 0, text[-3000:]
    assert (
        "error: rank 1: a collective did not complete within 0.1 minutes (--distributed-timeout-minutes); "
        "another rank may have died or stalled, see its log. Exiting so that torchrun --max-restarts can "
        "restart the job from the last checkpoint\n"
    ) in text
    assert f"> resuming from {ckpt} at iteration 2, 16 consumed samples" in text
    for f in parse_lines(text):
        assert (f["consumed"], f["loss"]) == straight[int(f["iteration"])], f["iteration"]
    assert read_latest_iteration(ckpt) == 8
