"""--async-save in one process: the write runs behind training, the pointer moves only once it is complete,
the contents equal a synchronous save's, failures and kills keep the previous checkpoint; and the flags."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import run_python
from test_checkpointing_support import VOCAB, build, make_cfg, snapshot, train_steps
from test_fault_tolerance import TINY, config
from torch.distributed.checkpoint import FileSystemWriter, default_planner

from megatron_lite.arguments import parse_config
from megatron_lite.config.checkpointing import check_checkpointing
from megatron_lite.errors import UserError
from megatron_lite.parallel_state import ParallelState
from megatron_lite.training.checkpointing import (
    async_save_pending,
    finalize_async_save,
    load_checkpoint,
    read_full_tensors,
    read_latest_iteration,
    save_checkpoint,
    verify_checkpoint,
)
from megatron_lite.training.checkpointing.chunks import load_pickled
from megatron_lite.training.training import pretrain

POINTER = "latest_checkpointed_iteration.txt"
ONE = ParallelState()


def save(path, iteration, cfg, model, optimizer, scheduler) -> None:
    save_checkpoint(
        path, iteration, model, optimizer, scheduler, cfg, None, consumed_train_samples=iteration * 4
    )


def load_fresh(path, cfg):
    """A differently initialised model, optimizer and schedule with checkpoint `path` loaded into them."""
    model, optimizer, scheduler = build(make_cfg(), seed=77)
    train_steps(model, optimizer, scheduler, cfg, ONE, range(10, 12))
    progress = load_checkpoint(path, model, optimizer, scheduler, cfg, None)
    return progress, snapshot(model, optimizer)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_same_contents(ckpt_a: Path, ckpt_b: Path, iteration: int) -> None:
    """Every stored tensor equal, the RNG files and common.pt the same (but for --async-save and the paths)."""
    for prefix in ("model.", "optimizer.state."):
        tensors = read_full_tensors(ckpt_a, iteration, prefix=prefix)
        assert len(tensors) > 3
        assert_same_tensors(tensors, read_full_tensors(ckpt_b, iteration, prefix=prefix))
    name = f"iter_{iteration:07d}"
    assert (ckpt_a / name / "rng_state_0.pt").read_bytes() == (ckpt_b / name / "rng_state_0.pt").read_bytes()
    common_a, common_b = (load_pickled((c / name / "common.pt").read_bytes()) for c in (ckpt_a, ckpt_b))
    for common in (common_a, common_b):
        common["args"] = vars(common["args"])
    for part in ("args", "megatron_lite"):
        a = common_a[part] if part == "args" else common_a[part]["config"]
        b = common_b[part] if part == "args" else common_b[part]["config"]
        assert a.pop("async_save") != b.pop("async_save")
        for values in (a, b):  # the runs' own directories
            del values["save"], values["load"]
    assert common_a == common_b


def test_the_pointer_moves_only_after_the_write_and_the_state_is_the_one_at_save_time(tmp_path, monkeypatch):
    cfg = make_cfg(async_save=True)
    model, optimizer, scheduler = build(cfg)
    train_steps(model, optimizer, scheduler, cfg, ONE, range(2))
    save(tmp_path / "async", 2, cfg, model, optimizer, scheduler)
    assert async_save_pending()
    assert finalize_async_save(blocking=True) == 2
    train_steps(model, optimizer, scheduler, cfg, ONE, range(2, 3))
    save(tmp_path / "sync", 3, make_cfg(), model, optimizer, scheduler)  # the same state, written now
    at_save = snapshot(model, optimizer)

    # Hold the background writer before its first byte.
    entered, release = threading.Event(), threading.Event()
    real_write = FileSystemWriter.write_data

    def held_write(self, plan, planner):
        entered.set()
        assert release.wait(60)
        return real_write(self, plan, planner)

    monkeypatch.setattr(FileSystemWriter, "write_data", held_write)
    save(tmp_path / "async", 3, cfg, model, optimizer, scheduler)
    assert entered.wait(60)
    # While it is pending the pointer names iteration 2, which loads; 3 is only a temporary directory.
    names = sorted(os.listdir(tmp_path / "async"))
    assert names[0] == "iter_0000002" and names[1].startswith("iter_0000003.tmp-") and names[2:] == [POINTER]
    assert read_latest_iteration(tmp_path / "async") == 2
    assert finalize_async_save(blocking=False) is None
    assert load_fresh(tmp_path / "async", cfg)[0].iteration == 2
    # Training goes on changing every tensor being written.
    train_steps(model, optimizer, scheduler, cfg, ONE, range(3, 5))
    assert not torch.equal(model.fc1.weight, at_save["params"]["fc1.weight"])

    release.set()
    deadline = time.monotonic() + 60
    published = None
    while published is None and time.monotonic() < deadline:
        published = finalize_async_save(blocking=False)
        time.sleep(0.01)
    assert published == 3 and not async_save_pending()
    assert sorted(os.listdir(tmp_path / "async")) == ["iter_0000002", "iter_0000003", POINTER]
    assert read_latest_iteration(tmp_path / "async") == 3
    assert verify_checkpoint(tmp_path / "async" / "iter_0000003") is None
    assert_same_contents(tmp_path / "async", tmp_path / "sync", 3)
    progress, loaded = load_fresh(tmp_path / "async", cfg)
    assert progress.iteration == 3
    for name, value in at_save["params"].items():
        assert torch.equal(loaded["params"][name], value), name
    assert loaded["states"]["output_layer.weight"]["exp_avg"][:VOCAB].equal(
        at_save["states"]["output_layer.weight"]["exp_avg"][:VOCAB]
    )


def test_a_failed_background_write_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg = make_cfg(async_save=True)
    model, optimizer, scheduler = build(cfg)
    train_steps(model, optimizer, scheduler, cfg, ONE, range(2))
    save(tmp_path, 2, cfg, model, optimizer, scheduler)
    finalize_async_save()

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # DCP syncs each shard file, on the writer thread
    save(tmp_path, 3, cfg, model, optimizer, scheduler)  # returns: the write fails in the background
    with pytest.raises(UserError) as caught:
        finalize_async_save()
    monkeypatch.undo()
    assert str(caught.value) == (
        f"cannot save checkpoint iteration 3 to {tmp_path}: No space left on device; check that --save is a "
        "writable directory with free space (earlier checkpoints are untouched)"
    )
    assert not async_save_pending()
    assert sorted(os.listdir(tmp_path)) == ["iter_0000002", POINTER]
    assert load_fresh(tmp_path, cfg)[0].iteration == 2


def test_assume_constant_structure_reuses_the_save_plan(tmp_path, monkeypatch):
    global_plans = []
    real = default_planner.create_default_global_save_plan

    def counted(*args, **kwargs):
        global_plans.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(default_planner, "create_default_global_save_plan", counted)
    for constant in (False, True):
        cfg = make_cfg(ckpt_assume_constant_structure=constant)
        model, optimizer, scheduler = build(cfg)
        counts = []
        for iteration in (1, 2, 3):
            train_steps(model, optimizer, scheduler, cfg, ONE, range(iteration - 1, iteration))
            global_plans.clear()
            save(tmp_path / str(constant), iteration, cfg, model, optimizer, scheduler)
            counts.append(len(global_plans))
        # DCP plans every save from scratch, unless the structure is promised constant.
        assert counts[1:] == ([0, 0] if constant else [1, 1]), constant
        _, loaded = load_fresh(tmp_path / str(constant), cfg)
        for name, value in snapshot(model, optimizer)["params"].items():
            assert torch.equal(loaded["params"][name], value), (constant, name)
    for iteration in (1, 2, 3):
        assert_same_tensors(
            read_full_tensors(tmp_path / "True", iteration, prefix="optimizer.state."),
            read_full_tensors(tmp_path / "False", iteration, prefix="optimizer.state."),
        )


def test_flags_and_the_format_refusal():
    cfg = parse_config(TINY + ["--async-save", "--ckpt-assume-constant-structure", "--train-iters", "1"])
    assert (cfg.async_save, cfg.ckpt_assume_constant_structure) == (True, True)
    assert not any("async" in line or "constant" in line for line in cfg.startup_notices)
    check_checkpointing(cfg)
    cfg.ckpt_format = "torch"  # no other format is a choice today; Megatron refuses async saves of them
    with pytest.raises(UserError) as caught:
        check_checkpointing(cfg)
    assert str(caught.value) == "--async-save works with --ckpt-format torch_dist only, not torch"


# ---- whole runs ---------------------------------------------------------------------------------------
def test_async_and_sync_runs_write_the_same_checkpoints_and_resume_identically(tmp_path):
    straight = pretrain(config("--train-iters 6"))
    for mode in ("", "--async-save"):
        ckpt = tmp_path / (mode or "sync")
        flags = f"--train-iters 6 --save-interval 2 --save {ckpt} --load {ckpt} {mode}"
        first = pretrain(config(f"{flags} --exit-interval 4"))  # published before exit
        assert first.losses == straight.losses[:4], mode
        assert read_latest_iteration(ckpt) == 4
        resumed = pretrain(config(flags))
        assert resumed.losses == straight.losses[4:], mode
        assert sorted(os.listdir(ckpt)) == ["iter_0000002", "iter_0000004", "iter_0000006", POINTER]
    for iteration in (2, 4, 6):
        assert_same_contents(tmp_path / "--async-save", tmp_path / "sync", iteration)


# ---- SIGKILL while a checkpoint is written in the background --------------------------------------------
# As in test_fault_tolerance: the child SIGKILLs itself just before a file-system step of the save of
# iteration 4, here on the writer thread (shards, RNG file) while training goes on, or in the finalize.
KILL_DURING_SAVE = """
import os, signal, sys
from megatron_lite.arguments import parse_config
from megatron_lite.training.training import pretrain

