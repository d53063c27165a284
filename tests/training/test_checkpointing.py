"""Checkpoints in one process: layout, bit-exact round trips, what a load refuses, weights for inference."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import zlib

import pytest
import torch
import torch.distributed.checkpoint as dcp
from checkpoint_cases import ONE, POINTER, assert_same, assert_same_draws, fresh, load_error, save, trained
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
from megatron_lite.training.checkpointing import (
    load_checkpoint,
    load_model_weights,
    load_saved_config,
    read_full_tensors,
    read_latest_iteration,
)
from megatron_lite.training.state import TrainProgress


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
