"""build_optimizer: AdamW settings, weight decay only on matrices, and ZeRO sharding over data-parallel ranks."""

import torch
import torch.distributed as dist
from dist_utils import run_distributed
from torch import nn

from megatron_lite.arguments import parse_config
from megatron_lite.parallel_state import ParallelState
from megatron_lite.training.optimizer import build_optimizer, param_groups

FLAGS = (
    "--num-layers 1 --hidden-size 8 --num-attention-heads 2 --seq-length 4 --mock-data --vocab-size 16 "
    "--micro-batch-size 1 --lr 0.1 --train-iters 1 --weight-decay 0.5 --adam-beta1 0.8 --adam-beta2 0.95 --adam-eps 1e-6"
)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.linear = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3, bias=False)


def make_cfg(extra: str = ""):
    return parse_config((FLAGS + " " + extra).split()).finalize(1)


def test_groups_split_matrices_from_biases_and_norms():
    net = Net()
    groups = param_groups(net, 0.5)
    names = {id(p): n for n, p in net.named_parameters()}
    decayed = sorted(names[id(p)] for p in groups[0]["params"])
    plain = sorted(names[id(p)] for p in groups[1]["params"])
    assert decayed == ["embedding.weight", "head.weight", "linear.weight"]
    assert plain == ["linear.bias", "norm.bias", "norm.weight"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]


def test_adamw_hyperparameters_come_from_the_flags():
    opt = build_optimizer(Net(), make_cfg())
    assert isinstance(opt, torch.optim.AdamW)
    for group in opt.param_groups:
        assert group["betas"] == (0.8, 0.95)
        assert group["eps"] == 1e-6
        assert group["lr"] == 0.1
        assert group["fused"] is True


def test_weight_decay_applies_to_matrices_only():
    # With zero gradients Adam's update is 0, so one step leaves only the decoupled decay: p * (1 - lr * wd).
    net = Net()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = build_optimizer(net, make_cfg())
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, param in net.named_parameters():
        factor = 0.95 if name in ("embedding.weight", "head.weight", "linear.weight") else 1.0
        torch.testing.assert_close(param.detach(), before[name] * factor, rtol=0, atol=1e-7)


def _zero_worker(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)
    net = Net()
    reference = Net()
    reference.load_state_dict(net.state_dict())
    pstate = ParallelState(rank=rank, world_size=2, dp_rank=rank, dp_size=2, dp_group=dist.group.WORLD)
    cfg = make_cfg("--use-distributed-optimizer")
    zero = build_optimizer(net, cfg, pstate)
    plain = build_optimizer(reference, cfg, ParallelState())
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p, q in zip(net.parameters(), reference.parameters()):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        zero.step()
        plain.step()
    return {
        "kind": type(zero).__name__,
        "max_diff": max((p - q).abs().max().item() for p, q in zip(net.parameters(), reference.parameters())),
        "local_state": len(zero.optim.state),
        "total_params": len(list(net.parameters())),
    }


def test_distributed_optimizer_shards_state_and_matches_adamw():
    results = run_distributed(_zero_worker, 2)
    assert all(r["kind"] == "ZeroRedundancyOptimizer" for r in results)
    assert all(r["max_diff"] == 0.0 for r in results)
    # Each rank keeps Adam state for its own share only; together they cover every parameter once.
    assert all(0 < r["local_state"] < r["total_params"] for r in results)
    assert sum(r["local_state"] for r in results) == results[0]["total_params"]
