"""Checkpoints across parallel layouts, with real gloo processes: saved at TP=2 x DP=2 (ZeRO) and at
TP=4, loaded at TP=1 (one process), TP=2 x DP=1, TP=4 and TP=1 x DP=2 (ZeRO); weights and Adam states
must come back exactly, vocab padding (257 -> 384 / 512 rows) included."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from test_checkpointing_support import (
    VOCAB,
    TinyTPModel,
    build,
    draw_random_numbers,
    make_cfg,
    param_info,
    seed_everything,
    snapshot,
    to_full,
    to_local,
    train_steps,
)
from torch.distributed.optim import ZeroRedundancyOptimizer

from megatron_lite.parallel_state import ParallelState, initialize_parallel
from megatron_lite.training.checkpointing import load_checkpoint, reseed_value, save_checkpoint

INFO = param_info(TinyTPModel(make_cfg()))
NAMES = sorted(INFO)
SEED_AT_LOAD = 31


def save_tp2_dp2_then_reload_at_tp4(rank: int, world_size: int, root: str) -> dict:
    """TP=2 x DP=2 with ZeRO: train, save "a"; then the same 4 processes as TP=4: load "a", train, save "c"."""
    pstate = initialize_parallel(2)
    cfg = make_cfg(tp=2, world_size=4, use_distributed_optimizer=True)
    model, optimizer, scheduler = build(cfg, pstate)
    assert isinstance(optimizer, ZeroRedundancyOptimizer)
    seed_everything(100 + rank, pstate.tp_rank)  # every rank's RNG differs: a restore must pick its own
    train_steps(model, optimizer, scheduler, cfg, pstate, range(2))
    save_checkpoint(Path(root) / "a", 2, model, optimizer, scheduler, cfg, pstate, consumed_train_samples=24)
    out = {"tp_rank": pstate.tp_rank, "a": snapshot(model, optimizer), "a_draws": draw_random_numbers()}

    pstate4 = initialize_parallel(4)
    cfg4 = make_cfg(tp=4, world_size=4)
    model4, optimizer4, scheduler4 = build(cfg4, pstate4, seed=SEED_AT_LOAD)
    progress = load_checkpoint(Path(root) / "a", model4, optimizer4, scheduler4, cfg4, pstate4)
    out.update(tp4=snapshot(model4, optimizer4), tp4_draws=draw_random_numbers())
    out["tp4_progress"] = dataclasses.astuple(progress)
    train_steps(model4, optimizer4, scheduler4, cfg4, pstate4, range(2, 3))
    save_checkpoint(
        Path(root) / "c", 3, model4, optimizer4, scheduler4, cfg4, pstate4, consumed_train_samples=36
    )
    out["c"] = snapshot(model4, optimizer4)
    return out


def gpt_cfg(tp: int = 1):
    """A GPTModel with every sharded kind: untied output layer, SwiGLU (fc1 stride 2), GQA, RoPE."""
    return make_cfg(
        tp=tp,
        hidden_size=64,
        num_attention_heads=4,
        group_query_attention=True,
        num_query_groups=2,
        swiglu=True,
        untie_embeddings_and_output_weights=True,
        position_embedding_type="rope",
        normalization="RMSNorm",
    )


def build_gpt(cfg, pstate):
    from megatron_lite.core.models.gpt import GPTModel
    from megatron_lite.training.lr_schedule import OptimizerParamScheduler
    from megatron_lite.training.optimizer import build_optimizer

    model = GPTModel(cfg, pstate)
    optimizer = build_optimizer(model, cfg, pstate)
    return model, optimizer, OptimizerParamScheduler.from_config(optimizer, cfg)


def load_at_tp2_then_zero_dp2(rank: int, world_size: int, root: str) -> dict:
    """A TP=2 GPTModel saves "g"; TP=2 x DP=1 loads "a" (TP=2 x DP=2) and "b" (TP=1); then TP=1 x DP=2
    with ZeRO loads "a"."""
    out = {}
    pstate = initialize_parallel(2)
    cfg = make_cfg(tp=2, world_size=2)
    model, optimizer, scheduler = build_gpt(gpt_cfg(tp=2), pstate)
    train_steps(model, optimizer, scheduler, gpt_cfg(tp=2), pstate, range(2))
    save_checkpoint(
        Path(root) / "g", 2, model, optimizer, scheduler, gpt_cfg(tp=2), pstate, consumed_train_samples=2
    )
    out["gpt"] = snapshot(model, optimizer)
    for name in ("a", "b"):
        model, optimizer, scheduler = build(cfg, pstate, seed=SEED_AT_LOAD)
        progress = load_checkpoint(Path(root) / name, model, optimizer, scheduler, cfg, pstate)
        out[name] = snapshot(model, optimizer)
        out[name + "_draws"] = draw_random_numbers()
        out[name + "_progress"] = dataclasses.astuple(progress)
        out[name + "_schedule"] = scheduler.num_steps
    pstate_dp = initialize_parallel(1)
    cfg_dp = make_cfg(tp=1, world_size=2, use_distributed_optimizer=True)
    model, optimizer, scheduler = build(cfg_dp, pstate_dp, seed=SEED_AT_LOAD)
    assert isinstance(optimizer, ZeroRedundancyOptimizer)
    load_checkpoint(Path(root) / "a", model, optimizer, scheduler, cfg_dp, pstate_dp)
    out["zero"] = snapshot(model, optimizer)
    out["zero_draws"] = draw_random_numbers()
    return out


def full_snapshot(shards_by_tp_rank: list[dict]) -> dict:
    """Full parameters and Adam states from snapshots of TP ranks 0..tp-1 (states from any DP owner)."""
    params = {n: to_full(n, [s["params"][n] for s in shards_by_tp_rank], INFO[n]) for n in NAMES}
    states = {}
    for name in NAMES:
        keys = shards_by_tp_rank[0]["states"][name].keys()
        states[name] = {
            k: to_full(name, [s["states"][name][k] for s in shards_by_tp_rank], INFO[name])
            if shards_by_tp_rank[0]["states"][name][k].dim() > 0
            else shards_by_tp_rank[0]["states"][name][k]
            for k in keys
        }
    return {"params": params, "states": states}


def merged_zero_states(results: list[dict], key: str, tp_rank: int) -> dict:
    """The Adam states of one TP rank's shards, gathered from the DP ranks that own them under ZeRO."""
    merged: dict = {}
    for result in results:
        if result["tp_rank"] == tp_rank:
            owned = result[key]["states"]
            assert not merged.keys() & owned.keys(), "a parameter's state is owned by two DP ranks"
            merged.update(owned)
    assert sorted(merged) == NAMES
    return merged


