"""--async-save with 2 real gloo ranks: TP=2 (staged DTensor shards) and DP=2 with ZeRO, written while
training goes on; the published checkpoints hold exactly what a synchronous save of the same state holds."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from dist_utils import run_distributed
from test_checkpointing_support import build, make_cfg, snapshot, train_steps

from megatron_lite.parallel_state import initialize_parallel
from megatron_lite.training.checkpointing import (
    async_save_pending,
    finalize_async_save,
    read_full_tensors,
    read_latest_iteration,
    save_checkpoint,
)


def save_sync_and_async_then_train_on(rank: int, world_size: int, root: str) -> dict:
    out = {}
    for tp, zero in ((2, False), (1, True)):
        pstate = initialize_parallel(tp)
        cfg = make_cfg(tp=tp, world_size=2, use_distributed_optimizer=zero)
        async_cfg = make_cfg(tp=tp, world_size=2, use_distributed_optimizer=zero, async_save=True)
        model, optimizer, scheduler = build(cfg, pstate)
        train_steps(model, optimizer, scheduler, cfg, pstate, range(2))
        name = f"tp{tp}"
        for where, config in (("sync", cfg), ("async", async_cfg)):
            path = Path(root) / name / where
            save_checkpoint(path, 2, model, optimizer, scheduler, config, pstate, consumed_train_samples=8)
        pending = async_save_pending()
        listing = sorted(os.listdir(Path(root) / name / "async"))
        train_steps(model, optimizer, scheduler, cfg, pstate, range(2, 4))  # changes what is being written
        published = finalize_async_save(pstate)
        out[name] = {"pending": pending, "published": published, "listing": listing}
        out[name]["after"] = snapshot(model, optimizer)["params"]
    return out


def test_async_saves_at_tp2_and_zero_dp2_equal_the_synchronous_ones(tmp_path):
    results = run_distributed(save_sync_and_async_then_train_on, 2, str(tmp_path))
    for name in ("tp2", "tp1"):
        for rank in results:
            assert rank[name]["pending"] and rank[name]["published"] == 2, name
            # Until the finalize, nothing but the temporary directory (the pointer has not moved).
            assert len(rank[name]["listing"]) == 1 and rank[name]["listing"][0].startswith(
                "iter_0000002.tmp-"
            )
        assert read_latest_iteration(tmp_path / name / "async") == 2
        for prefix in ("model.", "optimizer.state."):
            sync = read_full_tensors(tmp_path / name / "sync", prefix=prefix)
            written = read_full_tensors(tmp_path / name / "async", prefix=prefix)
            assert sync.keys() == written.keys() and len(sync) > 3, (name, prefix)
            for key in sync:
                assert torch.equal(sync[key], written[key]), (name, prefix, key)
        # The training that went on during the write is not in it.
        norm = read_full_tensors(tmp_path / name / "async")["norm.weight"]  # replicated: same shape
        assert not torch.equal(norm, results[0][name]["after"]["norm.weight"]), name
        for rank in (0, 1):
            assert (tmp_path / name / "async" / "iter_0000002" / f"rng_state_{rank}.pt").read_bytes() == (
                tmp_path / name / "sync" / "iter_0000002" / f"rng_state_{rank}.pt"
            ).read_bytes()
