"""Checkpoints in one process: layout, bit-exact round trips, crash safety, keep-last and user errors."""

from __future__ import annotations

import argparse
import errno
import json
import os
import pickle
import zlib

import pytest
import torch
import torch.distributed.checkpoint as dcp
from test_checkpointing_support import (
    VOCAB,
    build,
    draw_random_numbers,
    local_optimizer,
    make_cfg,
    seed_everything,
    snapshot,
    train_steps,
)

from megatron_lite.errors import UserError
from megatron_lite.parallel_state import ParallelState
from megatron_lite.training.checkpointing import (
    commit,
    load_checkpoint,
    load_model_weights,
    load_saved_config,
    read_full_tensors,
    read_latest_iteration,
    save_checkpoint,
)
from megatron_lite.training.state import TrainProgress

POINTER = "latest_checkpointed_iteration.txt"
ONE = ParallelState()


def trained(steps: int = 2, **overrides):
    cfg = make_cfg(**overrides)
    model, optimizer, scheduler = build(cfg)
    train_steps(model, optimizer, scheduler, cfg, ONE, range(steps))
    return cfg, model, optimizer, scheduler


def save(path, iteration, cfg, model, optimizer, scheduler, **kwargs):
    kwargs.setdefault("consumed_train_samples", iteration * cfg.global_batch_size)
    save_checkpoint(path, iteration, model, optimizer, scheduler, cfg, None, **kwargs)


def load_error(path, cfg, model, optimizer, scheduler) -> str:
    """The one-line UserError that loading `path` raises."""
    with pytest.raises(UserError) as caught:
        load_checkpoint(path, model, optimizer, scheduler, cfg, None)
    return str(caught.value)


def fresh(**overrides):
    """A model, optimizer and schedule that differ from the trained ones (other seed, more steps)."""
    cfg = make_cfg(**overrides)
    model, optimizer, scheduler = build(cfg, seed=77)
    train_steps(model, optimizer, scheduler, cfg, ONE, range(10, 15))
    return cfg, model, optimizer, scheduler


def assert_same(actual: dict, expected: dict, rows: int | None = None) -> None:
    """Parameters, owned Adam states and the buffer equal bit for bit (first `rows` vocab rows if given)."""

    def cut(name, tensor):
        if rows is not None and name.startswith(("embedding.word", "output_layer")) and tensor.dim() > 0:
            return tensor[:rows]
        return tensor

    assert actual["params"].keys() == expected["params"].keys()
    for name, value in expected["params"].items():
        assert torch.equal(cut(name, actual["params"][name]), cut(name, value)), name
    assert actual["states"].keys() == expected["states"].keys()
    for name, state in expected["states"].items():
        assert actual["states"][name].keys() == state.keys(), name
        for key, value in state.items():
            assert torch.equal(cut(name, actual["states"][name][key]), cut(name, value)), (name, key)
    assert torch.equal(actual["buffer"], expected["buffer"])


def assert_same_draws(actual: dict, expected: dict) -> None:
    assert actual["random"] == expected["random"]
    assert actual["np"] == expected["np"]
    assert torch.equal(actual["torch"], expected["torch"])
    assert torch.equal(actual["tracker"], expected["tracker"])


