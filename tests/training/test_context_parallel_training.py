"""Context-parallel training (real gloo processes) reproduces the single-process losses and grad norms."""

import pytest
from dist_utils import run_distributed

from megatron_lite.arguments import parse_config
from megatron_lite.errors import UserError
from megatron_lite.parallel_state import initialize_parallel
from megatron_lite.training.training import pretrain

# GPT-2 style (learned positions) and LLaMA style (RoPE, GQA, RMSNorm, SwiGLU); 4 micro batches, dropout off.
BASE = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 256 --max-position-embeddings 256 "
    "--mock-data --vocab-size 250 --micro-batch-size 1 --global-batch-size 4 --lr 3e-3 --lr-warmup-iters 2 "
    "--train-iters 20 --num-workers 0 --hidden-dropout 0 --attention-dropout 0 --eval-iters 1 "
    "--eval-interval 10 --log-interval 10"
)
STYLES = {
    "gpt2": "",
    "llama": "--position-embedding-type rope --normalization RMSNorm --swiglu --group-query-attention "
    "--num-query-groups 2 --disable-bias-linear --untie-embeddings-and-output-weights",
}
RTOL = 1e-5


def _train(extra: str) -> dict:
    cfg = parse_config(f"{BASE} {extra}".split())
    pstate = initialize_parallel(
        cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        context_parallel_size=cfg.context_parallel_size,
    )
    result = pretrain(cfg, pstate)
    return {
        "losses": [v for _, v in result.losses],
        "grad_norms": [v for _, v in result.grad_norms],
        "validation": [v for _, v in result.validation_losses],
        "coords": (pstate.dp_rank, pstate.cp_rank, pstate.tp_rank),
    }


def _layouts_worker(rank: int, world_size: int, layouts: dict) -> dict:
    return {name: _train(extra) for name, extra in layouts.items()}


@pytest.fixture(scope="module")
def reference() -> dict:
    return {style: _train(flags) for style, flags in STYLES.items()}


def _max_rel(values: list[float], reference: list[float]) -> float:
    assert len(values) == len(reference) > 0
    return max(abs(a - b) / abs(b) for a, b in zip(values, reference))


def _assert_matches(results: list[dict], layouts: dict, reference: dict) -> None:
    for result in results:
        for name in layouts:
            run, ref = result[name], reference[name.split("-")[0]]
            assert len(run["losses"]) == 20
            for key in ("losses", "grad_norms", "validation"):
                assert _max_rel(run[key], ref[key]) < RTOL, (name, key)


def test_reference_curves_move(reference):
    # The losses must differ by far more than the tolerance, or matching them would prove little.
    for ref in reference.values():
        assert (max(ref["losses"]) - min(ref["losses"])) / min(ref["losses"]) > 100 * RTOL


def test_cp2_matches_one_process_p2p_and_all_gather(reference):
    layouts = {
        f"{style}-{comm}": f"{flags} --context-parallel-size 2 --cp-comm-type {comm}"
        for style, flags in STYLES.items()
        for comm in ("p2p", "all_gather")
    }
    results = run_distributed(_layouts_worker, 2, layouts)
    _assert_matches(results, layouts, reference)
    assert [r["gpt2-p2p"]["coords"] for r in results] == [(0, 0, 0), (0, 1, 0)]


@pytest.mark.slow
def test_cp2_with_tp2_and_with_dp2_matches_one_process(reference):
    layouts = {
        "llama-tp2-sp": f"{STYLES['llama']} --context-parallel-size 2 --tensor-model-parallel-size 2 "
        "--sequence-parallel",
        "gpt2-tp2": "--context-parallel-size 2 --tensor-model-parallel-size 2",
        "gpt2-tp2-all_gather": "--context-parallel-size 2 --tensor-model-parallel-size 2 --cp-comm-type all_gather",
        "llama-tp2-recompute": f"{STYLES['llama']} --context-parallel-size 2 --tensor-model-parallel-size 2 "
        "--recompute-granularity full --recompute-method uniform",
        "gpt2-dp2-distopt": "--context-parallel-size 2 --use-distributed-optimizer",
        "llama-dp2-all_gather": f"{STYLES['llama']} --context-parallel-size 2 --cp-comm-type all_gather",
        "llama-pp2": f"{STYLES['llama']} --context-parallel-size 2 --pipeline-model-parallel-size 2",
        "gpt2-pp2": "--context-parallel-size 2 --pipeline-model-parallel-size 2",
    }
    results = run_distributed(_layouts_worker, 4, layouts)
    _assert_matches(results, layouts, reference)
    # Megatron's order: TP fastest, then CP, then DP.
    assert [r["gpt2-tp2"]["coords"] for r in results] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]
    assert [r["gpt2-dp2-distopt"]["coords"] for r in results] == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]


