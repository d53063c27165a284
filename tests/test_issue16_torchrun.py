"""Under torchrun (2 ranks, gloo, loopback) a bad flag value or a damaged checkpoint is the project's one line, exit 2.

Every rank finds the same problem (flags are parsed alike, checkpoint damage is gathered from all ranks)
and prints the same line; torchrun then stops the other worker, which may be killed before it prints.
torchrun itself exits 1 with its own ChildFailedError report, whose root cause names exit code 2.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from file_fuzz_support import ITER_DIR, make_checkpoint
from helpers import PRETRAIN_GPT, subprocess_env, torchrun_args

FLAGS = (
    "--num-layers 1 --hidden-size 16 --num-attention-heads 2 --seq-length 8 --micro-batch-size 1 "
    "--mock-data --train-iters 1 --num-workers 0 --eval-iters 0 --lr 1e-3"
).split()


def _torchrun(tmp_path: Path, flags: list[str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    """torchrun of pretrain_gpt.py on 2 ranks; each rank's stderr is captured in its own log file."""
    logs = tmp_path / "logs"
    launcher = ["--standalone", "--redirects=3", f"--log-dir={logs}"]
    proc = subprocess.run(
        [sys.executable, *torchrun_args(PRETRAIN_GPT, [*FLAGS, *flags], nproc=2, launcher_flags=launcher)],
        cwd=tmp_path,
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=240,
    )
    ranks = sorted(logs.rglob("stderr.log"), key=lambda p: int(p.parent.name))
    assert [p.parent.name for p in ranks] == ["0", "1"], proc.stderr
    return proc, [p.read_text() for p in ranks]


def _assert_one_line_exit_2(proc: subprocess.CompletedProcess, stderrs: list[str], line: str) -> None:
    assert proc.returncode == 1, proc.stderr  # torchrun's own status when a worker fails
    root_cause = proc.stderr.split("Root Cause", 1)[-1]
    assert re.search(r"exitcode\s*:\s*2\b", root_cause), proc.stderr
    # Rank 0 always prints it; rank 1 prints the same line unless torchrun stopped it first.
    assert stderrs[0] == line + "\n"
    assert stderrs[1] in ("", line + "\n")
    assert not any("Traceback" in text for text in stderrs)


def test_bad_flag_value_is_each_ranks_one_line(tmp_path):
    proc, stderrs = _torchrun(tmp_path, ["--vocab-size", "64", "--lr", "nan"])
    _assert_one_line_exit_2(proc, stderrs, "error: --lr must be a finite number, got nan")


@pytest.mark.slow
def test_damaged_checkpoint_is_each_ranks_one_line(tmp_path):
    load_dir = make_checkpoint(tmp_path / "ckpt")
    common = load_dir / ITER_DIR / "common.pt"
    common.write_bytes(common.read_bytes()[:100])
    proc, stderrs = _torchrun(
        tmp_path, ["--vocab-size", "257", "--tokenizer-type", "ByteTokenizer", "--load", str(load_dir)]
    )
    start = f"error: no intact checkpoint in --load {load_dir} (iteration 2: {common} has 100 bytes, "
    assert stderrs[0].startswith(start), stderrs
    assert stderrs[0].endswith("or move the directory away to start from scratch\n"), stderrs
    _assert_one_line_exit_2(proc, stderrs, stderrs[0].rstrip("\n"))
