"""--calculate-per-token-loss: gradients are the token mean of the whole global batch (all micro batches and
DP ranks); without it, the mean of per-micro-batch token means. The logged lm loss is Megatron's either way."""

import pytest
import torch
from dist_utils import run_distributed
from helpers import ONE_LAYER_RUN, tiny_flags

from megatron_lite.arguments import parse_config
from megatron_lite.core.models.gpt import GPTModel
from megatron_lite.parallel_state import ParallelState, initialize_parallel
from megatron_lite.training import training
from megatron_lite.training.data_samplers import MockGPTDataset
from megatron_lite.training.logger import TrainingLogger

# vocab 6 with --eod-mask-loss: about one token in six is masked, unevenly across samples and micro batches.
FLAGS = tiny_flags(
    **{**ONE_LAYER_RUN, "vocab_size": 6},
    micro_batch_size=2,
    global_batch_size=8,
    train_iters=1,
    eod_mask_loss=True,
    clip_grad=0,
    hidden_dropout=0,
    attention_dropout=0,
    eval_iters=0,
)


def _step(extra: list[str], pstate: ParallelState) -> dict:
    """One train_step of the Trainer on its first global batch: the gradients and the lm loss it reports."""
    cfg = parse_config(FLAGS + extra)
    training.setup_config(cfg, pstate)
    training.set_random_seed(cfg.seed, pstate)
    trainer = training.Trainer(cfg, pstate, TrainingLogger(cfg, pstate), training.gpt_model_provider)
    trainer.build_data(None)
    batches = trainer._next_micro_batches(trainer.train_iter, "training")
    loss, _, skipped = trainer.train_step(batches)
    assert not skipped
    return {"loss": loss, "grads": [p.grad.clone() for p in trainer.module.parameters()]}


def _reference() -> tuple[list[torch.Tensor], list[torch.Tensor], float, float]:
    """Direct computations on the 8 samples of the global batch: (token-mean gradients, gradients of the mean
    of per-micro-batch token means, global token-mean loss, the mask's fraction of tokens kept)."""
    cfg = parse_config(FLAGS).finalize(1)
    ds = MockGPTDataset(8, cfg.seq_length, 6, cfg.seed, "train", eod=5, eod_mask_loss=True)
    batch = {k: torch.stack([ds[i][k] for i in range(8)]) for k in ("tokens", "labels", "loss_mask")}
    model = GPTModel(cfg)
    mask = batch["loss_mask"]
    per_token = model(batch["tokens"], labels=batch["labels"])
    token_mean = (per_token * mask).sum() / mask.sum()
    token_grads = torch.autograd.grad(token_mean, list(model.parameters()))
    # Megatron's default: each micro batch of 2 samples (whichever rank reads it) is normalised by its own tokens.
    per_token = model(batch["tokens"], labels=batch["labels"])
    micro = [(per_token[i : i + 2] * mask[i : i + 2]).sum() / mask[i : i + 2].sum() for i in range(0, 8, 2)]
    micro_grads = torch.autograd.grad(torch.stack(micro).mean(), list(model.parameters()))
    return list(token_grads), list(micro_grads), token_mean.item(), (mask.sum() / mask.numel()).item()


@pytest.fixture(scope="module")
def reference():
    token_grads, micro_grads, loss, kept = _reference()
    assert 0.7 < kept < 0.95  # masks really are uneven
    spread = max(((a - b).norm() / a.norm()).item() for a, b in zip(token_grads, micro_grads))
    assert spread > 1e-3  # the two normalisations differ far beyond the tolerance used below
    return token_grads, micro_grads, loss


def _assert_grads(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


def test_one_process_per_token_loss_is_the_global_token_mean(reference):
    token_grads, micro_grads, loss = reference
    per_token = _step(["--calculate-per-token-loss"], ParallelState())
    _assert_grads(per_token["grads"], token_grads)
    default = _step([], ParallelState())
    _assert_grads(default["grads"], micro_grads)
    # Megatron logs sum(loss) / sum(tokens) over the global batch in both modes.
    assert per_token["loss"] == pytest.approx(loss, rel=1e-6)
    assert default["loss"] == pytest.approx(loss, rel=1e-6)


def _dp_worker(rank: int, world_size: int) -> dict:
    pstate = initialize_parallel(1)
    assert pstate.dp_size == 2
    return {
        "per_token": _step(["--calculate-per-token-loss"], pstate),
        "default": _step([], pstate),
        "overlapped": _step(["--calculate-per-token-loss", "--overlap-grad-reduce"], pstate),
    }


def test_two_data_parallel_ranks_with_uneven_masks(reference):
    token_grads, micro_grads, loss = reference
    results = run_distributed(_dp_worker, 2)
    for r in results:
        _assert_grads(r["per_token"]["grads"], token_grads)
        _assert_grads(r["overlapped"]["grads"], token_grads)
        _assert_grads(r["default"]["grads"], micro_grads)
        for mode in ("per_token", "default", "overlapped"):
            assert r[mode]["loss"] == pytest.approx(loss, rel=1e-6)
