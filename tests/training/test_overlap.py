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
    trainer = training.Trainer(cfg, pstate, TrainingLogger(cfg, pstate), training.gpt_model_provider)
    trainer.build_data(None)
    return trainer


# Two layers of h=192 (1.8 MB of fp32 gradients each): more than DDP's first 1 MB bucket, so with the overlap the
# last layer's bucket is reduced while the backward of the layers before it is still running.
WIDE = ["--num-layers", "2", "--hidden-size", "192", "--lr", "2e-3"]


def _ddp_reductions(extra: list[str], pstate) -> dict:
    """The buckets DDP's own reducer all-reduced in one step (with how many times the word embedding's gradient,
    the last one backward computes, had been accumulated when each started), and the gathers left in flight."""
    trainer = _trainer(WIDE + extra, pstate)
    embedding_accumulations = [0]
    word_embeddings = trainer.module.embedding.word_embeddings.weight
    word_embeddings.register_post_accumulate_grad_hook(lambda p: embedding_accumulations.append(0))
    calls = []

    def counting_hook(state, bucket):
        calls.append(len(embedding_accumulations) - 1)
        return (
            dist.all_reduce(bucket.buffer().div_(2), async_op=True).get_future().then(lambda f: f.value()[0])
        )

    trainer.ddp.register_comm_hook(None, counting_hook)
    # torch's DDP puts every gradient in one bucket for the first step and splits them by the order the
    # first backward produced them (a 1 MB first bucket, then 25 MB): the second step shows the overlap.
    trainer.train_step(trainer._next_micro_batches(trainer.train_iter, "training"))
    calls.clear()
    embedding_accumulations[1:] = []
    trainer.train_step(trainer._next_micro_batches(trainer.train_iter, "training"))
    return {
        "buckets": calls,
        "accumulations": len(embedding_accumulations) - 1,
        "in_flight": len(getattr(trainer.optimizer, "_pending", {})),
        "params": len(trainer.params),
    }


def _losses_worker(rank: int, world_size: int) -> dict:
    pstate = initialize_parallel(1)
    return {
        name: [v for _, v in pretrain(parse_config(FLAGS + WIDE + extra), pstate).losses]
        for name, extra in RUNS.items()
    }


def test_overlap_switches_give_identical_losses_on_two_ranks():
    results = run_distributed(_losses_worker, 2)
    reference = results[0]["after-backward"]
    assert len(reference) == 4 and reference[-1] < reference[0]
    for losses in results:
        for name in RUNS:
            assert losses[name] == reference, name  # bit-identical: the same sums, only earlier


def _timing_worker(rank: int, world_size: int) -> dict:
    pstate = initialize_parallel(1)
    return {
        "off": _ddp_reductions([], pstate),
        "on": _ddp_reductions(["--overlap-grad-reduce"], pstate),
        "gather": _ddp_reductions(RUNS["overlapped-param-gather"], pstate),
    }


def test_overlap_switches_move_the_communication_into_backward_and_forward():
    for r in run_distributed(_timing_worker, 2):
        # Off: DDP's reducer stays idle and all_reduce_gradients follows the backward.
        assert r["off"]["buckets"] == [] and r["off"]["accumulations"] == 2
        # On: DDP reduces its buckets during the last micro batch's backward; the first starts before that
        # backward reaches the word embeddings (accumulated once, by the first micro batch, at that point).
        assert len(r["on"]["buckets"]) >= 2 and r["on"]["buckets"][0] == 1 and r["on"]["accumulations"] == 2
        # The distributed optimizer's parameter gather: every parameter's broadcast is still in flight when
        # the step returns; the next forward waits for each one as its module starts.
        assert r["gather"]["in_flight"] == r["gather"]["params"]


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
