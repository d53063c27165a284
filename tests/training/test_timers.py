"""Megatron's timers: level gating, the max / minmax / all reports (over 2 real ranks too), and which timers a
run prints at each --timing-log-level."""

import time

import pytest
from dist_utils import run_distributed
from helpers import ONE_LAYER_RUN, tiny_flags
from megatron_log import MEGATRON_LINE, parse_timer_blocks

from megatron_lite.arguments import parse_config
from megatron_lite.training.timers import DummyTimer, Timers, timers_to_log
from megatron_lite.training.training import pretrain

TINY = tiny_flags(**ONE_LAYER_RUN, global_batch_size=4, hidden_dropout=0, attention_dropout=0)


def _timers(level: int, option: str = "minmax") -> tuple[Timers, list[str]]:
    printed: list[str] = []
    return Timers(level, option, print_fn=printed.append), printed


def test_level_gates_timers_and_reports_are_megatrons_format():
    timers, printed = _timers(1)
    timers("forward-backward", log_level=1).set_elapsed(0.5)
    assert isinstance(timers("forward-compute", log_level=2), DummyTimer)  # above the level: no clock
    timers("forward-compute", log_level=2).start()  # and starting one costs nothing
    text = timers.log(["forward-backward", "forward-compute", "never-started"], normalizer=2)
    # ms per iteration: 0.5 s over 2 iterations; a timer no rank ran is left out.
    assert (
        text
        == "(min, max) time across ranks (ms):\n    forward-backward ...............................: (250.00, 250.00)"
    )
    assert printed == [text]
    assert timers.log(["forward-backward"]) is None  # log() reset it: nothing ran since

    timers, _ = _timers(0, "max")
    timers("evaluate", log_level=0).set_elapsed(0.012345)
    assert timers.log(["evaluate"]) == (
        "max time across ranks (ms):\n    evaluate .......................................: 12.35"
    )
    timers, _ = _timers(2, "all")
    timers("batch-generator", log_level=2).set_elapsed(0.003)
    assert (
        timers.log(["batch-generator"]) == "times across ranks (ms):\n  batch-generator:\n     rank  0: 3.00"
    )


def test_timer_accumulates_and_max_times_are_seconds_per_iteration():
    timers, _ = _timers(1)
    timer = timers("optimizer", log_level=1)
    for _ in range(2):
        timer.start()
        time.sleep(0.02)
        timer.stop()
    assert timers.max_times(["optimizer"], normalizer=2) == {"optimizer-time": pytest.approx(0.02, abs=0.015)}
    # max_times does not reset (Megatron's timers.write); the report after it does.
    seconds = timer.elapsed(reset=False)
    assert 0.04 <= seconds < 0.1
    with pytest.raises(RuntimeError, match="already been started"):
        timer.start()
        timer.start()
    with pytest.raises(ValueError, match="created with log level 1, not 2"):
        timers("optimizer", log_level=2)


def test_timers_to_log_by_level():
    assert timers_to_log(0) == []
    assert {"forward-backward", "optimizer", "all-grads-sync"} <= set(timers_to_log(1))
    assert "batch-generator" not in timers_to_log(1)
    assert {"batch-generator", "forward-compute", "backward-compute"} <= set(timers_to_log(2))


def _two_rank_reports(rank: int, world_size: int) -> dict:
    reports = {}
    for option in ("minmax", "max", "all"):
        printed: list[str] = []
        timers = Timers(1, option, print_fn=printed.append if rank == world_size - 1 else lambda _: None)
        timers("forward-backward", log_level=1).set_elapsed(0.1 * (rank + 1))
        if rank == 0:  # a timer only one rank ran is reported over that rank alone
            timers("all-grads-sync", log_level=1).set_elapsed(0.004)
        timers.log(["forward-backward", "all-grads-sync"])
        reports[option] = printed
    return reports


