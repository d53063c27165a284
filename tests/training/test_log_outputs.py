"""wandb (offline) logs the TensorBoard scalars; unusable --tensorboard-dir / --wandb-save-dir are one line and
leave nothing behind."""

import glob
import json
import os
import struct
import sys
import time

import pytest
from dist_utils import run_distributed
from helpers import ONE_LAYER_RUN, PRETRAIN_GPT, run_python, tiny_flags

from megatron_lite.arguments import parse_config
from megatron_lite.errors import UserError
from megatron_lite.parallel_state import initialize_parallel
from megatron_lite.training.training import pretrain
from megatron_lite.training.wandb_writer import wandb_mode

TINY = tiny_flags(**ONE_LAYER_RUN, global_batch_size=4, hidden_dropout=0, attention_dropout=0)


def wandb_records(run_file: str) -> list:
    """The protobuf records of a wandb run file (a LevelDB-style log: 32 KiB blocks of framed chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = open(run_file, "rb").read()
    if len(data) < 7:  # not written yet
        return []
    assert data[:4] == b":W&B"
    block, pos, chunks, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def wandb_history(run_dir: str) -> dict[int, dict[str, float]]:
    """{step: {key: value}} of what the run logged."""
    (run_file,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    # wandb's service process writes the file after run.finish() returns: wait for its exit record.
    deadline = time.monotonic() + 60
    records = wandb_records(run_file)
    while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
        time.sleep(0.2)
        records = wandb_records(run_file)
    rows = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            rows[row["_step"]] = {k: v for k, v in row.items() if not k.startswith("_")}
    return rows


def test_wandb_offline_run_holds_the_logged_scalars(tmp_path, monkeypatch, capsys):
    # No WANDB_MODE and no credentials (no WANDB_API_KEY, no ~/.netrc): an offline run.
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    save_dir = tmp_path / "wandb-files"
    flags = (
        "--train-iters 4 --log-interval 2 --eval-interval 2 --eval-iters 1 --log-timers-to-tensorboard "
        "--log-memory-to-tensorboard --log-validation-ppl-to-tensorboard "
        f"--timing-log-level 1 --wandb-project lite --wandb-exp-name tiny --wandb-save-dir {save_dir}"
    )
    result = pretrain(parse_config(TINY + flags.split()))
    assert "WANDB_MODE" not in os.environ  # offline by argument, the environment is left alone
    (run_dir,) = glob.glob(str(save_dir / "wandb" / "offline-run-*"))
    assert f"> wandb (offline) run in {run_dir}" in capsys.readouterr().out
    history = wandb_history(run_dir)
    assert sorted(history) == [1, 2, 3, 4]
    every = {"samples vs steps", "learning-rate", "batch-size", "lm loss", "loss-scale", "grad-norm"}
    assert set(history[1]) == every
    timers = (
        "forward-backward",
        "optimizer-clip-main-grad",
        "optimizer-count-zeros",
        "optimizer-inner-step",
        "optimizer",
    )
    at_log = {"iteration-time", "lm loss validation", *(f"{name}-time" for name in timers)}
    # mem-* and the ppl go to TensorBoard only, as in Megatron.
    assert set(history[2]) == every | at_log
    assert set(history[4]) == every | at_log  # the final validation and test at step 4 too
    assert [history[s]["lm loss"] for s in (1, 2, 3, 4)] == pytest.approx(
        [v for _, v in result.losses], rel=1e-6
    )
    assert [history[s]["samples vs steps"] for s in (1, 2, 3, 4)] == [4, 8, 12, 16]
    assert history[2]["lm loss validation"] == pytest.approx(result.validation_losses[0][1], rel=1e-6)
    # Three at step 4 under Megatron's one tag (periodic, final validation, test): wandb keeps the last.
    assert history[4]["lm loss validation"] == pytest.approx(result.test_loss, rel=1e-6)


def test_wandb_config_errors():
    def fails(flags):
        with pytest.raises(UserError) as caught:
            pretrain(parse_config(TINY + "--train-iters 1".split() + flags))
        return str(caught.value)

    assert fails(["--wandb-project", "p", "--wandb-exp-name", "e"]) == (
        "--wandb-project needs --wandb-save-dir DIR (or --save, whose wandb/ folder is the default)"
    )
    # Megatron: "Please specify the wandb experiment name!" (its default is empty).
    needs_name = "--wandb-project needs --wandb-exp-name NAME, the wandb run's name (as in Megatron)"
    assert fails(["--wandb-project", "p", "--wandb-save-dir", "x"]) == needs_name
    assert fails(["--wandb-project", "p", "--wandb-exp-name", "", "--wandb-save-dir", "x"]) == needs_name
    # An empty project is Megatron's default: no wandb at all (and no name needed).
    assert pretrain(parse_config(TINY + "--train-iters 1 --eval-iters 0 --wandb-project".split() + [""]))


def test_wandb_mode_follows_the_environment_and_credentials(tmp_path):
    netrc = tmp_path / "netrc"
    assert wandb_mode({}, str(tmp_path / "none")) == "offline"
    assert wandb_mode({"WANDB_MODE": "disabled", "WANDB_API_KEY": "k"}, str(netrc)) == "disabled"
    assert wandb_mode({"WANDB_API_KEY": "k"}, str(tmp_path / "none")) == "online"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    netrc.chmod(0o600)
    assert wandb_mode({}, str(netrc)) == "online"  # what `wandb login` writes
    assert wandb_mode({"WANDB_BASE_URL": "https://wandb.example.com"}, str(netrc)) == "offline"


def test_missing_wandb_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    flags = f"--train-iters 1 --wandb-project p --wandb-exp-name e --wandb-save-dir {tmp_path / 'w'}"
    cfg = parse_config(TINY + flags.split())
    with pytest.raises(UserError) as caught:
        pretrain(cfg)
    assert str(caught.value) == (
        "--wandb-project needs the wandb package: pip install 'megatron-lite[wandb]' (or pip install wandb)"
    )
    assert not (tmp_path / "w").exists()


def test_unusable_output_dirs_are_one_line_and_leave_nothing(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    tensorboard, wandb_dir = tmp_path / "tb" / "run1", tmp_path / "wb"

    def fails(flags):
        with pytest.raises(UserError) as caught:
            pretrain(parse_config(TINY + "--train-iters 1".split() + flags))
        return str(caught.value)

    assert (
        fails(["--tensorboard-dir", str(a_file)]) == f"--tensorboard-dir {a_file} is a file, not a directory"
    )
    assert fails(["--tensorboard-dir", f"{a_file}/sub/dir"]) == (
        f"--tensorboard-dir {a_file}/sub/dir cannot be created: {a_file} is a file, not a directory"
    )
    # A bad wandb directory stops the run before the (good) TensorBoard directory is created.
    flags = [
        "--tensorboard-dir",
        str(tensorboard),
        "--wandb-project",
        "p",
        "--wandb-exp-name",
        "e",
        "--wandb-save-dir",
        str(a_file),
    ]
    assert fails(flags) == f"--wandb-save-dir {a_file} is a file, not a directory"
    # ... and the other way round.
    flags = [
        "--tensorboard-dir",
        str(a_file),
        "--wandb-project",
        "p",
        "--wandb-exp-name",
        "e",
        "--wandb-save-dir",
        str(wandb_dir),
    ]
    assert fails(flags) == f"--tensorboard-dir {a_file} is a file, not a directory"
    flags = ["--wandb-project", "p", "--wandb-exp-name", "e", "--save", str(a_file), "--save-interval", "5"]
    assert fails(flags) == (
        f"--save (its wandb folder) {a_file}/wandb cannot be created: {a_file} is a file, not a directory"
    )
    assert sorted(os.listdir(tmp_path)) == ["a-file"]
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert fails(["--tensorboard-dir", str(locked / "tb")]) == (
            f"--tensorboard-dir {locked / 'tb'} cannot be created: {locked} is not writable"
        )


def test_the_command_line_prints_one_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    proc = run_python([PRETRAIN_GPT, *TINY, "--train-iters", "1", "--tensorboard-dir", "a-file"], tmp_path)
    assert (proc.returncode, proc.stderr) == (
        2,
        "error: --tensorboard-dir a-file is a file, not a directory\n",
    )
    proc = run_python([PRETRAIN_GPT, *TINY, "--train-iters", "1", "--tensorboard-dir", "a-file/tb"], tmp_path)
    assert (proc.returncode, proc.stderr) == (
        2,
        "error: --tensorboard-dir a-file/tb cannot be created: a-file is a file, not a directory\n",
    )
    assert sorted(os.listdir(tmp_path)) == ["a-file"]


def _bad_tensorboard_on_two_ranks(rank: int, world_size: int, path: str) -> str:
    try:
        # highest: no matmul-path measurement in each fresh process
        flags = ["--train-iters", "1", "--fp32-matmul-precision", "highest", "--tensorboard-dir", path]
        pretrain(parse_config(TINY + flags), initialize_parallel(1))
    except UserError as err:
        return str(err)
    return "no error"


def test_every_rank_stops_when_the_last_cannot_open_its_logs(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    errors = run_distributed(_bad_tensorboard_on_two_ranks, 2, str(a_file))
    assert errors == [
        "the last rank could not open --tensorboard-dir or the wandb directory; see its error",
        f"--tensorboard-dir {a_file} is a file, not a directory",
    ]