@pytest.mark.parametrize(
    ("flags", "world", "message"),
    [
        (
            "--context-parallel-size 2 --seq-length 30",
            2,
            "--seq-length 30 is not divisible by 2 x --context-parallel-size 2 = 4: context parallelism splits "
            "each sequence into that many equal chunks",
        ),
        (
            "--context-parallel-size 2 --tensor-model-parallel-size 2",
            6,
            "world size 6 is not divisible by --tensor-model-parallel-size 2 x --pipeline-model-parallel-size 1 "
            "x --context-parallel-size 2",
        ),
        (
            "--context-parallel-size 2 --num-experts 4",
            2,
            "--num-experts with --context-parallel-size 2 is not implemented yet (issue 15)",
        ),
    ],
)
def test_bad_context_parallel_settings_are_one_line(flags, world, message):
    with pytest.raises(UserError) as caught:
        parse_config(f"{BASE} {flags}".split()).finalize(world, 250)
    assert str(caught.value) == message


def _saved_activation_bytes(rank: int, world_size: int, seq_length: int) -> int:
    """Bytes autograd keeps for backward in one forward of a 2-layer model at this CP size (per rank)."""
    import torch

    from megatron_lite.core.context_parallel import apply_context_parallel, split_batch_for_cp
    from megatron_lite.core.models.gpt import GPTModel

    cfg = parse_config(f"{BASE} --seq-length {seq_length} --max-position-embeddings {seq_length}".split())
    cfg.finalize(1, 250)
    pstate = initialize_parallel(1, context_parallel_size=world_size)
    model = GPTModel(cfg, pstate)
    apply_context_parallel(model, pstate.cp_group if world_size > 1 else None, "p2p")
    tokens = torch.randint(0, 250, (1, seq_length))
    batch = split_batch_for_cp({"tokens": tokens, "labels": tokens}, world_size, pstate.cp_rank)
    total = 0
    seen: set[int] = set()

    def pack(t):
        nonlocal total
        if t.data_ptr() not in seen and not isinstance(t, torch.nn.Parameter):
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(batch["tokens"], batch.get("position_ids"), labels=batch["labels"]).sum()
    loss.backward()
    return total


def test_cp2_halves_the_activation_memory_of_a_long_sequence():
    # Measured, not computed: the tensors autograd saves during forward, per rank, at seq 2048.
    one = run_distributed(_saved_activation_bytes, 1, 2048)[0]
    per_rank = run_distributed(_saved_activation_bytes, 2, 2048)
    for got in per_rank:
        assert got < 0.6 * one, (got, one)


def _save_worker(rank: int, world_size: int, extra: str) -> dict:
    return _train(extra)


@pytest.mark.slow
def test_checkpoint_saved_at_cp2_resumes_at_cp1(tmp_path, reference):
    # CP does not shard weights: a save at CP=2 (iteration 10) resumes in one process and continues the curve.
    ckpt = tmp_path / "ckpt"
    llama = STYLES["llama"]
    save = f"{llama} --context-parallel-size 2 --save {ckpt} --save-interval 10 --exit-interval 10"
    run_distributed(_save_worker, 2, save)
    resumed = _train(f"{llama} --load {ckpt}")
    assert len(resumed["losses"]) == 10
    assert _max_rel(resumed["losses"], reference["llama"]["losses"][10:]) < RTOL


def test_cp2_with_attention_dropout_is_reproducible(tmp_path):
    # Megatron's default --attention-dropout 0.1 under CP: masks come from the model-parallel stream, so two
    # runs (and a recomputed forward) draw the same ones; the losses differ from the dropout-free run.
    flags = "--context-parallel-size 2 --attention-dropout 0.1 --train-iters 4"
    first, second = (run_distributed(_layouts_worker, 2, {"d": flags})[0]["d"] for _ in range(2))
    assert first["losses"] == second["losses"]
    plain = run_distributed(_layouts_worker, 2, {"p": "--context-parallel-size 2 --train-iters 4"})[0]["p"]
    assert first["losses"] != plain["losses"]


@pytest.mark.slow
def test_cp2_resume_with_dropout_is_bit_exact(tmp_path):
    # Each CP rank gets back its own RNG streams, so the resumed run draws the masks the straight one drew.
    ckpt = tmp_path / "ckpt"
    # The fp32 matmul path pinned: "auto" picks by timing, and separate runs on a loaded machine may differ.
    flags = (
        "--context-parallel-size 2 --attention-dropout 0.1 --hidden-dropout 0.1 --train-iters 8 "
        "--fp32-matmul-precision highest"
    )
    straight = run_distributed(_layouts_worker, 2, {"s": flags})[0]["s"]["losses"]
    run_distributed(_layouts_worker, 2, {"a": f"{flags} --save {ckpt} --save-interval 4 --exit-interval 4"})
    resumed = run_distributed(_layouts_worker, 2, {"b": f"{flags} --load {ckpt}"})[0]["b"]["losses"]
    assert resumed == straight[4:]
