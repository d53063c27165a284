"""model_stats: published GPT-2 parameter counts, equality with the real GPTModel, memory and the CLI."""

import subprocess
import sys

import pytest
import torch
from dist_utils import run_distributed

from megatron_lite.core.models.gpt import GPTModel
from megatron_lite.errors import UserError
from megatron_lite.model_stats import (
    MB,
    build_sizing_config,
    compute_stats,
    count_parameters,
    estimate_activations,
)
from megatron_lite.parallel_state import ParallelState

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]

# HuggingFace's GPT-2 counting: vocab 50257 unpadded, context 1024, all biases, tied embeddings.
HF_GPT2 = [
    "--vocab-size",
    "50257",
    "--make-vocab-size-divisible-by",
    "1",
    "--max-position-embeddings",
    "1024",
]
UNTIED_NO_QKV_BIAS = ["--untie-embeddings-and-output-weights", "--disable-qkv-bias"]


def shape(layers: int, hidden: int, heads: int) -> list[str]:
    return ["--num-layers", str(layers), "--hidden-size", str(hidden), "--num-attention-heads", str(heads)]


def test_gpt2_124m_as_huggingface_counts_it():
    cfg, _ = build_sizing_config(shape(12, 768, 12) + HF_GPT2)
    assert cfg.padded_vocab_size == 50257
    assert count_parameters(cfg).total == 124_439_808


@pytest.mark.parametrize(
    "dims, params, megabytes",
    [
        ((12, 768, 12), 163_009_536, "621.83"),
        ((24, 1024, 16), 406_212_608, "1549.58"),
        ((36, 1280, 20), 838_220_800, "3197.56"),
        ((48, 1600, 25), 1_637_792_000, "6247.68"),
    ],
)
def test_gpt2_family_untied_without_qkv_bias(dims, params, megabytes):
    cfg, _ = build_sizing_config(shape(*dims) + HF_GPT2 + UNTIED_NO_QKV_BIAS)
    stats = compute_stats(cfg)
    assert stats.params.total == params
    assert stats.params.per_rank == params
    assert stats.weights_bytes == 4 * params
    assert f"{stats.weights_bytes / MB:.2f}" == megabytes


# Configs for the analytic-vs-real comparison: GPT-2 style, LLaMA style (GQA, SwiGLU, RMSNorm, RoPE,
# untied, no biases), Qwen style (QKV bias only), and odd sizes (kv-channels, ffn, padded vocab).
MODEL_FLAGS = {
    "gpt2": shape(3, 96, 4) + ["--seq-length", "64", "--vocab-size", "1000"],
    "llama": shape(2, 128, 8)
    + ["--seq-length", "64", "--vocab-size", "1000", "--group-query-attention", "--num-query-groups", "2"]
    + ["--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope"]
    + ["--untie-embeddings-and-output-weights", "--disable-bias-linear"],
    "qwen": shape(2, 64, 4)
    + ["--seq-length", "32", "--vocab-size", "300", "--disable-bias-linear", "--add-qkv-bias"]
    + ["--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope"],
    "odd": shape(2, 80, 4)
    + ["--seq-length", "16", "--max-position-embeddings", "48", "--vocab-size", "257"]
    + ["--kv-channels", "24", "--ffn-hidden-size", "200", "--disable-qkv-bias"],
}


@pytest.mark.parametrize("name", sorted(MODEL_FLAGS))
def test_count_equals_real_model_on_meta_device(name):
    cfg, _ = build_sizing_config(MODEL_FLAGS[name])
    with torch.device("meta"):
        model = GPTModel(cfg, ParallelState())
    counted = count_parameters(cfg)
    assert counted.total == sum(p.numel() for p in model.parameters())
    assert counted.per_rank == counted.total


def _per_rank_numel(rank: int, world_size: int, argvs: list[list[str]]) -> list[tuple[int, int]]:
    from megatron_lite.parallel_state import initialize_parallel

    pstate = initialize_parallel(2, device="cpu")
    counts = []
    for argv in argvs:
        cfg, _ = build_sizing_config(argv + ["--tensor-model-parallel-size", "2", "--world-size", "2"])
        with torch.device("meta"):
            model = GPTModel(cfg, pstate)
        counts.append((sum(p.numel() for p in model.parameters()), count_parameters(cfg).per_rank))
    return counts


def test_per_rank_count_equals_real_tp2_shards():
    names = ("gpt2", "llama")
    results = run_distributed(_per_rank_numel, 2, [MODEL_FLAGS[n] for n in names])
    for rank_counts in results:
        for name, (real, counted) in zip(names, rank_counts):
            assert real == counted, name
            assert counted < count_parameters(build_sizing_config(MODEL_FLAGS[name])[0]).total


