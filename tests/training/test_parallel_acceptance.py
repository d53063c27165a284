"""Save/load across parallel layouts at the training level: a TP=2 x DP=2 run saved at iteration N resumes
at TP=2 x DP=2 (bit-exact), TP=1 and TP=2 x DP=1 (slow) on the uninterrupted curve and data position;
generating from its checkpoint in one process gives the live TP=2 model's tokens; TP=2 dropout training
is seeded and resumes bit-exact (slow).

Measured (CPU, torch 2.13): resumed at TP=1 and at TP=2 x DP=1, the losses after N differ from the
uninterrupted TP=2 x DP=2 run by at most 1.7e-7 relative; at the same layout by exactly 0."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from megatron_log import MEGATRON_LINE

from megatron_lite.arguments import parse_config
from megatron_lite.core.models.gpt import GPTModel
from megatron_lite.inference.generation import generate, load_model_for_inference
from megatron_lite.parallel_state import ParallelState, initialize_parallel
from megatron_lite.tokenizer import build_tokenizer
from megatron_lite.training.checkpointing import (
    TRACKER_FILENAME,
    iteration_dir_name,
    load_model_weights,
    load_saved_config,
    read_full_tensors,
)
from megatron_lite.training.training import pretrain

ROOT = Path(__file__).resolve().parents[2]
N = 3  # save at N, train to 2N
SEQ = 16
GLOBAL_BATCH = 4
BASE = (
    f"--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length {SEQ} --mock-data "
    "--tokenizer-type ByteTokenizer --micro-batch-size 1 "
    f"--global-batch-size {GLOBAL_BATCH} --lr 1e-2 --lr-decay-style constant --train-iters {2 * N} --num-workers 0 "
    "--hidden-dropout 0 --attention-dropout 0 --eval-iters 0 --log-interval 1 --peak-tflops 1"
)
# Layout changes reorder reductions (TP splits the matmuls, DP the batch sum): equal up to float rounding.
RTOL = 1e-5
PROMPT = "TP"  # prompt + new tokens fit the 16 positions: one forward checks every choice
NEW_TOKENS = 12
DROPOUT = "--tensor-model-parallel-size 2 --hidden-dropout 0.2 --attention-dropout 0.2"


class _RecordingGPT(GPTModel):
    """GPTModel that keeps the token batches it trained on and stays reachable after pretrain returns."""

    last: _RecordingGPT | None = None

    def __init__(self, cfg, pstate) -> None:
        super().__init__(cfg, pstate)
        self.seen: list[list[list[int]]] = []
        _RecordingGPT.last = self

    def forward(self, tokens, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            # One row per sample: its tokens, then its labels.
            self.seen.append(torch.cat([tokens, kwargs["labels"]], dim=1).tolist())  # [mbs, 2s]
        return super().forward(tokens, *args, **kwargs)


def _train(extra: str, tp: int) -> dict:
    """One pretrain() run; per iteration its loss, the sorted samples this rank trained on, its log line."""
    cfg = parse_config(f"{BASE} {extra}".split())
    pstate = initialize_parallel(tp) if dist.is_initialized() else ParallelState()
    result = pretrain(cfg, pstate, model_provider=_RecordingGPT)
    model = _RecordingGPT.last
    m = cfg.num_microbatches
    samples = [
        sorted(row for micro_batch in model.seen[i * m : (i + 1) * m] for row in micro_batch)
        for i in range(len(result.losses))
    ]
    return {
        "iterations": [i for i, _ in result.losses],
        "losses": [v for _, v in result.losses],
        "samples": samples,
        "lines": result.log_lines,
        "consumed": result.consumed_train_samples,
        "tp_rank": pstate.tp_rank,
        "dp_rank": pstate.dp_rank,
    }


def _tp1_config():
    cfg = parse_config(BASE.split())
    cfg.finalize(1, build_tokenizer("ByteTokenizer").vocab_size)
    assert cfg.padded_vocab_size == 384
    return cfg


def _greedy(model: GPTModel) -> list[int]:
    tokenizer = build_tokenizer("ByteTokenizer")
    model.eval()
    with torch.no_grad():
        return generate(model, tokenizer.encode(PROMPT), NEW_TOKENS, greedy=True, eod=tokenizer.eod)


def _tp2_dp2_worker(rank: int, world_size: int, root: str) -> dict:
    """Uninterrupted 2N iterations saving at N and 2N; then a resume from N at the same layout."""
    out = {"full": _train(f"--tensor-model-parallel-size 2 --save {root}/run --save-interval {N}", 2)}
    out["tokens"] = _greedy(_RecordingGPT.last)  # the live TP=2 model after 2N iterations
    dist.barrier()
    if rank == 0:
        # A checkpoint directory whose latest iteration is N: the run as if it had stopped there.
        name = iteration_dir_name(N)
        shutil.copytree(Path(root) / "run" / name, Path(root) / "at_n" / name)
        (Path(root) / "at_n" / TRACKER_FILENAME).write_text(str(N))
    dist.barrier()
    out["same_layout"] = _train(f"--tensor-model-parallel-size 2 --load {root}/at_n", 2)
    return out


def _two_rank_worker(rank: int, world_size: int, root: str) -> dict:
    """Resume from N at TP=2 x DP=1; then TP=2 with dropout twice from scratch (saving at N the first
    time) and once resumed from N."""
    out = {"resumed": _train(f"--tensor-model-parallel-size 2 --load {root}/at_n", 2)}
    out["dropout"] = [_train(f"{DROPOUT} --save {root}/dropout --save-interval {N}", 2), _train(DROPOUT, 2)]
    dist.barrier()
    if rank == 0:
        (Path(root) / "dropout" / TRACKER_FILENAME).write_text(str(N))
    dist.barrier()
    out["dropout_resumed"] = _train(f"{DROPOUT} --load {root}/dropout", 2)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("layouts")
    tp2_dp2 = run_distributed(_tp2_dp2_worker, 4, str(root))
    return {"root": root, "tp2_dp2": tp2_dp2, "tp1": _train(f"--load {root}/at_n", 1)}


@pytest.fixture(scope="module")
def two_rank_runs(runs) -> list[dict]:
    """The 2-process runs: a third spawn of processes, so only in the slow tests."""
    return run_distributed(_two_rank_worker, 2, str(runs["root"]))


def _global_samples(ranks: list[dict]) -> list[list]:
    """Per iteration, every sample of the global batch (from TP rank 0 of each DP rank), sorted."""
    for r in ranks:
        twin = next(o for o in ranks if o["dp_rank"] == r["dp_rank"] and o["tp_rank"] == 0)
        assert r["samples"] == twin["samples"]  # TP ranks of a DP rank train on the same samples
    leaders = [r for r in ranks if r["tp_rank"] == 0]
    return [sorted(s for r in leaders for s in r["samples"][i]) for i in range(len(leaders[0]["samples"]))]


def _max_rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def test_resume_at_the_same_layout_is_bit_exact(runs):
    for rank in runs["tp2_dp2"]:
        full, resumed = rank["full"], rank["same_layout"]
        assert full["iterations"] == list(range(1, 2 * N + 1))
        assert resumed["iterations"] == list(range(N + 1, 2 * N + 1))
        assert resumed["losses"] == full["losses"][N:]
        assert resumed["samples"] == full["samples"][N:]
        assert resumed["consumed"] == full["consumed"] == 2 * N * GLOBAL_BATCH


def _check_resumed_on_the_curve(runs: dict, resumed: list[dict]) -> None:
    """Resumed at another layout from N: the uninterrupted run's losses (to RTOL), samples and counts."""
    full = runs["tp2_dp2"]
    reference = full[0]["full"]["losses"][N:]
    global_batches = _global_samples([r["full"] for r in full])[N:]
    assert len({tuple(s) for batch in global_batches for s in batch}) == N * GLOBAL_BATCH
    # The updates after N must move the loss far beyond the tolerance, or matching would prove little:
    # the weights of iteration N give another loss on the last global batch.
    frozen = GPTModel(_tp1_config(), ParallelState())
    load_model_weights(frozen, runs["root"] / "at_n")
    rows = torch.tensor(global_batches[-1])  # [gbs, 2s]
    with torch.no_grad():
        frozen_loss = frozen(rows[:, :SEQ], labels=rows[:, SEQ:]).mean().item()
    assert abs(frozen_loss - reference[-1]) / reference[-1] > 100 * RTOL
    for got in resumed:
        assert got["iterations"] == list(range(N + 1, 2 * N + 1))
        assert got["losses"] == pytest.approx(reference, rel=RTOL, abs=0)
        assert got["consumed"] == 2 * N * GLOBAL_BATCH
    assert _global_samples(resumed) == global_batches
    # The first line after the resume counts from the checkpoint's consumed samples (the last rank prints).
    lines = resumed[-1]["lines"]
    fields = MEGATRON_LINE.match(lines[0]).groupdict()
    assert (int(fields["iteration"]), int(fields["consumed"])) == (N + 1, (N + 1) * GLOBAL_BATCH)
    assert len(lines) == N


