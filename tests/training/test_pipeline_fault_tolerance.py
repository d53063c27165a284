"""A SIGKILL of the last pipeline stage's rank under torchrun --max-restarts: the restart resumes from the
newest checkpoint and reproduces the uninterrupted PP=2 run's losses (dropout on)."""

from __future__ import annotations

import os
import signal

import pytest
from test_fault_tolerance_torchrun import at_iteration, losses_by_iteration, torchrun

from megatron_lite.training.checkpointing import read_latest_iteration

pytestmark = pytest.mark.slow
PP2 = ["--pipeline-model-parallel-size", "2"]


def test_sigkill_in_the_last_stage_restarts_and_reproduces_the_losses(tmp_path):
    (tmp_path / "straight").mkdir()
    status, text = torchrun(tmp_path / "straight", PP2)
    assert status == 0, text[-3000:]
    straight = losses_by_iteration(text)
    assert sorted(straight) == list(range(1, 9))
    ckpt = tmp_path / "ckpt"

    def kill(line, workers):
        if at_iteration(5)(line):
            os.kill(workers()[1], signal.SIGKILL)  # rank 1: the last stage
            return True
        return False

    status, text = torchrun(
        tmp_path,
        [*PP2, "--save", str(ckpt), "--load", str(ckpt), "--save-interval", "2"],
        max_restarts=1,
        on_line=kill,
    )
    assert status == 0, text[-3000:]
    assert text.count("> resuming from") == 1
    resumed = losses_by_iteration(text)
    assert sorted(resumed) == list(range(1, 9))
    # Every iteration's line (the replayed ones last) has the uninterrupted run's consumed samples and loss.
    assert resumed == straight
    assert read_latest_iteration(ckpt) == 8