def test_layout_pointer_and_common_file(tmp_path):
    cfg, model, optimizer, scheduler = trained()
    save(tmp_path, 7, cfg, model, optimizer, scheduler, consumed_train_samples=14)

    assert sorted(os.listdir(tmp_path)) == ["iter_0000007", POINTER]
    assert (tmp_path / POINTER).read_text() == "7"
    assert read_latest_iteration(tmp_path) == 7
    ckpt = tmp_path / "iter_0000007"
    assert sorted(os.listdir(ckpt)) == [
        ".metadata",
        "__0_0.distcp",
        "checksums.json",
        "common.pt",
        "metadata.json",
        "rng_state_0.pt",
    ]
    # The manifest names every other file with its size and zlib CRC-32.
    manifest = json.loads((ckpt / "checksums.json").read_text())
    assert manifest["algorithm"] == "crc32"
    assert sorted(manifest["files"]) == [
        ".metadata",
        "__0_0.distcp",
        "common.pt",
        "metadata.json",
        "rng_state_0.pt",
    ]
    for name, entry in manifest["files"].items():
        data = (ckpt / name).read_bytes()
        assert entry == {"size": len(data), "crc32": zlib.crc32(data)}, name
    assert json.loads((ckpt / "metadata.json").read_text()) == {
        "sharded_backend": "torch_dist",
        "sharded_backend_version": 1,
        "common_backend": "torch",
        "common_backend_version": 1,
    }
    # common.pt is Megatron-LM's: `args` an argparse.Namespace (read through torch's allow-list), our
    # exact config, data position and layout beside it under "megatron_lite".
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt / "common.pt", weights_only=True)
    with torch.serialization.safe_globals([argparse.Namespace]):
        common = torch.load(ckpt / "common.pt", weights_only=True)
    assert common["checkpoint_version"] == 3.0
    assert common["iteration"] == 7
    args = common["args"]
    assert isinstance(args, argparse.Namespace)
    assert (args.hidden_size, args.padded_vocab_size, args.consumed_train_samples) == (8, 384, 14)
    assert args.ckpt_format == "torch_dist" and args.use_mcore_models
    assert common["opt_param_scheduler"] == scheduler.state_dict()
    groups = common["optimizer"]["optimizer"]["param_groups"]
    assert [g["step"] for g in groups] == [2.0] * len(groups)
    ours = common["megatron_lite"]
    assert ours["config"] == cfg.to_dict()
    assert ours["consumed_train_samples"] == 14
    assert ours["layout"] == {
        "world_size": 1,
        "tensor_model_parallel_size": 1,
        "data_parallel_size": 1,
        "pipeline_model_parallel_size": 1,
        "context_parallel_size": 1,
    }
    # Megatron's keys and shapes: the padded vocabulary [384, h], SwiGLU's fc1 in two pieces (gate, up),
    # Adam's moments as optimizer.state.<moment>.<key>, rng_state a ShardedObject of the (PP, TP) grid.
    metadata = dcp.FileSystemReader(ckpt).read_metadata().state_dict_metadata
    assert list(metadata["embedding.word_embeddings.weight"].size) == [384, 8]
    assert list(metadata["optimizer.state.exp_avg.output_layer.weight"].size) == [384, 8]
    fc1 = metadata["fc1.weight"]
    assert [(list(c.offsets), list(c.sizes)) for c in fc1.chunks] == [([0, 0], [32, 8]), ([32, 0], [32, 8])]
    assert "rng_state/shard_0.0_1.1" in metadata
    assert load_saved_config(tmp_path) == cfg


def test_save_then_load_is_bit_identical(tmp_path):
    seed_everything(11)
    cfg, model, optimizer, scheduler = trained(steps=3)
    extra = {"skipped_iterations": 1, "loss_scaler": {"scale": 1024.0, "growth_tracker": 3}}
    save(tmp_path, 3, cfg, model, optimizer, scheduler, consumed_train_samples=6, extra_state=extra)
    expected_draws = draw_random_numbers()
    expected = snapshot(model, optimizer)
    expected_schedule = scheduler.state_dict()
    expected_lrs = [group["lr"] for group in optimizer.param_groups]
    train_steps(model, optimizer, scheduler, cfg, ONE, range(3, 4))
    continued = snapshot(model, optimizer)

    seed_everything(99)
    _, model2, optimizer2, scheduler2 = fresh()
    model2.seen_tokens.zero_()
    progress = load_checkpoint(tmp_path, model2, optimizer2, scheduler2, cfg, None)

    assert progress == TrainProgress(3, 6, 1, extra)
    assert_same_draws(draw_random_numbers(), expected_draws)
    assert_same(snapshot(model2, optimizer2), expected)
    assert scheduler2.state_dict() == expected_schedule
    assert [group["lr"] for group in optimizer2.param_groups] == expected_lrs
    # Resuming continues exactly as the uninterrupted run did (Adam's step count included).
    train_steps(model2, optimizer2, scheduler2, cfg, ONE, range(3, 4))
    assert_same(snapshot(model2, optimizer2), continued)