def assert_full_equal(actual: dict, expected: dict) -> None:
    for name in NAMES:
        assert torch.equal(actual["params"][name], expected["params"][name]), name
        assert actual["states"][name].keys() == expected["states"][name].keys(), name
        for key, value in expected["states"][name].items():
            assert torch.equal(actual["states"][name][key], value), (name, key)


def assert_shards_equal(
    snap: dict, full: dict, tp_rank: int, tp_size: int, padded: int, states: bool = True
) -> None:
    """A rank's snapshot holds exactly its shard of the full tensors (padding rows zero)."""
    for name in NAMES:
        expected = to_local(name, full["params"][name], INFO[name], tp_rank, tp_size, padded)
        assert torch.equal(snap["params"][name], expected), (name, tp_rank)
        if not states or name not in snap["states"]:
            continue
        for key, value in full["states"][name].items():
            local = to_local(name, value, INFO[name], tp_rank, tp_size, padded) if value.dim() > 0 else value
            assert torch.equal(snap["states"][name][key], local), (name, key, tp_rank)


def draws_after_reseed(seed: int, iteration: int, dp_rank: int, tp_rank: int) -> dict:
    seed_everything(reseed_value(seed, iteration, dp_rank), tp_rank)
    return draw_random_numbers()


def assert_same_draws(actual: dict, expected: dict) -> None:
    assert (actual["random"], actual["np"]) == (expected["random"], expected["np"])
    assert torch.equal(actual["torch"], expected["torch"])
    assert torch.equal(actual["tracker"], expected["tracker"])


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """Run the 4-process saves, then load "a" at TP=1 here and save it as "b" (a TP=1 checkpoint)."""
    root = tmp_path_factory.mktemp("checkpoints")
    results = run_distributed(save_tp2_dp2_then_reload_at_tp4, 4, str(root))
    cfg = make_cfg()
    model, optimizer, scheduler = build(cfg, seed=SEED_AT_LOAD)
    progress = load_checkpoint(root / "a", model, optimizer, scheduler, cfg, ParallelState())
    tp1 = snapshot(model, optimizer)
    save_checkpoint(root / "b", 2, model, optimizer, scheduler, cfg, None, consumed_train_samples=24)
    cfg_c = make_cfg()
    model_c, optimizer_c, scheduler_c = build(cfg_c, seed=SEED_AT_LOAD)
    load_checkpoint(root / "c", model_c, optimizer_c, scheduler_c, cfg_c, ParallelState())
    return {
        "root": root,
        "results": results,
        "tp1": tp1,
        "tp1_progress": progress,
        "tp1_c": snapshot(model_c, optimizer_c),
        "tp1_padded": cfg.padded_vocab_size,
    }


def reference_a(results: list[dict]) -> dict:
    """Full weights and Adam states of checkpoint "a" from the saving ranks' own shards."""
    # Ranks 0, 1 are TP ranks 0, 1 of DP rank 0; ranks 2, 3 hold the same weights (DP replicas).
    for name in NAMES:
        assert torch.equal(results[0]["a"]["params"][name], results[2]["a"]["params"][name])
    shards = [
        {"params": results[t]["a"]["params"], "states": merged_zero_states(results, "a", t)} for t in (0, 1)
    ]
    return full_snapshot(shards)