def test_reports_gather_over_ranks_and_print_on_the_last():
    rank0, rank1 = run_distributed(_two_rank_reports, 2)
    assert rank0 == {"minmax": [], "max": [], "all": []}
    label = "forward-backward ".ljust(48, ".")
    sync = "all-grads-sync ".ljust(48, ".")
    assert rank1["minmax"] == [
        f"(min, max) time across ranks (ms):\n    {label}: (100.00, 200.00)\n    {sync}: (4.00, 4.00)"
    ]
    assert rank1["max"] == [f"max time across ranks (ms):\n    {label}: 200.00\n    {sync}: 4.00"]
    assert rank1["all"] == [
        "times across ranks (ms):\n  forward-backward:\n     rank  0: 100.00\n     rank  1: 200.00"
        "\n  all-grads-sync:\n     rank  0: 4.00"
    ]


def _run(capsys, extra: str) -> tuple[list[dict], list[dict]]:
    capsys.readouterr()
    pretrain(parse_config(TINY + extra.split()))
    out = capsys.readouterr().out
    return parse_timer_blocks(out), [
        MEGATRON_LINE.match(line).groupdict() for line in out.splitlines() if MEGATRON_LINE.match(line)
    ]


def test_a_run_prints_the_timers_of_its_level(capsys):
    flags = "--train-iters 4 --log-interval 2 --eval-interval 4 --eval-iters 1"
    blocks, lines = _run(capsys, flags)
    # Level 0: only the one-off timers: set-up, then each evaluation (periodic, final validation, test).
    assert [list(b) for b in blocks] == [
        ["model-and-optimizer-setup", "train/valid/test-data-iterators-setup"],
        ["evaluate"],
        ["evaluate"],
        ["evaluate"],
    ]
    assert len(lines) == 2

    blocks, _ = _run(capsys, flags + " --timing-log-level 1")
    level1 = [
        "forward-backward",
        "optimizer-clip-main-grad",
        "optimizer-count-zeros",
        "optimizer-inner-step",
        "optimizer",
    ]
    assert [list(b) for b in blocks[1:3]] == [level1, level1]  # after each log line

    blocks, _ = _run(capsys, flags + " --timing-log-level 2 --timing-log-option max")
    per_line = blocks[1]
    assert list(per_line) == [*level1, "batch-generator", "forward-compute", "backward-compute"]
    assert all(len(v) == 1 for v in per_line.values())  # max only
    # forward-backward holds the micro batches' forward and backward; optimizer holds its steps.
    fb, fwd, bwd = (
        per_line["forward-backward"][0],
        per_line["forward-compute"][0],
        per_line["backward-compute"][0],
    )
    assert fb >= fwd + bwd - 0.02
    assert per_line["optimizer"][0] >= per_line["optimizer-inner-step"][0] - 0.01


def test_a_run_reports_every_rank_with_option_all(capsys):
    capsys.readouterr()
    flags = "--train-iters 2 --log-interval 2 --eval-iters 0 --timing-log-level 1 --timing-log-option all"
    pretrain(parse_config(TINY + flags.split()))
    out = capsys.readouterr().out
    assert "(min, max) time across ranks (ms):" not in out and "max time across ranks (ms):" not in out
    reports = [block for block in out.split("times across ranks (ms):\n")[1:]]
    assert len(reports) == 2  # the set-up timers, then the level-1 timers after the log line
    per_line = reports[1].splitlines()
    assert per_line[0] == "  forward-backward:"
    assert per_line[1].startswith("     rank  0: ") and float(per_line[1].split(": ")[1]) > 0


def test_checkpoint_timers(capsys, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    blocks, _ = _run(capsys, f"--train-iters 2 --eval-iters 0 --save {ckpt} --save-interval 2")
    assert [list(b) for b in blocks] == [
        ["model-and-optimizer-setup", "train/valid/test-data-iterators-setup"],
        ["save-checkpoint"],
    ]
    blocks, _ = _run(capsys, f"--train-iters 3 --eval-iters 0 --load {ckpt}")
    assert [list(b) for b in blocks[:2]] == [
        ["load-checkpoint"],
        ["model-and-optimizer-setup", "train/valid/test-data-iterators-setup"],
    ]
    # the setup time includes loading the checkpoint
    assert blocks[1]["model-and-optimizer-setup"][1] >= blocks[0]["load-checkpoint"][1] - 0.01
