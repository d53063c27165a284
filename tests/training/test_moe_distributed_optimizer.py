"""Expert parallelism with --use-distributed-optimizer over real gloo processes: dense parameters sharded over
the dense DP group, experts over expert DP; the one-process loss curve, and checkpoints whose Adam moments
follow the experts by global index between EP sizes and optimizer kinds."""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed
from torch.distributed.optim import ZeroRedundancyOptimizer

from megatron_lite.arguments import parse_config
from megatron_lite.parallel_state import initialize_parallel
from megatron_lite.training.checkpointing.load import read_full_tensors
from megatron_lite.training.expert_optimizer import ExpertParallelOptimizer, split_expert_groups
from megatron_lite.training.optimizer import build_optimizer
from megatron_lite.training.setup import gpt_model_provider
from megatron_lite.training.training import pretrain

# One sequence per micro batch: world 4 with EP=2 gives dense DP=4 and expert DP=2 (both shardings real).
BASE = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --mock-data --vocab-size 250 "
    "--micro-batch-size 1 --global-batch-size 4 --lr 3e-3 --lr-warmup-iters 2 --train-iters 20 --num-workers 0 "
    "--hidden-dropout 0 --attention-dropout 0 --eval-iters 0 --log-interval 10 --peak-tflops 1 "
    "--num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 24 --swiglu --disable-bias-linear "
    "--moe-aux-loss-coeff 0.1 --moe-z-loss-coeff 0.01"
)
RTOL = 1e-5
EP2_ZERO = "--expert-model-parallel-size 2 --use-distributed-optimizer"


def _train(extra: str) -> list[float]:
    cfg = parse_config(f"{BASE} {extra}".split())
    return [v for _, v in pretrain(cfg, initialize_parallel(cfg.tensor_model_parallel_size)).losses]


def _sharding(cfg, pstate) -> dict:
    """How build_optimizer splits a fresh model of cfg: the parts' groups and this rank's shares."""
    model = gpt_model_provider(cfg, pstate)
    optimizer = build_optimizer(model, cfg, pstate)
    assert isinstance(optimizer, ExpertParallelOptimizer)
    parts = {"dense": optimizer.dense, "experts": optimizer.experts}
    info = {}
    for name, part in parts.items():
        assert isinstance(part, ZeroRedundancyOptimizer), name
        local = [p for g in part.optim.param_groups for p in g["params"]]
        every = [p for g in part.param_groups for p in g["params"]]
        info[name] = {
            "group_size": torch.distributed.get_world_size(part.process_group),
            "all_expert": all(getattr(p, "is_expert", False) == (name == "experts") for p in every),
            "local": len(local),
            "all": len(every),
        }
    # The scheduler writes into optimizer.param_groups: they must be the parts' own dicts.
    ids = {id(g) for g in optimizer.param_groups}
    info["same_dicts"] = ids == {id(g) for part in parts.values() for g in part.param_groups}
    view = optimizer.local_view()
    info["view_params"] = sum(len(g["params"]) for g in view.param_groups)
    return info


def _worker(rank: int, world_size: int, extra: str) -> dict:
    cfg = parse_config(f"{BASE} {extra}".split())
    pstate = initialize_parallel(1)
    losses = [v for _, v in pretrain(cfg, pstate).losses]
    return {"losses": losses, "sharding": _sharding(cfg, pstate)}


def _losses_worker(rank: int, world_size: int, extra: str) -> list[float]:
    return _train(extra)


def test_two_optimizers_act_as_one():
    torch.manual_seed(0)
    dense, expert = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2, bias=False)
    expert.weight.is_expert = True
    groups = [
        {"params": [dense.weight, expert.weight], "wd_mult": 1.0, "weight_decay": 0.1},
        {"params": [dense.bias], "wd_mult": 0.0, "weight_decay": 0.0},
    ]
    dense_groups, expert_groups = split_expert_groups(groups)
    assert [g["params"] for g in dense_groups] == [[dense.weight], [dense.bias]]
    assert [(g["params"], g["wd_mult"]) for g in expert_groups] == [([expert.weight], 1.0)]
    optimizer = ExpertParallelOptimizer(
        torch.optim.AdamW(dense_groups, lr=0.1), torch.optim.AdamW(expert_groups, lr=0.1)
    )
    reference = torch.optim.AdamW([{**g} for g in groups], lr=0.1)
    # Same dict objects: what a scheduler writes reaches the underlying optimizers.
    for group in optimizer.param_groups:
        group["lr"] = 0.05
    assert [g["lr"] for part in optimizer.parts for g in part.param_groups] == [0.05] * 3
    for group in reference.param_groups:
        group["lr"] = 0.05
    params = [dense.weight, dense.bias, expert.weight]
    start = [p.detach().clone() for p in params]
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        (dense(torch.ones(4, 3)).square().sum() + expert(torch.ones(4, 3)).sum()).backward()
        optimizer.step()
    got = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, value in zip(params, start):
            p.copy_(value)
    for _ in range(2):
        reference.zero_grad(set_to_none=True)
        (dense(torch.ones(4, 3)).square().sum() + expert(torch.ones(4, 3)).sum()).backward()
        reference.step()
    for p, value in zip(params, got):
        assert torch.equal(p.detach(), value)
    # The checkpoint view reads and writes each parameter's state in the optimizer that owns it.
    view = optimizer.local_view()
    assert sum(len(g["params"]) for g in view.param_groups) == 3 and len(view.state) == 3
    moment = view.state[expert.weight]["exp_avg"]
    assert moment is optimizer.experts.state[expert.weight]["exp_avg"]
    assert torch.equal(moment, reference.state[expert.weight]["exp_avg"])
    view.state.pop(dense.bias)
    assert dense.bias not in optimizer.dense.state and view.state.get(dense.bias) is None
    view.state[dense.bias] = {"step": torch.tensor(7.0)}
    assert optimizer.dense.state[dense.bias]["step"] == 7
    saved = optimizer.state_dict()
    optimizer.experts.state.clear()
    optimizer.load_state_dict(saved)
    assert torch.equal(optimizer.experts.state[expert.weight]["exp_avg"], moment)


