"""Model FLOPs per iteration (Megatron's dense formula) and device peak FLOP/s, for TFLOP/s and MFU."""

from __future__ import annotations

import re
import time

import torch
import torch.nn.functional as F

from megatron_lite.config import MegatronConfig
from megatron_lite.errors import fail


def num_floating_point_operations(cfg: MegatronConfig, batch_size: int) -> float:
    """Forward + backward FLOPs of one iteration over `batch_size` samples of cfg.seq_length tokens.

    Megatron's dense-model count (training.py): 12·B·s·L·h²·[(1 + g/a + s/h)·(a·kv/h)
    + (ffn/h)·(1.5 with SwiGLU) + V/(2·L·h)], where 12 = 2 FLOPs per multiply-add x 3 for
    forward + backward (backward costs two matmuls per forward one), V is the padded vocabulary
    and g the number of query groups. The s/h term counts the full (unmasked) s x s attention
    matrix, as Megatron does; norms, softmax and elementwise ops are not counted. With
    --multi-latent-attention the attention term is Megatron's MLA branch (mla_flops_per_token_and_layer).
    """
    _need_finalized(cfg)
    s, layers, h = cfg.seq_length, cfg.num_layers, cfg.hidden_size
    a, g = cfg.num_attention_heads, cfg.num_query_groups
    if getattr(cfg, "multi_latent_attention", False):
        attention = mla_flops_per_token_and_layer(cfg) / (12.0 * h * h)
    else:
        query_ratio = a * cfg.kv_channels / h
        attention = (1 + g / a + s / h) * query_ratio
    mlp = (_mlp_width(cfg) / h) * (1.5 if cfg.swiglu else 1.0)
    logits = cfg.padded_vocab_size / (2 * layers * h)
    return 12.0 * batch_size * s * layers * h * h * (attention + mlp + logits)


def mla_flops_per_token_and_layer(cfg: MegatronConfig) -> float:
    """Multi-latent attention's forward + backward FLOPs per token and layer, Megatron's MLA branch
    (training.py): 6·[q_term + kv_lora·(h + a·(qk + v) + 1) + h·pos + a·v·h] for the projections (the +1s
    are its norms) plus 6·s·a·(qk + pos + v)/2 for the core attention (causal: half the s x s scores, as
    Megatron counts MLA). q_term is h·a·(qk + pos) without --q-lora-rank, else q_lora·(h + a·(qk + pos) + 1)."""
    h, a, s = cfg.hidden_size, cfg.num_attention_heads, cfg.seq_length
    q_head = cfg.qk_head_dim + cfg.qk_pos_emb_head_dim
    if cfg.q_lora_rank is None:
        q_term = h * a * q_head
    else:
        q_term = cfg.q_lora_rank * (h + a * q_head + 1)
    kv_term = (
        cfg.kv_lora_rank * (h + a * (cfg.qk_head_dim + cfg.v_head_dim) + 1) + h * cfg.qk_pos_emb_head_dim
    )
    projections = 6.0 * (q_term + kv_term + a * cfg.v_head_dim * h)
    core = 6.0 * s * (a * q_head / 2 + a * cfg.v_head_dim / 2)
    return projections + core


def _mlp_width(cfg: MegatronConfig) -> float:
    """The ffn width a token passes through per layer, averaged over layers: dense layers' ffn, MoE
    layers' top-k routed experts plus the shared experts (active parameters only, as Megatron counts;
    the router's small GEMM is not counted)."""
    if getattr(cfg, "num_experts", None) is None:
        return cfg.ffn_hidden_size
    from megatron_lite.config.moe_checks import parse_moe_layer_freq

    pattern = parse_moe_layer_freq(cfg.moe_layer_freq, cfg.num_layers)
    moe_fraction = sum(pattern) / cfg.num_layers
    moe = cfg.moe_ffn_hidden_size * cfg.moe_router_topk + (cfg.moe_shared_expert_intermediate_size or 0)
    return cfg.ffn_hidden_size * (1 - moe_fraction) + moe * moe_fraction


