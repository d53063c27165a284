"""Fuzzing every config field through flags and YAML: a bad value is one UserError line, never a traceback."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from megatron_lite.arguments import parse_config  # noqa: E402
from megatron_lite.arguments.megatron_flags import flags_by_dest  # noqa: E402
from megatron_lite.config import config_fields  # noqa: E402
from megatron_lite.errors import UserError  # noqa: E402
from tests.helpers import tiny_flags  # noqa: E402

FIELDS = sorted(f.name for f in config_fields() if f.name in flags_by_dest())
# As typed on a command line: NaN, infinities, zero, negatives, huge, fractional and wrong-typed values.
FLAG_VALUES = ["nan", "inf", "-inf", "0", "-1", "-0.5", "1e30", str(2**70), "0.5", "abc", "", "1,2", "../x"]
# As a YAML file gives them: the same, plus lists, mappings, booleans and null.
YAML_VALUES = [
    math.nan,
    math.inf,
    -math.inf,
    0,
    -1,
    -0.5,
    1e30,
    2**70,
    0.5,
    "abc",
    "",
    [1, 2],
    {"a": 1},
    True,
    None,
]


def _finalize_or_user_error(argv: list[str]) -> None:
    """The property: the config either finalizes, or stops with a UserError / argparse's exit 2."""
    try:
        parse_config(argv).finalize(1, 257)
    except UserError as err:
        assert "\n" not in str(err) and str(err)
    except SystemExit as err:
        assert err.code == 2


def _flag_case(name: str, value: str) -> list[str]:
    return [*tiny_flags(train_iters=4), flags_by_dest()[name].option, value]


def _yaml_case(directory: Path, name: str, value: object) -> list[str]:
    path = directory / "cfg.yaml"
    path.write_text(yaml.safe_dump({name: value}))
    return ["--yaml-cfg", str(path), *tiny_flags(train_iters=4)]


def _check(examples: int):
    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,  # nothing written into the checkout
    )
    @given(st.sampled_from(FIELDS), st.sampled_from(FLAG_VALUES), st.sampled_from(YAML_VALUES))
    def run(name, flag_value, yaml_value):
        _finalize_or_user_error(_flag_case(name, flag_value))
        with tempfile.TemporaryDirectory() as tmp:
            _finalize_or_user_error(_yaml_case(Path(tmp), name, yaml_value))

    run()


def test_every_field_survives_bad_values_through_flags_and_yaml():
    _check(200)


@pytest.mark.slow
def test_every_field_survives_bad_values_many_draws():
    _check(5000)
