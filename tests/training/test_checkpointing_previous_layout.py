"""Checkpoints of this project's previous layout ("model."-prefixed keys, layouts in common.pt) still load."""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from checkpoint_cases import ONE, POINTER, assert_same, assert_same_draws, fresh, save, trained
from test_checkpointing_support import draw_random_numbers, seed_everything, snapshot

from megatron_lite.training.checkpointing import load_checkpoint, load_saved_config, read_full_tensors
from megatron_lite.training.checkpointing.common import build_previous_common, write_common_files
from megatron_lite.training.checkpointing.rng import capture_rng
from megatron_lite.training.checkpointing.state_dict import model_shards, optimizer_shards


def write_previous_layout(path, iteration, cfg, model, optimizer, scheduler, consumed: int) -> None:
    """A checkpoint as this project wrote it before it took Megatron's layout ("model."-prefixed keys,
    vocabulary blocks, layouts in common.pt)."""
    ckpt = path / f"iter_{iteration:07d}"
    ckpt.mkdir(parents=True)
    shards, layouts = model_shards(model, cfg, ONE)
    optim_shards, optim_layouts, groups = optimizer_shards(optimizer, model, cfg, ONE)
    shards.update(optim_shards)
    layouts.update(optim_layouts)
    dcp.save(shards, storage_writer=dcp.FileSystemWriter(ckpt, single_file_per_rank=True), no_dist=True)
    torch.save(capture_rng(ONE), ckpt / "rng_state_0.pt")
    common = build_previous_common(iteration, consumed, cfg, scheduler, groups, ONE, layouts, None)
    write_common_files(ckpt, common, {})
    (path / POINTER).write_text(str(iteration))


def test_checkpoints_of_the_previous_layout_still_load(tmp_path):
    seed_everything(5)
    cfg, model, optimizer, scheduler = trained(steps=3)
    write_previous_layout(tmp_path, 3, cfg, model, optimizer, scheduler, consumed=6)
    assert (
        "model.fc1.weight"
        in dcp.FileSystemReader(tmp_path / "iter_0000003").read_metadata().state_dict_metadata
    )
    expected_draws = draw_random_numbers()
    expected = snapshot(model, optimizer)

    seed_everything(99)
    cfg2, model2, optimizer2, scheduler2 = fresh()
    progress = load_checkpoint(tmp_path, model2, optimizer2, scheduler2, cfg, None)
    assert (progress.iteration, progress.consumed_train_samples) == (3, 6)
    assert_same_draws(draw_random_numbers(), expected_draws)
    assert_same(snapshot(model2, optimizer2), expected)
    assert scheduler2.state_dict() == scheduler.state_dict()
    assert load_saved_config(tmp_path) == cfg
    full = read_full_tensors(tmp_path)
    assert torch.equal(full["fc2.weight"], model.fc2.weight.detach())
    # Saving it again writes Megatron's layout: the conversion is a load and a save.
    save(tmp_path, 4, cfg, model2, optimizer2, scheduler2)
    assert "fc1.weight" in dcp.FileSystemReader(tmp_path / "iter_0000004").read_metadata().state_dict_metadata