def flops_per_token(cfg: MegatronConfig) -> float:
    """Training (forward + backward) FLOPs per token at cfg.seq_length."""
    return num_floating_point_operations(cfg, 1) / cfg.seq_length


def _need_finalized(cfg: MegatronConfig) -> None:
    missing = [
        n
        for n in ("kv_channels", "ffn_hidden_size", "padded_vocab_size", "seq_length")
        if getattr(cfg, n) is None
    ]
    if missing:
        raise ValueError(f"FLOPs need a finalized config (cfg.finalize()); missing {', '.join(missing)}")


# ---- device peaks ---------------------------------------------------------------------------------
# Dense (no 2:4 sparsity) peak TFLOP/s from the vendors' datasheets and architecture whitepapers:
# (bf16/fp16 tensor core with fp32 accumulate, tf32 tensor core, plain fp32). GeForce cards run
# fp16/bf16 with fp32 accumulation at half the fp16-accumulate rate, which is what training uses.
# Patterns are tried in order against the lower-cased torch.cuda.get_device_name(), so the more
# specific variants come first.
_GPU_PEAK_TFLOPS: list[tuple[str, str, float, float, float]] = [
    # (regex, canonical name, bf16/fp16, tf32, fp32)
    (r"\bgh200\b", "GH200", 989.4, 494.7, 66.9),
    (r"\bh200\b.*\bnvl\b", "H200 NVL", 835.5, 417.5, 60.0),
    (r"\bh200\b", "H200 SXM", 989.4, 494.7, 66.9),
    (r"\bh100\b.*\bnvl\b", "H100 NVL", 835.5, 417.5, 60.0),
    (r"\bh100\b.*\bpcie\b", "H100 PCIe", 756.0, 378.0, 51.2),
    (r"\bh100\b", "H100 SXM", 989.4, 494.7, 66.9),
    (r"\bh800\b.*\bpcie\b", "H800 PCIe", 756.0, 378.0, 51.2),
    (r"\bh800\b", "H800 SXM", 989.4, 494.7, 66.9),
    (r"\ba100\b", "A100", 312.0, 156.0, 19.5),
    (r"\ba800\b", "A800", 312.0, 156.0, 19.5),
    (r"\ba10g\b", "A10G", 125.0, 62.5, 31.2),
    (r"\ba10\b", "A10", 125.0, 62.5, 31.2),
    (r"\bl40s\b", "L40S", 366.0, 183.0, 91.6),
    (r"\bl40\b", "L40", 181.0, 90.5, 90.5),
    (r"\bl4\b", "L4", 121.0, 60.0, 30.3),
    (r"\ba6000\b", "RTX A6000", 154.8, 77.4, 38.7),
    (r"\ba40\b", "A40", 149.7, 74.8, 37.4),
    (r"rtx 6000 ada", "RTX 6000 Ada", 364.2, 182.1, 91.1),
    (r"\brtx 4090\b", "RTX 4090", 165.2, 82.6, 82.6),
    (r"\brtx 3090 ti\b", "RTX 3090 Ti", 80.0, 40.0, 40.0),
    (r"\brtx 3090\b", "RTX 3090", 71.0, 35.6, 35.6),
    # Volta and Turing have fp16 tensor cores only; bf16 runs without them, near the fp32 rate.
    (r"\bv100\b.*\bpcie\b", "V100 PCIe", 112.0, 14.0, 14.0),
    (r"\bv100\b", "V100 SXM2", 125.0, 15.7, 15.7),
    (r"\bt4\b", "T4", 65.0, 8.1, 8.1),
]
_NO_BF16_TENSOR_CORES = {"V100 PCIe", "V100 SXM2", "T4"}