def test_tp_layout_per_rank_and_distributed_optimizer():
    flags = shape(12, 768, 12) + ["--seq-length", "1024", "--vocab-size", "50257"]
    full, _ = build_sizing_config(flags)
    cfg, _ = build_sizing_config(
        flags
        + ["--tensor-model-parallel-size", "2", "--data-parallel-size", "4", "--use-distributed-optimizer"]
    )
    assert (cfg.world_size, cfg.data_parallel_size, cfg.padded_vocab_size) == (8, 4, 50432)
    p = count_parameters(cfg)
    # Replicated per rank: 2 LayerNorms (4h) and the proj/fc2 biases (2h) per layer, final norm, positions.
    replicated = 12 * 6 * 768 + 2 * 768 + 1024 * 768
    assert p.per_rank == (p.total - replicated) // 2 + replicated
    # TP 2 pads the vocabulary to a multiple of 256 instead of 128: 128 more (tied) embedding rows.
    assert p.total == count_parameters(full).total + (50432 - 50304) * 768
    stats = compute_stats(cfg)
    assert stats.optimizer_bytes == 8 * -(-p.per_rank // 4)
    assert stats.grads_bytes == 4 * p.per_rank


def test_activations_follow_korthikanti():
    flags = shape(12, 768, 12) + ["--seq-length", "1024", "--vocab-size", "50257", "--bf16"]
    s, b, h, a = 1024, 4, 768, 12
    # Attention dropout on (default 0.1): the explicit softmax keeps the s x s terms: sbh(34 + 5as/h).
    cfg, _ = build_sizing_config(flags + ["--micro-batch-size", str(b)])
    assert estimate_activations(cfg, b).per_layer == s * b * h * (34 + 5 * a * s / h)
    # SDPA path (no attention dropout): the 5as/h term goes away.
    cfg, _ = build_sizing_config(flags + ["--attention-dropout", "0"])
    assert estimate_activations(cfg, b).per_layer == s * b * h * 34
    # Unfused attention without dropout: probabilities kept in and out of softmax, but no mask byte.
    cfg, unfused = build_sizing_config(flags + ["--attention-dropout", "0", "--unfused-attention"])
    assert unfused and estimate_activations(cfg, b, unfused_attention=True).per_layer == s * b * h * (
        34 + 4 * a * s / h
    )
    # Selective recompute drops it too.
    cfg, _ = build_sizing_config(flags + ["--recompute-activations"])
    assert estimate_activations(cfg, b).per_layer == s * b * h * 34
    # Tensor parallel t=2: 10 + 24/t without sequence parallelism, 34/t with it.
    tp = ["--tensor-model-parallel-size", "2", "--attention-dropout", "0"]
    cfg, _ = build_sizing_config(flags + tp)
    assert estimate_activations(cfg, b).per_layer == s * b * h * (10 + 24 / 2)
    cfg, _ = build_sizing_config(flags + tp + ["--sequence-parallel"])
    assert estimate_activations(cfg, b).per_layer == s * b * h * 34 / 2
    # Full uniform recompute, 1 layer per chunk: 12 layer inputs (2sbh each) + one layer live.
    cfg, _ = build_sizing_config(
        flags
        + ["--attention-dropout", "0", "--recompute-granularity", "full", "--recompute-method", "uniform"]
    )
    assert estimate_activations(cfg, b).layers == 12 * 2 * s * b * h + s * b * h * 34
    # fp32 activations and no dropout masks: 4 norm/linear inputs + 12 inside, 4 bytes each.
    cfg, _ = build_sizing_config(
        shape(12, 768, 12)
        + ["--seq-length", "1024", "--vocab-size", "50257"]
        + ["--attention-dropout", "0", "--hidden-dropout", "0"]
    )
    assert estimate_activations(cfg, b).per_layer == s * b * h * 4 * 16


def test_sizing_rejects_inconsistent_layout():
    with pytest.raises(UserError, match="--world-size 6 does not equal --data-parallel-size 2 x"):
        build_sizing_config(
            shape(2, 64, 4)
            + ["--seq-length", "8", "--tensor-model-parallel-size", "2"]
            + ["--world-size", "6", "--data-parallel-size", "2"]
        )


def test_cli_prints_counts_and_fails_in_one_line(tmp_path):
    yaml_file = tmp_path / "gpt2.yaml"
    yaml_file.write_text(
        "language_model:\n  num_layers: 12\n  hidden_size: 768\n  num_attention_heads: 12\n"
        "max_position_embeddings: 1024\nvocab_size: 50257\nmake_vocab_size_divisible_by: 1\n"
    )
    script = str(ROOT / "tools" / "model_stats.py")
    done = subprocess.run(
        [sys.executable, script, "--yaml-cfg", str(yaml_file), "--micro-batch-size", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "total                                           124,439,808" in done.stdout
    assert "weights (fp32)                                    474.70 MB" in done.stdout
    assert "per token" in done.stdout and "per iteration (2 x 1024 tokens)" in done.stdout

    bad = subprocess.run(
        [sys.executable, script, "--hidden-size", "768", "--num-attention-heads", "12", "--seq-length", "8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr == "error: --num-layers is required\n"
    assert bad.stdout == ""


def test_context_parallel_divides_activations_and_shards_optimizer_over_dp_x_cp():
    flags = shape(4, 512, 8) + ["--seq-length", "8192", "--vocab-size", "50257", "--attention-dropout", "0"]
    one, _ = build_sizing_config(flags)
    cp, _ = build_sizing_config(
        flags + ["--context-parallel-size", "4", "--world-size", "8", "--use-distributed-optimizer"]
    )
    assert (cp.data_parallel_size, cp.context_parallel_size) == (2, 4)
    # Every activation term is linear in this rank's positions (8192 / 4) when no s x s term is kept.
    whole, quarter = estimate_activations(one, 1), estimate_activations(cp, 1)
    assert quarter.per_layer * 4 == whole.per_layer and quarter.total * 4 == pytest.approx(whole.total)
    # The distributed optimizer shards over the 8 ranks that hold the same weights (DP x CP).
    per_rank = count_parameters(cp).per_rank
    assert compute_stats(cp).optimizer_bytes == 8 * -(-per_rank // 8)
