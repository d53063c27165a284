"""The file readers' refusals (hostile .metadata, paths out of the checkpoint, trackers) and the CLI path end to end."""

from __future__ import annotations

import io
import pickle
import shutil

import pytest
from file_fuzz_support import ITER_DIR, TRACKER, make_checkpoint, resign
from helpers import PRETRAIN_GPT, run_python

from megatron_lite.errors import UserError
from megatron_lite.readers import read_json, read_yaml
from megatron_lite.readers.checkpoint import read_dcp_metadata, read_tracker

FLAGS = (
    "--num-layers 1 --hidden-size 16 --num-attention-heads 2 --seq-length 8 --micro-batch-size 1 --lr 1e-3 "
    "--mock-data --train-iters 3 --num-workers 0 --eval-iters 0 --vocab-size 257 --tokenizer-type ByteTokenizer"
).split()


class _RunsCode:
    """A pickle that would call print() when loaded by plain pickle.load, as DCP's own reader does."""

    def __reduce__(self):
        return (print, ("hostile .metadata ran",))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("readers") / "ckpt")


def _copy(checkpoint, tmp_path):
    return shutil.copytree(checkpoint, tmp_path / "ckpt")


def _error(action) -> str:
    with pytest.raises(UserError) as caught:
        action()
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_metadata_naming_code_is_refused_unrun(checkpoint, tmp_path, capsys):
    ckpt = _copy(checkpoint, tmp_path) / ITER_DIR
    (ckpt / ".metadata").write_bytes(pickle.dumps(_RunsCode()))
    assert _error(lambda: read_dcp_metadata(ckpt)) == (
        f"cannot read {ckpt / '.metadata'} (UnpicklingError: it refers to 'builtins.print', which DCP metadata "
        "never holds); the checkpoint is damaged: restore it from a copy or load another iteration"
    )
    assert "hostile .metadata ran" not in capsys.readouterr().out


@pytest.mark.parametrize("name", ["../../../../etc/hostname", "/etc/hostname", "sub/__0_0.distcp", ".."])
def test_metadata_storage_path_out_of_the_checkpoint_is_refused(checkpoint, tmp_path, name):
    ckpt = _copy(checkpoint, tmp_path) / ITER_DIR
    metadata = read_dcp_metadata(ckpt)
    next(iter(metadata.storage_data.values())).relative_path = name
    buffer = io.BytesIO()
    pickle.dump(metadata, buffer)
    (ckpt / ".metadata").write_bytes(buffer.getvalue())
    assert _error(lambda: read_dcp_metadata(ckpt)) == (
        f"{ckpt / '.metadata'} names {name!r}, which is not a file name inside {ckpt}; the file is damaged"
    )


def test_metadata_entry_missing_its_attributes_is_damage(checkpoint, tmp_path):
    ckpt = _copy(checkpoint, tmp_path) / ITER_DIR
    metadata = read_dcp_metadata(ckpt)
    del metadata.state_dict_metadata["embedding.word_embeddings.weight"].properties
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    assert _error(lambda: read_dcp_metadata(ckpt)) == (
        f"{ckpt / '.metadata'}: is not DCP metadata (AttributeError); the checkpoint is damaged: restore it "
        "from a copy or load another iteration"
    )


def test_storage_file_linked_out_of_the_checkpoint_is_refused(checkpoint, tmp_path):
    ckpt = _copy(checkpoint, tmp_path) / ITER_DIR
    outside = tmp_path / "elsewhere.distcp"
    shutil.move(ckpt / "__0_0.distcp", outside)
    (ckpt / "__0_0.distcp").symlink_to(outside)
    assert _error(lambda: read_dcp_metadata(ckpt)) == (
        f"{ckpt / '__0_0.distcp'} is a link to outside {ckpt}; copy the file into the directory instead"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [(b"release", 0), (b" 12\n", 12), (b"-1", None), (b"1_0", None), (b"\xd9\xa3", None), (b"9" * 19, None)],
)
def test_tracker_values(tmp_path, text, expected):
    path = tmp_path / TRACKER
    path.write_bytes(text)
    if expected is not None:
        assert read_tracker(path) == expected
    else:
        message = _error(lambda: read_tracker(path))
        assert (
            message == f"{path} holds {text.decode().strip()!r}, not an iteration number; fix it or delete it"
        )


def test_huge_tracker_and_deep_json_and_bad_yaml_dates(tmp_path):
    tracker = tmp_path / TRACKER
    tracker.write_bytes(b"1" * 100)
    assert _error(lambda: read_tracker(tracker)) == (
        f"{tracker}: longer than the 64 bytes such a file has; fix it or delete it"
    )
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    assert _error(lambda: read_json(deep, "fix it", expect=None)) == (
        f"{deep}: is not valid JSON (nested too deeply); fix it"
    )
    dates = tmp_path / "dates.yaml"
    dates.write_text("when: 2001-13-45\n")
    assert _error(lambda: read_yaml(dates, "fix it")).startswith(
        f"{dates}: holds a value YAML cannot build ("
    )


def _assert_one_line_exit_2(proc, starts: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: " + starts), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.slow  # about 6 s quiet; tests/test_issue16_torchrun.py pins the CLI path by default
def test_cli_tracker_not_utf8(checkpoint, tmp_path):
    load_dir = _copy(checkpoint, tmp_path)
    (load_dir / TRACKER).write_bytes(b"\xff2")
    proc = run_python([PRETRAIN_GPT, *FLAGS, "--load", load_dir], tmp_path)
    _assert_one_line_exit_2(proc, f"{load_dir / TRACKER}: is not UTF-8 text (byte 0)")


@pytest.mark.slow
def test_cli_hostile_metadata_and_truncated_rng(checkpoint, tmp_path):
    load_dir = _copy(checkpoint, tmp_path)
    ckpt = load_dir / ITER_DIR
    (ckpt / ".metadata").write_bytes(pickle.dumps(_RunsCode()))
    resign(ckpt)
    proc = run_python([PRETRAIN_GPT, *FLAGS, "--load", load_dir], tmp_path)
    _assert_one_line_exit_2(
        proc, f"cannot read {ckpt / '.metadata'} (UnpicklingError: it refers to 'builtins.print'"
    )
    assert "hostile .metadata ran" not in proc.stdout
    shutil.copy(checkpoint / ITER_DIR / ".metadata", ckpt / ".metadata")
    (ckpt / "rng_state_0.pt").write_bytes(b"PK\x03\x04")
    resign(ckpt)
    proc = run_python([PRETRAIN_GPT, *FLAGS, "--load", load_dir], tmp_path)
    _assert_one_line_exit_2(proc, f"{ckpt / 'rng_state_0.pt'}: cannot be read as an RNG state (")


@pytest.mark.slow
def test_cli_yaml_not_utf8_and_tools_on_a_damaged_checkpoint(checkpoint, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"lr: \xff\n")
    proc = run_python([PRETRAIN_GPT, "--yaml-cfg", path], tmp_path)
    _assert_one_line_exit_2(proc, f"{path}: is not UTF-8 text (byte 4)")
    load_dir = _copy(checkpoint, tmp_path)
    (load_dir / ITER_DIR / "common.pt").write_bytes(b"")
    generate = PRETRAIN_GPT.parent / "tools" / "generate.py"
    proc = run_python([generate, "--load", load_dir, "--prompt", "hi", "--max-new-tokens", "1"], tmp_path)
    _assert_one_line_exit_2(proc, "")
    assert str(load_dir) in proc.stderr
