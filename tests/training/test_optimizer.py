"""build_optimizer: AdamW and SGD settings, Megatron's weight-decay groups, ZeRO sharding over data-parallel ranks,
and the asynchronous parameter gather of --overlap-param-gather."""

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

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.linear(self.embedding(tokens))))


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


def test_sgd_with_momentum_and_l2_weight_decay_as_megatron():
    # torch's SGD (Megatron's CPU/fallback SGD; apex FusedSGD computes the same): g' = g + wd * wd_mult * p,
    # buf = g' on the first step and momentum * buf + g' after, p -= lr * buf.
    net = Net()
    opt = build_optimizer(net, make_cfg("--optimizer sgd --sgd-momentum 0.7"))
    assert isinstance(opt, torch.optim.SGD)
    assert [(g["momentum"], g["weight_decay"], g["wd_mult"]) for g in opt.param_groups] == [
        (0.7, 0.5, 1.0),
        (0.7, 0.0, 0.0),
    ]
    p = {n: q.detach().clone() for n, q in net.named_parameters()}
    generator = torch.Generator().manual_seed(3)
    grads = [
        {n: torch.randn(q.shape, generator=generator) for n, q in net.named_parameters()} for _ in range(2)
    ]
    buf = {}
    for step_grads in grads:
        for name, param in net.named_parameters():
            param.grad = step_grads[name].clone()
            wd = 0.5 if param.ndim == 2 else 0.0
            g = step_grads[name] + wd * p[name]
            buf[name] = g if name not in buf else 0.7 * buf[name] + g
            p[name] = p[name] - 0.1 * buf[name]
        opt.step()
    for name, param in net.named_parameters():
        torch.testing.assert_close(param.detach(), p[name], rtol=1e-6, atol=1e-7)


def test_megatron_weight_decay_rule_covers_one_dimensional_weights():
    # Megatron's wd_mult 0: any bias and any 1-D parameter (norm weights); all other params decay.
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    groups = param_groups(model, 0.1)
    assert [len(g["params"]) for g in groups] == [1, 3]
    assert groups[0]["params"][0] is model[0].weight


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


def _sgd_and_overlapped_gather_worker(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)
    pstate = ParallelState(rank=rank, world_size=2, dp_rank=rank, dp_size=2, dp_group=dist.group.WORLD)
    out = {}
    for name, extra in [
        ("sgd", "--optimizer sgd --use-distributed-optimizer"),
        ("overlap", "--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather"),
    ]:
        net, reference = Net(), Net()
        reference.load_state_dict(net.state_dict())
        cfg = make_cfg(extra)
        zero = build_optimizer(net, cfg, pstate)
        plain = build_optimizer(reference, cfg, ParallelState())
        generator = torch.Generator().manual_seed(1)
        pending, diffs = [], []
        for _ in range(3):
            for p, q in zip(net.parameters(), reference.parameters()):
                p.grad = torch.randn(p.shape, generator=generator)
                q.grad = p.grad.clone()
            zero.step()
            plain.step()
            pending.append(len(getattr(zero, "_pending", {})))
            net(torch.tensor([1, 2, 3]))  # each module waits for its own parameters' gather
            pending.append(len(getattr(zero, "_pending", {})))
            diffs.append(
                max((p - q).abs().max().item() for p, q in zip(net.parameters(), reference.parameters()))
            )
        out[name] = {"kind": type(zero).__name__, "pending": pending, "max_diff": max(diffs)}
    return out


def test_distributed_sgd_and_overlapped_param_gather_match_the_plain_optimizer():
    results = run_distributed(_sgd_and_overlapped_gather_worker, 2)
    for r in results:
        assert r["sgd"]["kind"] == "ZeroRedundancyOptimizer" and r["sgd"]["max_diff"] == 0.0
        assert r["overlap"]["kind"] == "ZeroWithOverlappedParamGather"
        assert r["overlap"]["max_diff"] == 0.0
        # After the step all 6 parameter broadcasts are in flight; the next forward has waited for each.
        assert r["overlap"]["pending"] == [6, 0] * 3
