"""--overlap-grad-reduce and --overlap-param-gather on two real gloo ranks: each switch changes when the
communication runs, never the numbers."""

import pytest
import torch.distributed as dist
from dist_utils import run_distributed
from helpers import ONE_LAYER_RUN, tiny_flags

from megatron_lite.arguments import parse_config
from megatron_lite.errors import UserError
from megatron_lite.parallel_state import initialize_parallel
from megatron_lite.training import training
from megatron_lite.training.logger import TrainingLogger
from megatron_lite.training.training import pretrain

# 2 micro batches per rank, so the unsynchronised first backward and the synchronised last one both happen.
FLAGS = tiny_flags(
    **ONE_LAYER_RUN,
    micro_batch_size=2,
    global_batch_size=8,
    train_iters=4,
    lr=1e-2,
    eval_iters=0,
    hidden_dropout=0,
    attention_dropout=0,
)
RUNS = {
    "after-backward": [],
    "overlapped": ["--overlap-grad-reduce"],
    "distributed-optimizer": ["--use-distributed-optimizer"],
    "overlapped-param-gather": [
        "--use-distributed-optimizer",
        "--overlap-grad-reduce",
        "--overlap-param-gather",
    ],
}


def _trainer(extra: list[str], pstate):
    cfg = parse_config(FLAGS + extra)
    training.setup_config(cfg, pstate)
    training.set_random_seed(cfg.seed, pstate)
    trainer = training.Trainer(cfg, pstate, TrainingLogger(cfg, pstate), training._gpt_model_provider)
    trainer.build_data(None)
    return trainer


def _ddp_reductions(extra: list[str], pstate) -> dict:
    """How many buckets DDP's own reducer all-reduced in one step, and what the gather left in flight."""
    trainer = _trainer(extra, pstate)
    calls = []

    def counting_hook(state, bucket):
        calls.append(bucket.buffer().numel())
        return (
            dist.all_reduce(bucket.buffer().div_(2), async_op=True).get_future().then(lambda f: f.value()[0])
        )

    trainer.ddp.register_comm_hook(None, counting_hook)
    trainer.train_step(trainer._next_micro_batches(trainer.train_iter, "training"))
    return {"buckets": len(calls), "in_flight": len(getattr(trainer.optimizer, "_pending", {}))}


def _worker(rank: int, world_size: int) -> dict:
    pstate = initialize_parallel(1)
    losses = {
        name: [v for _, v in pretrain(parse_config(FLAGS + extra), pstate).losses]
        for name, extra in RUNS.items()
    }
    return {
        "losses": losses,
        "off": _ddp_reductions([], pstate),
        "on": _ddp_reductions(["--overlap-grad-reduce"], pstate),
        "gather": _ddp_reductions(RUNS["overlapped-param-gather"], pstate),
    }


def test_overlap_switches_give_identical_losses_on_two_ranks():
    results = run_distributed(_worker, 2)
    reference = results[0]["losses"]["after-backward"]
    assert len(reference) == 4 and reference[-1] < reference[0]
    for r in results:
        for name in RUNS:
            assert r["losses"][name] == reference, name  # bit-identical: the same sums, only earlier
        # Off: DDP's reducer stays idle and one all-reduce follows the backward; on: DDP reduces its buckets
        # during the last micro batch's backward.
        assert r["off"]["buckets"] == 0 and r["on"]["buckets"] >= 1
        # The distributed optimizer's parameter gather is still in flight when the step returns (6 params of
        # the one-layer model per rank and more: every parameter is broadcast asynchronously).
        assert r["gather"]["in_flight"] > 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--overlap-param-gather", "--overlap-grad-reduce"],
            "--overlap-param-gather needs --use-distributed-optimizer",
        ),
        (
            ["--overlap-param-gather", "--use-distributed-optimizer"],
            "--overlap-param-gather needs --overlap-grad-reduce (as in Megatron)",
        ),
    ],
)
def test_overlap_param_gather_needs_the_distributed_optimizer_and_grad_overlap(extra, message):
    with pytest.raises(UserError) as err:
        parse_config(FLAGS + extra).finalize(2)
    assert str(err.value) == message