def test_finetune_and_no_load_flags(tmp_path):
    cfg, model, optimizer, scheduler = trained(steps=3)
    save(tmp_path, 3, cfg, model, optimizer, scheduler)
    weights = snapshot(model, optimizer)["params"]

    for flags, expected_progress, expected_steps in (
        ({"finetune": True}, TrainProgress(), 0),
        ({"no_load_optim": True, "no_load_rng": True}, TrainProgress(3, 3, 0, {}), 3),
    ):
        load_cfg = make_cfg(**flags)
        model2, optimizer2, scheduler2 = build(load_cfg, seed=5)
        seed_everything(5)
        expected_draws = draw_random_numbers()
        seed_everything(5)
        progress = load_checkpoint(tmp_path, model2, optimizer2, scheduler2, load_cfg, None)
        assert progress == expected_progress, flags
        for name, value in weights.items():
            assert torch.equal(dict(model2.named_parameters())[name].detach(), value), (flags, name)
        assert len(local_optimizer(optimizer2).state) == 0, flags
        assert scheduler2.num_steps == expected_steps * load_cfg.global_batch_size, flags
        assert_same_draws(draw_random_numbers(), expected_draws)


def test_missing_checkpoint(tmp_path):
    cfg, model, optimizer, scheduler = trained(steps=0)
    assert load_checkpoint(tmp_path / "empty", model, optimizer, scheduler, cfg, None) is None
    assert read_latest_iteration(tmp_path / "empty") is None
    cfg.exit_on_missing_checkpoint = True
    assert load_error(tmp_path / "empty", cfg, model, optimizer, scheduler) == (
        f"--load {tmp_path / 'empty'} holds no checkpoint (latest_checkpointed_iteration.txt is missing) "
        "and --exit-on-missing-checkpoint is set"
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


def test_different_model_shape_is_one_line(tmp_path):
    cfg, model, optimizer, scheduler = trained(steps=0)
    save(tmp_path, 1, cfg, model, optimizer, scheduler)
    other_cfg, other_model, other_optimizer, other_scheduler = fresh(hidden_size=16)
    assert load_error(tmp_path, other_cfg, other_model, other_optimizer, other_scheduler) == (
        f"checkpoint {tmp_path / 'iter_0000001'} holds a different model: --hidden-size 8 in the checkpoint, "
        "16 given; give the checkpoint's model flags"
    )
    # Without a config to compare (tools/generate.py), the tensors themselves are checked.
    with pytest.raises(UserError) as caught:
        load_model_weights(other_model, tmp_path)
    assert str(caught.value) == (
        f"checkpoint {tmp_path / 'iter_0000001'} does not fit this model: embedding.word_embeddings.weight is "
        "[384, 8] in it, [384, 16] in the model; fc1.weight is [64, 8] in it, [128, 16] in the model; "
        "fc1.bias is [64] in it, [128] in the model (and 5 more)"
    )


@pytest.mark.parametrize(
    ("saved", "given", "expected"),
    [
        # An old run trained tanh GELU; resuming it without --openai-gelu would silently change the model.
        ({"openai_gelu": True}, {}, "--openai-gelu on in the checkpoint, off given"),
        ({}, {"qk_layernorm": True}, "--qk-layernorm off in the checkpoint, on given"),
        ({}, {"add_bias_linear": False}, "--disable-bias-linear off in the checkpoint, on given"),
        ({}, {"layernorm_zero_centered_gamma": True}, "--apply-layernorm-1p off in the checkpoint, on given"),
    ],
)
def test_different_model_switch_is_one_line(tmp_path, saved, given, expected):
    cfg, model, optimizer, scheduler = trained(steps=0, **saved)
    save(tmp_path, 1, cfg, model, optimizer, scheduler)
    other = fresh(**given)
    assert load_error(tmp_path, *other) == (
        f"checkpoint {tmp_path / 'iter_0000001'} holds a different model: {expected}; "
        "give the checkpoint's model flags"
    )


def test_other_vocab_padding_copies_the_true_rows(tmp_path):
    # --make-vocab-size-divisible-by 64 pads 257 to 320 rows instead of 384: the stored blocks no
    # longer line up, so the whole tensor is read and its true rows copied.
    cfg, model, optimizer, scheduler = trained()
    save(tmp_path, 2, cfg, model, optimizer, scheduler)
    load_cfg, model2, optimizer2, scheduler2 = fresh(make_vocab_size_divisible_by=64)
    assert load_cfg.padded_vocab_size == 320
    load_checkpoint(tmp_path, model2, optimizer2, scheduler2, load_cfg, None)
    loaded = snapshot(model2, optimizer2)
    assert_same(loaded, snapshot(model, optimizer), rows=VOCAB)
    assert loaded["params"]["output_layer.weight"].shape == (320, 8)
    assert torch.equal(
        loaded["states"]["output_layer.weight"]["exp_avg"][VOCAB:], torch.zeros(320 - VOCAB, 8)
    )


def test_load_model_weights_and_read_full_tensors(tmp_path):
    cfg, model, optimizer, scheduler = trained()
    save(tmp_path, 2, cfg, model, optimizer, scheduler)
    train_steps(model, optimizer, scheduler, cfg, ONE, range(2, 3))
    save(tmp_path, 3, cfg, model, optimizer, scheduler)
    latest = {n: p.detach().clone() for n, p in model.named_parameters()}

    model2, _, _ = build(make_cfg(), seed=3)
    assert load_model_weights(model2, tmp_path) == 3
    for name, value in latest.items():
        assert torch.equal(dict(model2.named_parameters())[name].detach(), value), name
    assert load_model_weights(model2, tmp_path, iteration=2) == 2

    full = read_full_tensors(tmp_path)
    assert sorted(full) == sorted([*latest, "seen_tokens"])
    assert full["embedding.word_embeddings.weight"].shape == (VOCAB, 8)
    for name, value in latest.items():
        expected = value[:VOCAB] if name.startswith(("embedding.word", "output_layer")) else value
        assert torch.equal(full[name], expected), name
    states = read_full_tensors(tmp_path, prefix="optimizer.state.")
    assert torch.equal(
        states["exp_avg_sq.fc2.weight"], local_optimizer(optimizer).state[model.fc2.weight]["exp_avg_sq"]
    )


def test_gpt_model_round_trip_gives_the_same_loss(tmp_path):
    from megatron_lite.core.models.gpt import GPTModel
    from megatron_lite.training.lr_schedule import OptimizerParamScheduler
    from megatron_lite.training.optimizer import build_optimizer

    def gpt(seed: int):
        cfg = make_cfg(hidden_size=32, num_attention_heads=4, seed=seed)
        model = GPTModel(cfg)
        optimizer = build_optimizer(model, cfg, ONE)
        return cfg, model, optimizer, OptimizerParamScheduler.from_config(optimizer, cfg)

    cfg, model, optimizer, scheduler = gpt(seed=1)
    train_steps(model, optimizer, scheduler, cfg, ONE, range(2))
    save(tmp_path, 2, cfg, model, optimizer, scheduler)
    _, model2, optimizer2, scheduler2 = gpt(seed=2)
    tokens = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    model.eval()
    model2.eval()
    assert not torch.equal(model(tokens, labels=tokens), model2(tokens, labels=tokens))
    load_checkpoint(tmp_path, model2, optimizer2, scheduler2, cfg, None)
    assert_same(snapshot(model2, optimizer2), snapshot(model, optimizer))
    assert torch.equal(model2(tokens, labels=tokens), model(tokens, labels=tokens))