@pytest.fixture(scope="module")
def single_process() -> list[float]:
    return _train("")


@pytest.mark.slow
def test_expert_parallel_distributed_optimizer_matches_one_process(single_process):
    results = run_distributed(_worker, 4, EP2_ZERO, timeout=900)
    for result in results:
        assert result["losses"] == pytest.approx(single_process, rel=RTOL, abs=0)
        sharding = result["sharding"]
        assert sharding["dense"]["group_size"] == 4 and sharding["experts"]["group_size"] == 2
        assert sharding["dense"]["all_expert"] and sharding["experts"]["all_expert"]
        assert sharding["same_dicts"]
        for part in ("dense", "experts"):
            assert 0 < sharding[part]["local"] < sharding[part]["all"], part
        assert sharding["view_params"] == sharding["dense"]["local"] + sharding["experts"]["local"]
    # Every parameter is some rank's: the dense shares add up over 4 ranks, the experts' over each EP pair.
    assert sum(r["sharding"]["dense"]["local"] for r in results) == results[0]["sharding"]["dense"]["all"]
    for ep_rank in (0, 1):
        # Megatron's expert layout: EP rank is rank % 2 here (ETP 1), expert DP pairs are {0, 2} and {1, 3}.
        pair = [results[ep_rank], results[ep_rank + 2]]
        assert sum(r["sharding"]["experts"]["local"] for r in pair) == pair[0]["sharding"]["experts"]["all"]


@pytest.mark.slow
def test_overlapped_param_gather_and_alltoall_match_one_process(single_process):
    extra = f"{EP2_ZERO} --overlap-grad-reduce --overlap-param-gather --moe-token-dispatcher-type alltoall"
    results = run_distributed(_losses_worker, 4, extra, timeout=900)
    for losses in results:
        assert losses == pytest.approx(single_process, rel=RTOL, abs=0)


# Experts split over the TP pair (expert DP 1: plain expert optimizer), or replicated over it (ETP 1: the
# experts' ZeRO group holds TP peers). Two sequences per micro batch: dense DP is 2 here.
TENSOR_PARALLEL = {
    "ep2-tp2": f"{EP2_ZERO} --tensor-model-parallel-size 2 --sequence-parallel",
    "ep2-tp2-etp1-alltoall": (
        f"{EP2_ZERO} --tensor-model-parallel-size 2 --sequence-parallel --expert-tensor-parallel-size 1 "
        "--moe-token-dispatcher-type alltoall"
    ),
}


def _layouts_worker(rank: int, world_size: int, layouts: dict) -> dict:
    return {name: _train(f"--micro-batch-size 2 {extra}") for name, extra in layouts.items()}


@pytest.mark.slow
def test_expert_and_tensor_parallel_with_distributed_optimizer_match_one_process():
    reference = _train("--micro-batch-size 2")
    results = run_distributed(_layouts_worker, 4, TENSOR_PARALLEL, timeout=900)
    for name in TENSOR_PARALLEL:
        assert results[-1][name] == pytest.approx(reference, rel=RTOL, abs=0), name


def _moments(ckpt) -> dict[str, torch.Tensor]:
    return read_full_tensors(ckpt, prefix="optimizer.state.")


@pytest.mark.slow
def test_checkpoints_move_between_sharded_and_plain_expert_optimizers(single_process, tmp_path):
    half = "--train-iters 10 --save-interval 10 --lr-decay-iters 20"
    resume = "--lr-decay-iters 20"
    # Saved by 4 ranks (dense ZeRO over 4, experts ZeRO over 2), resumed on one process and on 2 ranks
    # with EP=1 and the distributed optimizer over DP=2.
    first = run_distributed(_losses_worker, 4, f"{EP2_ZERO} {half} --save {tmp_path}/ep2", timeout=900)
    assert first[0] == pytest.approx(single_process[:10], rel=RTOL, abs=0)
    assert _train(f"--load {tmp_path}/ep2 {resume}") == pytest.approx(single_process[10:], rel=RTOL, abs=0)
    resumed = run_distributed(
        _losses_worker, 2, f"--use-distributed-optimizer --load {tmp_path}/ep2 {resume}", timeout=900
    )
    assert resumed[0] == pytest.approx(single_process[10:], rel=RTOL, abs=0)

    # The moments were gathered to the same tensors (by global expert index) as one process's.
    assert _train(f"{half} --save {tmp_path}/ep1") == pytest.approx(single_process[:10], rel=RTOL, abs=0)
    sharded, plain = _moments(f"{tmp_path}/ep2"), _moments(f"{tmp_path}/ep1")
    assert sorted(sharded) == sorted(plain)
    assert any(".experts." in key for key in plain)
    for key, value in plain.items():
        scale = value.abs().max().item()
        assert torch.allclose(sharded[key], value, rtol=1e-3, atol=1e-4 * scale + 1e-20), key

    # And the reverse: a one-process checkpoint resumed by EP=2 with both shardings.
    resumed = run_distributed(_losses_worker, 4, f"{EP2_ZERO} --load {tmp_path}/ep1 {resume}", timeout=900)
    for losses in resumed:
        assert losses == pytest.approx(single_process[10:], rel=RTOL, abs=0)