def gpu_peak_flops_from_name(
    device_name: str, dtype: torch.dtype, tf32: bool = True
) -> tuple[float, str] | None:
    """Dense peak FLOP/s of a known GPU by its CUDA device name, or None when the name is not in the table."""
    lowered = device_name.lower()
    for pattern, name, half, tf32_peak, fp32 in _GPU_PEAK_TFLOPS:
        if not re.search(pattern, lowered):
            continue
        if dtype == torch.float16 or (dtype == torch.bfloat16 and name not in _NO_BF16_TENSOR_CORES):
            tflops, kind = half, f"{_dtype_name(dtype)} tensor core"
        elif dtype == torch.bfloat16:
            tflops, kind = fp32, "bf16 without tensor cores (fp32 rate)"
        elif dtype == torch.float32 and tf32:
            tflops, kind = tf32_peak, "tf32 tensor core"
        elif dtype == torch.float32:
            tflops, kind = fp32, "fp32"
        else:
            return None
        return tflops * 1e12, f"{name} datasheet peak, {kind}, dense: {tflops:g} TFLOP/s"
    return None


def device_peak_flops(
    device: torch.device, dtype: torch.dtype, override_tflops: float | None = None
) -> tuple[float, str]:
    """Peak FLOP/s for MFU and where the number came from.

    Order: the override (--peak-tflops); on CUDA the datasheet table by device name (fp32 counts as
    tf32 when torch allows tf32 matmuls); otherwise a short matmul measurement, done once per process
    for each (device, dtype, thread count).
    """
    if override_tflops is not None:
        if override_tflops <= 0:
            fail(f"--peak-tflops must be positive, got {override_tflops}")
        return override_tflops * 1e12, f"given by --peak-tflops: {override_tflops:g} TFLOP/s"
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
        found = gpu_peak_flops_from_name(name, dtype, tf32=tf32)
        if found is not None:
            return found
    return measure_matmul_flops(device, dtype)


_MEASURED: dict[tuple[str, torch.dtype, int, str], tuple[float, str]] = {}


def measure_matmul_flops(
    device: torch.device, dtype: torch.dtype, budget_s: float = 0.5, *, use_cache: bool = True
) -> tuple[float, str]:
    """Best matmul FLOP/s over a few square sizes in `dtype`, timed for about `budget_s` in all.

    F.linear is timed because it is what nn.Linear and the model's linear layers call, so the
    measurement follows the same kernel choice (MKL or oneDNN, the fp32 matmul precision setting).
    The result is cached per (device, dtype, threads, fp32 precision); use_cache=False measures
    again and keeps the better of the two (on a shared machine a later quiet moment may show more).
    """
    device = torch.device(device)
    threads = torch.get_num_threads()
    key = (str(device), dtype, threads, torch.get_float32_matmul_precision())
    if use_cache and key in _MEASURED:
        return _MEASURED[key]
    sizes = (512, 1024, 2048) if device.type == "cpu" else (4096, 8192)
    best = 0.0
    best_size = sizes[0]
    generator = torch.Generator(device="cpu").manual_seed(0)
    for n in sizes:
        flop = 2.0 * n**3
        if best > 0 and 2 * flop / best > budget_s:
            break  # slow dtype on this device (e.g. fp16 on CPU): two calls would blow the budget
        x = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
        w = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
        _timed_linear(x, w)  # warm-up: first call picks and primes the kernel
        deadline = time.perf_counter() + budget_s / len(sizes)
        reps = 0
        while reps < 2 or (time.perf_counter() < deadline and reps < 50):
            rate = flop / max(_timed_linear(x, w), 1e-9)
            if rate > best:
                best, best_size = rate, n
            reps += 1
    where = "CPU" if device.type == "cpu" else torch.cuda.get_device_name(device)
    text = (
        f"measured on {where}: {_dtype_name(dtype)} matmul, {threads} thread{'s' if threads != 1 else ''}, "
        f"best at {best_size}^3: {best / 1e12:.3f} TFLOP/s"
    )
    if key in _MEASURED and _MEASURED[key][0] >= best:
        return _MEASURED[key]
    _MEASURED[key] = (best, text)
    return best, text


def _timed_linear(x: torch.Tensor, w: torch.Tensor) -> float:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    start = time.perf_counter()
    F.linear(x, w)
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - start


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