def test_resume_at_tp1_continues_the_curve_and_the_data(runs):
    _check_resumed_on_the_curve(runs, [runs["tp1"]])


@pytest.mark.slow
def test_resume_at_tp2_dp1_continues_the_curve_and_the_data(runs, two_rank_runs):
    _check_resumed_on_the_curve(runs, [rank["resumed"] for rank in two_rank_runs])


def test_generate_py_from_the_tp2_dp2_checkpoint_matches_the_live_tp2_model(runs):
    root = runs["root"]
    live = [rank["tokens"] for rank in runs["tp2_dp2"]]
    assert all(tokens == live[0] for tokens in live)
    # One process, TP=1, built by hand from the checkpoint's full tensors.
    cfg = load_saved_config(root / "run")
    assert (cfg.tensor_model_parallel_size, cfg.data_parallel_size, cfg.padded_vocab_size) == (2, 2, 512)
    model = GPTModel(_tp1_config(), ParallelState())
    full = read_full_tensors(root / "run")
    state = model.state_dict()
    assert sorted(full) == sorted(k for k in state if not k.endswith("_extra_state"))
    with torch.no_grad():
        for name, tensor in full.items():
            state[name].zero_()[: tensor.shape[0]].copy_(tensor)  # vocab rows beyond 257 are padding
    assert full["embedding.word_embeddings.weight"].shape[0] == 257
    tokens = _greedy(model)
    assert tokens == live[0] and len(tokens) > 0
    # Greedy choices are far from ties, so the TP=1 and TP=2 logits agreeing is not luck.
    loaded, _, _ = load_model_for_inference(str(root / "run"))
    with torch.no_grad():
        ids = torch.tensor([build_tokenizer("ByteTokenizer").encode(PROMPT) + tokens])
        top2 = loaded(ids)[0, -len(tokens) - 1 : -1, :257].topk(2).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-4
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "generate.py"), "--load", str(root / "run"), "--greedy"]
        + ["--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == PROMPT + build_tokenizer("ByteTokenizer").decode(tokens) + "\n"


# The model-level test (tests/core/models/gpt/test_gpt_tensor_parallel.py) already checks that TP=2
# dropout masks are seeded; this adds the optimizer steps and the RNG restore of a resume.
@pytest.mark.slow
def test_tp2_dropout_training_is_seeded_and_resumes_bit_exact(runs, two_rank_runs):
    for rank in two_rank_runs:
        first, second = rank["dropout"]
        assert first["losses"] == second["losses"]
        assert rank["dropout_resumed"]["losses"] == first["losses"][N:]
    # Dropout is really on: the curve differs from the dropout-free run at the same layout.
    no_dropout = runs["tp2_dp2"][0]["full"]["losses"]
    assert _max_rel(two_rank_runs[0]["dropout"][0]["losses"], no_dropout) > 100 * RTOL
