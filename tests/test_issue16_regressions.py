"""Issue 16's 21 cases by its wording (20 tracebacks and a checksum name outside the checkpoint): each one line now."""

# The 13 flag values are tests/test_config_ranges.py's cases, looked up here (not repeated) so that a case
# dropped there fails here. The blend and file cases run here, each through the loader the issue named.

from __future__ import annotations

import json

import pytest
import test_config_ranges as ranges
from file_fuzz_support import ITER_DIR, TRACKER, build_model, make_checkpoint, make_dataset, resign
from helpers import tiny_flags

from megatron_lite.arguments import parse_config
from megatron_lite.core.datasets.builder import parse_blend
from megatron_lite.errors import UserError
from megatron_lite.training.checkpointing import load_checkpoint, read_latest_iteration
from megatron_lite.training.training import pretrain

ISSUE_FLAG_CASES = {
    "--lr nan": ["--lr", "nan"],
    "--seed -1": ["--seed", "-1"],
    "--seed 2**40": ["--seed", str(2**40)],
    "--weight-decay -1": ["--weight-decay", "-1"],
    "--adam-beta1 1.5": ["--adam-beta1", "1.5"],
    "--adam-eps -1": ["--adam-eps", "-1"],
    "--init-method-std -1": ["--init-method-std", "-1"],
    "--num-attention-heads 0": ["--num-attention-heads", "0"],
    "--hidden-size 0": ["--hidden-size", "0"],
    "--log-interval 0": ["--log-interval", "0"],
    "--eval-interval 0": ["--eval-interval", "0"],
    "--save-interval 0": ["--save-interval", "0"],
    "--num-workers -1": ["--num-workers", "-1"],
}
ISSUE_FILE_CASES = [
    "a blend path that yields NaN sample counts",
    "a YAML file that is not UTF-8",
    "a latest_checkpointed_iteration.txt that is not UTF-8",
    "a truncated rng_state_0.pt",
    "a checksums.json of the wrong shape",
    "a --tensorboard-dir that exists as a file",
    "a --tensorboard-dir that cannot be created",
    "a checksums.json whose entry is ../../../../etc/hostname",
]


def _ranges_cases() -> dict[tuple[str, ...], str]:
    marks = ranges.test_out_of_range_values_are_one_line.pytestmark
    (params,) = [m.args[1] for m in marks if m.name == "parametrize"]
    return {tuple(flags): message for flags, message in params}


def test_the_issue_lists_21_cases():
    assert len(ISSUE_FLAG_CASES) + len(ISSUE_FILE_CASES) == 21


@pytest.mark.parametrize("wording", list(ISSUE_FLAG_CASES))
def test_flag_value(wording):
    flags = ISSUE_FLAG_CASES[wording]
    message = _ranges_cases().get(tuple(flags))
    assert message is not None, f"tests/test_config_ranges.py lost the case {wording}"
    ranges.test_out_of_range_values_are_one_line(flags, message)


def _error(action) -> str:
    with pytest.raises(UserError) as caught:
        action()
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf"])
def test_blend_weight_that_is_not_finite(weight):
    assert _error(lambda: parse_blend([weight, "a", "1", "b"], "--data-path")) == (
        f"--data-path: weights must be finite, non-negative and not all zero, got {weight} 1"
    )


def test_yaml_not_utf8(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"lr: 0.001\nname: caf\xe9\n")
    assert _error(lambda: parse_config(["--yaml-cfg", str(path)])) == (
        f"{path}: is not UTF-8 text (byte 19); save it as UTF-8 YAML"
    )


def test_tracker_not_utf8(tmp_path):
    (tmp_path / TRACKER).write_bytes(b"\xff\xfe1\x00")
    assert _error(lambda: read_latest_iteration(tmp_path)) == (
        f"{tmp_path / TRACKER}: is not UTF-8 text (byte 0); fix it or delete it"
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("issue16") / "ckpt"), build_model()


def _load_error(load_dir, model) -> str:
    cfg, module, optimizer, scheduler = model
    return _error(lambda: load_checkpoint(load_dir, module, optimizer, scheduler, cfg, None))


@pytest.mark.parametrize("manifest", ["kept", "rewritten"])
def test_truncated_rng_state(checkpoint, tmp_path, manifest):
    import shutil

    load_dir = shutil.copytree(checkpoint[0], tmp_path / "ckpt")
    rng = load_dir / ITER_DIR / "rng_state_0.pt"
    rng.write_bytes(rng.read_bytes()[:1000])
    if manifest == "rewritten":
        resign(load_dir / ITER_DIR)
        assert _load_error(load_dir, checkpoint[1]) == (
            f"{rng}: cannot be read as an RNG state (RuntimeError: truncated or damaged); restore it from a "
            "copy, or pass --no-load-rng to start fresh random streams"
        )
    else:
        message = _load_error(load_dir, checkpoint[1])
        assert message.startswith(
            f"no intact checkpoint in --load {load_dir} (iteration 2: {rng} has 1000 bytes"
        )


@pytest.mark.parametrize(
    ("files", "problem"),
    [
        (["common.pt"], "is unreadable or not a checksum list"),
        ({"../../../../etc/hostname": {"size": 1, "crc32": 0}}, "names '../../../../etc/hostname', which is not a file name inside the checkpoint"),
    ],
    ids=["wrong shape", "etc/hostname"],
)  # fmt: skip
def test_checksums_wrong_shape_or_outside_name(checkpoint, tmp_path, files, problem):
    import shutil

    load_dir = shutil.copytree(checkpoint[0], tmp_path / "ckpt")
    manifest = load_dir / ITER_DIR / "checksums.json"
    manifest.write_text(json.dumps({"algorithm": "crc32", "files": files}))
    assert _load_error(load_dir, checkpoint[1]) == (
        f"no intact checkpoint in --load {load_dir} (iteration 2: {manifest} {problem}); restore the damaged "
        "files from a copy, or move the directory away to start from scratch"
    )


@pytest.mark.parametrize("below", ["", "tb"], ids=["exists as a file", "cannot be created"])
def test_tensorboard_dir_a_file_or_not_creatable(tmp_path, below):
    # tests/training/test_log_outputs.py covers the other output directories and the command line.
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    given = a_file / below if below else a_file
    flags = [*tiny_flags(train_iters=1, vocab_size=64, num_workers=0), "--tensorboard-dir", str(given)]
    expected = f"--tensorboard-dir {given} " + (
        f"cannot be created: {a_file} is a file, not a directory" if below else "is a file, not a directory"
    )
    assert _error(lambda: pretrain(parse_config(flags))) == expected


def test_dataset_sizes_past_the_bin_end(tmp_path):
    """Not one of the 21, but the brief's .idx case: sizes that run past the .bin's end."""
    import numpy as np

    from megatron_lite.core.datasets.indexed_dataset import HEADER, IndexedDataset

    _, prefix = make_dataset(tmp_path)
    idx = f"{prefix}.idx"
    data = bytearray(open(idx, "rb").read())
    np.frombuffer(data, dtype=np.int32, count=1, offset=HEADER.size)[:] = 1000  # first sequence's length
    open(idx, "wb").write(bytes(data))
    assert "the index is corrupt, re-run preprocessing" in _error(lambda: IndexedDataset(prefix))
