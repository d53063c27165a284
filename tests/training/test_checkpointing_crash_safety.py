"""Checkpoints in one process: unreadable pointers, crashes during save, retention, full or unwritable disks."""

from __future__ import annotations

import errno
import os

import pytest
from checkpoint_cases import ONE, POINTER, assert_same, fresh, load_error, save, trained
from test_checkpointing_support import (
    make_cfg,
    snapshot,
    train_steps,
)

from megatron_lite.errors import UserError
from megatron_lite.training.checkpointing import (
    commit,
    load_checkpoint,
    read_latest_iteration,
)


def test_unreadable_pointer_and_missing_parts(tmp_path):
    (tmp_path / POINTER).write_text("abc\n")
    with pytest.raises(UserError) as caught:
        read_latest_iteration(tmp_path)
    assert (
        str(caught.value) == f"{tmp_path / POINTER} holds 'abc', not an iteration number; fix it or delete it"
    )

    (tmp_path / POINTER).write_text("5")
    cfg, model, optimizer, scheduler = trained(steps=0)
    assert load_error(tmp_path, cfg, model, optimizer, scheduler) == (
        f"{tmp_path / POINTER} names iteration 5 but {tmp_path / 'iter_0000005'} does not exist"
    )

    save(
        tmp_path / "no_optim", 1, make_cfg(no_save_optim=True, no_save_rng=True), model, optimizer, scheduler
    )
    assert load_error(tmp_path / "no_optim", cfg, model, optimizer, scheduler) == (
        f"checkpoint {tmp_path / 'no_optim' / 'iter_0000001'} holds no optimizer state (saved with --no-save-optim); "
        "pass --no-load-optim or --finetune"
    )
    cfg.no_load_optim = True
    assert load_error(tmp_path / "no_optim", cfg, model, optimizer, scheduler) == (
        f"checkpoint {tmp_path / 'no_optim' / 'iter_0000001'} holds no RNG state (saved with --no-save-rng); "
        "pass --no-load-rng"
    )


@pytest.mark.parametrize("crash", [RuntimeError, KeyboardInterrupt])
def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch, crash):
    cfg, model, optimizer, scheduler = trained()
    save(tmp_path, 2, cfg, model, optimizer, scheduler)
    expected = snapshot(model, optimizer)
    train_steps(model, optimizer, scheduler, cfg, ONE, range(2, 3))

    def crash_after_partial_write(tmp, common, checksums):
        # The DCP shards and RNG file are already written; common.pt is half written when we die.
        assert (tmp / "__0_0.distcp").exists() and (tmp / "rng_state_0.pt").exists()
        (tmp / "common.pt").write_bytes(b"\x80\x02half a pickle")
        raise crash("simulated crash")

    monkeypatch.setattr(commit, "write_common_files", crash_after_partial_write)
    with pytest.raises(crash, match="simulated crash"):
        save(tmp_path, 3, cfg, model, optimizer, scheduler)
    monkeypatch.undo()

    assert sorted(os.listdir(tmp_path)) == ["iter_0000002", POINTER]
    assert (tmp_path / POINTER).read_text() == "2"
    _, model2, optimizer2, scheduler2 = fresh()
    assert load_checkpoint(tmp_path, model2, optimizer2, scheduler2, cfg, None).iteration == 2
    assert_same(snapshot(model2, optimizer2), expected)


def test_stray_temporary_directory_is_ignored_then_removed(tmp_path):
    cfg, model, optimizer, scheduler = trained()
    save(tmp_path, 2, cfg, model, optimizer, scheduler)
    expected = snapshot(model, optimizer)
    # What a save killed mid-write leaves: a half-written directory and a pointer that never moved.
    stray = tmp_path / "iter_0000004.tmp-0badc0de"
    stray.mkdir()
    (stray / "__0_0.distcp").write_bytes(b"half")
    (tmp_path / f"{POINTER}.tmp-0badc0de").write_text("4")

    assert read_latest_iteration(tmp_path) == 2
    _, model2, optimizer2, scheduler2 = fresh()
    assert load_checkpoint(tmp_path, model2, optimizer2, scheduler2, cfg, None).iteration == 2
    assert_same(snapshot(model2, optimizer2), expected)

    save(tmp_path, 4, cfg, model, optimizer, scheduler)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000002", "iter_0000004", POINTER]