def test_tp2_dp2_zero_checkpoint_loads_at_tp1(layouts):
    results = layouts["results"]
    assert [r["tp_rank"] for r in results] == [0, 1, 0, 1]
    full = reference_a(results)
    assert layouts["tp1_padded"] == 384
    tp1 = layouts["tp1"]
    loaded = {
        "params": {
            n: v[:VOCAB] if n.startswith(("embedding.word", "output_layer")) else v
            for n, v in tp1["params"].items()
        },
        "states": {
            n: {
                k: (v[:VOCAB] if n.startswith(("embedding.word", "output_layer")) and v.dim() > 0 else v)
                for k, v in s.items()
            }
            for n, s in tp1["states"].items()
        },
    }
    assert_full_equal(loaded, full)
    # The 384 - 257 padding rows stay zero: true rows only were stored.
    assert torch.equal(tp1["params"]["output_layer.weight"][VOCAB:], torch.zeros(384 - VOCAB, 8))
    assert torch.equal(tp1["buffer"], torch.tensor([3.0, 5.0]))
    assert dataclasses.astuple(layouts["tp1_progress"])[:3] == (2, 24, 0)


def test_tp2_checkpoint_loads_at_tp4_with_an_empty_vocab_shard_and_back_at_tp1(layouts):
    results = layouts["results"]
    full = reference_a(results)
    # TP=4 pads 257 to 512 rows: 128 per rank; rank 3 holds only padding and stores nothing of the vocab.
    for rank, result in enumerate(results):
        assert_shards_equal(result["tp4"], full, rank, 4, 512)
        assert result["tp4_progress"][:3] == (2, 24, 0)
        # TP size changed: every rank is re-seeded, identically within its DP group (here, all four).
        assert_same_draws(result["tp4_draws"], draws_after_reseed(SEED_AT_LOAD, 2, 0, rank))
    # "c" was saved at TP=4 (one more step) and loads in one process.
    full_c = full_snapshot([result["c"] for result in results])
    tp1_c = layouts["tp1_c"]
    for name in NAMES:
        expected = full_c["params"][name]
        assert torch.equal(tp1_c["params"][name][: expected.shape[0]], expected), name
        for key, value in full_c["states"][name].items():
            assert torch.equal(
                tp1_c["states"][name][key][: value.shape[0]] if value.dim() else tp1_c["states"][name][key],
                value,
            )


def test_tp2_dp1_and_zero_dp2_load_checkpoints_of_other_layouts(layouts):
    root, results = layouts["root"], layouts["results"]
    full = reference_a(results)
    loaded = run_distributed(load_at_tp2_then_zero_dp2, 2, str(root))
    for tp_rank, result in enumerate(loaded):
        # From TP=2 x DP=2: shards and Adam states match; each rank gets the RNG of the saved rank at its place.
        assert_shards_equal(result["a"], full, tp_rank, 2, 512)
        assert sorted(result["a"]["states"]) == NAMES
        assert_same_draws(result["a_draws"], results[tp_rank]["a_draws"])
        assert result["a_progress"][:3] == (2, 24, 0)
        # From TP=1: the same numbers, resharded; RNG re-seeded since the TP size changed.
        assert_shards_equal(result["b"], full, tp_rank, 2, 512)
        assert_same_draws(result["b_draws"], draws_after_reseed(SEED_AT_LOAD, 2, 0, tp_rank))
        assert result["b_schedule"] == result["a_schedule"] == 2 * 2
    # TP=1 x DP=2 with ZeRO: each DP rank restores exactly the states it owns, together all of them.
    owned = [set(result["zero"]["states"]) for result in loaded]
    assert not owned[0] & owned[1] and sorted(owned[0] | owned[1]) == NAMES
    for dp_rank, result in enumerate(loaded):
        assert_shards_equal(result["zero"], full, 0, 1, 384)
        assert_same_draws(result["zero_draws"], draws_after_reseed(SEED_AT_LOAD, 2, dp_rank, 0))
    assert not torch.equal(loaded[0]["zero_draws"]["torch"], loaded[1]["zero_draws"]["torch"])

    # The real GPTModel saved at TP=2 loads at TP=1 with the same full weights and Adam states.
    cfg = gpt_cfg()
    model, optimizer, scheduler = build_gpt(cfg, ParallelState())
    info = param_info(model)
    names = sorted(info)
    load_checkpoint(root / "g", model, optimizer, scheduler, cfg, None)
    tp1 = snapshot(model, optimizer)
    assert "output_layer.weight" in names and info["decoder.layers.0.mlp.linear_fc1.weight"] == (True, 0, 2)
    for name in names:
        full = to_full(name, [result["gpt"]["params"][name] for result in loaded], info[name])
        assert torch.equal(tp1["params"][name][: full.shape[0]], full), name
        for key, value in tp1["states"][name].items():
            shards = [result["gpt"]["states"][name][key] for result in loaded]
            full = to_full(name, shards, info[name]) if value.dim() else shards[0]
            assert torch.equal(value[: full.shape[0]] if value.dim() else value, full), (name, key)
