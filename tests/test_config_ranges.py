"""Every numeric setting has a range, checked once with a line naming the flag (issue 16's cases)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megatron_lite.arguments import parse_config
from megatron_lite.config import config_fields
from megatron_lite.config.ranges import RANGES, numeric_fields
from megatron_lite.errors import UserError
from tests.helpers import PRETRAIN_GPT, tiny_flags


def test_every_numeric_field_has_a_range():
    fields = {f.name for f in config_fields()}
    assert sorted(set(numeric_fields(config_fields())) - set(RANGES)) == []
    assert sorted(set(RANGES) - fields) == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lr", "nan"], "--lr must be a finite number, got nan"),
        (["--lr", "inf"], "--lr must be a finite number, got inf"),
        (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
        (["--seed", str(2**40)], f"--seed must be in [0, 2**32), got {2**40}"),
        (["--weight-decay", "-1"], "--weight-decay must be >= 0, got -1.0"),
        (["--adam-beta1", "1.5"], "--adam-beta1 must be in [0, 1), got 1.5"),
        (["--adam-eps", "-1"], "--adam-eps must be positive, got -1.0"),
        (["--init-method-std", "-1"], "--init-method-std must be >= 0, got -1.0"),
        (["--num-attention-heads", "0"], "--num-attention-heads must be positive, got 0"),
        (["--hidden-size", "0"], "--hidden-size must be positive, got 0"),
        (["--log-interval", "0"], "--log-interval must be positive, got 0"),
        (["--eval-interval", "0"], "--eval-interval must be positive, got 0"),
        (["--save-interval", "0"], "--save-interval must be positive, got 0"),
        (["--num-workers", "-1"], "--num-workers must be >= 0, got -1"),
        (["--attention-dropout", "1"], "--attention-dropout must be in [0, 1), got 1.0"),
        (["--rotary-percent", "0"], "--rotary-percent must be in (0, 1], got 0.0"),
    ],
)
def test_out_of_range_values_are_one_line(flags, message):
    with pytest.raises(UserError) as caught:
        parse_config(tiny_flags() + flags).finalize(1, 257)
    assert str(caught.value) == message


def test_out_of_range_is_exit_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(PRETRAIN_GPT),
            *tiny_flags(),
            "--lr",
            "nan",
            "--mock-data",
            "--vocab-size",
            "64",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert (proc.returncode, proc.stderr.strip()) == (2, "error: --lr must be a finite number, got nan")


def test_yaml_rampup_of_the_wrong_length_is_one_line(tmp_path):
    # Found by the fuzz test: a YAML scalar became a one-item list, then an unpacking traceback.
    path = tmp_path / "cfg.yaml"
    path.write_text("rampup_batch_size: 0\ntrain_samples: 64\n")
    flags = [f for f in tiny_flags() if f != "--train-iters"]
    with pytest.raises(UserError) as caught:
        parse_config(["--yaml-cfg", str(path), *flags]).finalize(1, 257)
    assert str(caught.value) == (
        "--rampup-batch-size takes three numbers (start batch, increment, ramp-up samples), got 0"
    )