kill_at, argv = sys.argv[1], sys.argv[2:]
started = []
def watch(real):
    def step(*args):
        where = os.readlink(f"/proc/self/fd/{args[0]}") if isinstance(args[0], int) else str(args[0])
        if started or "iter_0000004" in where:  # from the save of iteration 4 on
            started.append(where)
            if f"{real.__name__} {os.path.basename(where)}".startswith(kill_at):
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)
    return step
os.fsync, os.rename, os.replace = watch(os.fsync), watch(os.rename), watch(os.replace)
pretrain(parse_config(argv))
"""


@pytest.mark.parametrize(
    "kill_at",
    [
        "fsync __0_0.distcp",  # the writer thread's first shard, while iteration 5 trains
        pytest.param("fsync rng_state_0.pt", marks=pytest.mark.slow),  # the writer thread's last file
        # The finalize: every rank has written, rank 0's files are being written.
        pytest.param("fsync checksums.json", marks=pytest.mark.slow),
        "replace latest_checkpointed_iteration.txt.tmp-",  # renamed into place, the pointer not yet moved
    ],
)
def test_sigkill_during_an_async_save_keeps_the_previous_checkpoint_and_resumes(tmp_path, kill_at):
    ckpt = tmp_path / "ckpt"
    flags = f"--train-iters 6 --save-interval 2 --save {ckpt} --load {ckpt} --async-save"
    proc = run_python(["-c", KILL_DURING_SAVE, kill_at, *TINY, *flags.split()], tmp_path)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert read_latest_iteration(ckpt) == 2
    assert verify_checkpoint(ckpt / "iter_0000002") is None
    assert any(p.name.startswith("iter_0000004") for p in ckpt.iterdir())  # the write had begun
    resumed = pretrain(config(flags))
    straight = pretrain(config("--train-iters 6"))
    assert resumed.losses == straight.losses[2:]
    assert sorted(p.name for p in ckpt.iterdir()) == ["iter_0000002", "iter_0000004", "iter_0000006", POINTER]