def test_resaving_an_iteration_replaces_it_and_survives_a_crash_between_renames(tmp_path, monkeypatch):
    cfg, model, optimizer, scheduler = trained()
    save(tmp_path, 2, cfg, model, optimizer, scheduler)
    first = snapshot(model, optimizer)
    train_steps(model, optimizer, scheduler, cfg, ONE, range(2, 3))
    second = snapshot(model, optimizer)

    # Die after the old directory is parked and before the new one is renamed into place.
    real_rename = os.rename
    calls = []

    def rename_then_die(src, dst):
        if os.path.basename(src).startswith("iter_"):  # DCP renames its own .metadata.tmp
            calls.append((os.path.basename(src), os.path.basename(dst)))
            if len(calls) == 2:
                raise OSError(errno.EIO, "Input/output error")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename_then_die)
    with pytest.raises(UserError, match="Input/output error"):
        save(tmp_path, 2, cfg, model, optimizer, scheduler)
    monkeypatch.undo()
    assert calls[0][0] == "iter_0000002" and calls[0][1].startswith("iter_0000002.old-")
    assert calls[1][0].startswith("iter_0000002.tmp-") and calls[1][1] == "iter_0000002"
    _, model2, optimizer2, scheduler2 = fresh()
    assert load_checkpoint(tmp_path, model2, optimizer2, scheduler2, cfg, None).iteration == 2
    assert_same(snapshot(model2, optimizer2), first)

    save(tmp_path, 2, cfg, model, optimizer, scheduler)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000002", POINTER]
    _, model3, optimizer3, scheduler3 = fresh()
    load_checkpoint(tmp_path, model3, optimizer3, scheduler3, cfg, None)
    assert_same(snapshot(model3, optimizer3), second)


def test_save_keep_last(tmp_path):
    cfg, model, optimizer, scheduler = trained(steps=1, save_keep_last=2)
    for iteration in range(1, 5):
        save(tmp_path, iteration, cfg, model, optimizer, scheduler)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000003", "iter_0000004", POINTER]
    # Saving an earlier iteration (a rewound run) never deletes the later checkpoints.
    save(tmp_path, 2, cfg, model, optimizer, scheduler)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000002", "iter_0000003", "iter_0000004", POINTER]
    assert read_latest_iteration(tmp_path) == 2


def test_save_retain_interval_keeps_multiples_and_the_newest(tmp_path):
    # Megatron's --save-retain-interval 4 with --save-interval 2: 2 goes when 4 is saved, 6 when 8 is.
    cfg, model, optimizer, scheduler = trained(steps=1, save_interval=2, save_retain_interval=4)
    seen = []
    for iteration in (2, 4, 6, 8, 10):
        save(tmp_path, iteration, cfg, model, optimizer, scheduler)
        seen.append(sorted(name for name in os.listdir(tmp_path) if name != POINTER))
    assert seen == [
        ["iter_0000002"],
        ["iter_0000004"],
        ["iter_0000004", "iter_0000006"],
        ["iter_0000004", "iter_0000008"],
        ["iter_0000004", "iter_0000008", "iter_0000010"],
    ]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"save_retain_interval": 0}, "--save-retain-interval must be positive, got 0"),
        ({"save_retain_interval": 3}, "--save-retain-interval 3 must be a multiple of --save-interval 2"),
    ],
)
def test_bad_save_retain_interval_is_one_line(flags, message):
    with pytest.raises(UserError) as caught:
        make_cfg(save_interval=2, **flags)
    assert str(caught.value) == message


def test_disk_full_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg, model, optimizer, scheduler = trained()
    save(tmp_path, 2, cfg, model, optimizer, scheduler)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # DCP syncs each shard file as it writes it
    with pytest.raises(UserError) as caught:
        save(tmp_path, 3, cfg, model, optimizer, scheduler)
    monkeypatch.undo()
    assert str(caught.value) == (
        f"cannot save checkpoint iteration 3 to {tmp_path}: No space left on device; check that --save is a "
        "writable directory with free space (earlier checkpoints are untouched)"
    )
    assert sorted(os.listdir(tmp_path)) == ["iter_0000002", POINTER]
    assert (tmp_path / POINTER).read_text() == "2"


def test_unwritable_save_directory_is_one_line(tmp_path):
    cfg, model, optimizer, scheduler = trained(steps=0)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError) as caught:
        save(blocker / "ckpt", 1, cfg, model, optimizer, scheduler)
    assert str(caught.value) == (
        f"cannot save checkpoint iteration 1 to {blocker / 'ckpt'}: Not a directory; check that --save is a "
        "writable directory with free space (earlier checkpoints are untouched)"
    )
