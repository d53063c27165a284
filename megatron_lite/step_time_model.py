"""A step-time model: predicted iteration time, TFLOP/s per GPU, MFU and tokens/s of a layout on a device."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron_lite.config import MegatronConfig
from megatron_lite.core.pipeline_parallel.layers import PipelineSplit
from megatron_lite.model_stats import count_parameters
from megatron_lite.model_stats_pipeline import pipeline_bubble
from megatron_lite.training.flops import num_floating_point_operations

# ---- constants ------------------------------------------------------------------------------------
# The one calibrated constant: the fraction of the datasheet 16-bit peak that the transformer's large
# GEMMs (and the attention batched GEMMs) reach. Fitted once to Narayanan et al. 2021, Table 1
# (tests/data/narayanan2021_table1.json, the geometric mean of published / predicted over its 10 rows).
# cuBLAS reaches 70-80% on large A100 GEMMs alone; this is what the whole forward/backward GEMM mix got.
GEMM_EFFICIENCY = 0.675
# Not fitted (typical published figures): NCCL's bus bandwidth reaches ~80% of the link's peak
# (nccl-tests on DGX A100: ~230 GB/s of NVLink's 300, ~20 GB/s of HDR's 25), and streaming
# element-wise kernels ~80% of the HBM datasheet bandwidth.
LINK_EFFICIENCY = 0.8
MEMORY_EFFICIENCY = 0.8
# Gradient buckets Megatron's DDP reduces while backward runs (--ddp-bucket-size default, parameters):
# the last one cannot overlap with anything.
DDP_BUCKET_PARAMS = 40_000_000
# Adam step bytes per parameter (all fp32 unless noted): read param, grad, m, v (16), write param, m, v
# (12), the gradient norm's read (4), zeroing the gradient (4); + the 16-bit copy (2) under autocast.
OPTIMIZER_BYTES_PER_PARAM = 36


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator and its links. Bandwidths are per GPU and per direction, in GB/s (1e9 bytes)."""

    name: str
    peak_tflops: float  # dense bf16/fp16 tensor-core peak, datasheet (no 2:4 sparsity)
    hbm_gbps: float
    gpus_per_node: int
    intra_node_gbps: float  # NVLink through NVSwitch
    inter_node_gbps: float  # one InfiniBand HCA per GPU (DGX/HGX layout)
    intra_latency_us: float  # per ring step
    inter_latency_us: float
    gemm_efficiency: float = GEMM_EFFICIENCY
    attention_tflops: float | None = None  # attention core rate when measured apart (CPU); else GEMM rate
    link_efficiency: float = LINK_EFFICIENCY
    memory_efficiency: float = MEMORY_EFFICIENCY
    note: str = ""


# Datasheet figures: A100 (312 TFLOP/s bf16, NVLink 3: 600 GB/s both directions, HDR 200 Gb/s HCAs),
# H100 SXM and H200 (989 TFLOP/s, NVLink 4: 900 GB/s both directions, NDR 400 Gb/s HCAs); HBM: A100-40GB
# 1,555 GB/s, A100-80GB 2,039, H100 SXM 3,350, H200 4,800. Latencies are typical NCCL per-step costs.
DEVICES: dict[str, DeviceSpec] = {
    "A100-40GB": DeviceSpec("A100-40GB", 312.0, 1555.0, 8, 300.0, 25.0, 3.0, 8.0),
    "A100-80GB": DeviceSpec("A100-80GB", 312.0, 2039.0, 8, 300.0, 25.0, 3.0, 8.0),
    "H100": DeviceSpec("H100 SXM", 989.4, 3350.0, 8, 450.0, 50.0, 3.0, 8.0),
    "H200": DeviceSpec("H200 SXM", 989.4, 4800.0, 8, 450.0, 50.0, 3.0, 8.0),
}
DEVICE_ALIASES = {"a100": "A100-80GB", "h100": "H100", "h200": "H200"}


def get_device(name: str) -> DeviceSpec:
    """A device by table name (case-insensitive) or 'cpu', which measures this machine (step_time_cpu)."""
    for key, spec in DEVICES.items():
        if key.lower() == name.lower():
            return spec
    if name.lower() in DEVICE_ALIASES:
        return DEVICES[DEVICE_ALIASES[name.lower()]]
    raise KeyError(name)


# ---- the model ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepTimeEstimate:
    """Seconds per iteration on the slowest pipeline stage, and what they are made of."""

    iteration_s: float
    breakdown: dict[str, float]  # component -> seconds per iteration (they sum to iteration_s)
    model_flops_per_gpu: float  # Megatron's formula (what its log line reports)
    hardware_flops_per_gpu: float  # + recomputed forward passes (Narayanan et al.'s count)
    peak_flops: float
    tokens_per_iteration: int
    notes: list[str] = field(default_factory=list)

    @property
    def model_tflops_per_gpu(self) -> float:
        return self.model_flops_per_gpu / self.iteration_s / 1e12

    @property
    def hardware_tflops_per_gpu(self) -> float:
        return self.hardware_flops_per_gpu / self.iteration_s / 1e12

    @property
    def mfu(self) -> float:
        return self.model_flops_per_gpu / self.iteration_s / self.peak_flops

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_iteration / self.iteration_s


def _ring(bytes_: float, ranks: int, gbps: float, latency_us: float, steps_factor: float) -> float:
    """A ring collective over `ranks`: steps_factor x (n-1)/n of the message per rank, plus per-step latency
    (all-reduce: steps_factor 2; all-gather, reduce-scatter: 1)."""
    if ranks <= 1:
        return 0.0
    share = steps_factor * (ranks - 1) / ranks
    return share * bytes_ / (gbps * 1e9) + steps_factor * (ranks - 1) * latency_us * 1e-6


def _all_to_all(bytes_: float, ranks: int, gbps: float, latency_us: float) -> float:
    """Each rank keeps 1/n of its message and exchanges the rest with n - 1 peers."""
    if ranks <= 1:
        return 0.0
    return (ranks - 1) / ranks * bytes_ / (gbps * 1e9) + (ranks - 1) * latency_us * 1e-6


def _link(device: DeviceSpec, span: int) -> tuple[float, float]:
    """(GB/s achieved, latency µs) of a group whose ranks lie within `span` consecutive ranks."""
    if span <= device.gpus_per_node:
        return device.intra_node_gbps * device.link_efficiency, device.intra_latency_us
    return device.inter_node_gbps * device.link_efficiency, device.inter_latency_us


def _layer_flops(cfg: MegatronConfig, b: int) -> tuple[float, float, float]:
    """Model FLOPs of one micro batch of b samples: (per layer, of it the attention core, the logits)."""
    total = num_floating_point_operations(cfg, b)
    logits = 6.0 * b * cfg.seq_length * cfg.hidden_size * cfg.padded_vocab_size
    per_layer = (total - logits) / cfg.num_layers
    core = 12.0 * b * cfg.seq_length**2 * cfg.num_attention_heads * cfg.kv_channels  # QK^T and AV, x3
    return per_layer, core, logits


def materialises_scores(cfg: MegatronConfig, unfused_attention: bool) -> bool:
    """Whether the s x s attention scores go through memory: an explicit softmax (attention dropout, as
    this trainer and 2021 Megatron run it, or --unfused-attention); a flash/SDPA kernel keeps them on chip."""
    return cfg.context_parallel_size == 1 and (unfused_attention or cfg.attention_dropout > 0)


def _forward_bytes_per_token(cfg: MegatronConfig, unfused_attention: bool) -> float:
    """Bytes one layer's memory-bound kernels move per token in forward, on one rank.

    Outside the TP region (split over TP only with SP): two norms (read h, write h) and two
    bias-dropout-add residuals (read 2h, write h): 10h. Inside (split over TP): the QKV split/bias
    (read and write (a + 2g)·kv), the activation (GeLU: read ffn, write ffn; SwiGLU: read 2·ffn,
    write ffn). Materialised attention: scale-mask-softmax and dropout each read and write a·s
    scores, plus the 1-byte dropout mask. Backward moves about twice this.
    """
    elem = 2 if (cfg.bf16 or cfg.fp16) else 4
    tp = cfg.tensor_model_parallel_size
    h, a, g, kv, ffn = (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_query_groups,
        cfg.kv_channels,
        cfg.ffn_hidden_size,
    )
    outside = 10 * h * elem / (tp if cfg.sequence_parallel else 1)
    inside = (2 * (a + 2 * g) * kv + (3 if cfg.swiglu else 2) * ffn) * elem / tp
    scores = 0.0
    if materialises_scores(cfg, unfused_attention):
        scores = a * cfg.seq_length * (4 * elem + (1 if cfg.attention_dropout > 0 else 0)) / tp
    return outside + inside + scores


def estimate_step_time(
    cfg: MegatronConfig,
    device: DeviceSpec,
    *,
    unfused_attention: bool = False,
    grad_reduce_bytes: int = 4,
    ablate: frozenset[str] = frozenset(),
) -> StepTimeEstimate:
    """Predicted time of one training iteration of a finalized cfg on `device`.

    Per micro batch, a pipeline stage runs its layers: GEMM FLOPs at peak x gemm_efficiency, the
    memory-bound kernels' bytes at HBM bandwidth, and the TP/SP collectives (not overlapped), CP's
    K/V ring (overlapped with the attention core), EP's all-to-alls and the PP send/receive. The slowest
    stage (the last one carries the logits) sets the pace; the pipeline bubble stretches it by
    1 + (p - 1)/(v·m). Then the DP gradient reduction (only what backward of the last micro batch does
    not hide, with --overlap-grad-reduce) and the optimizer step. `ablate` drops named components
    (tests use it to show each one matters); grad_reduce_bytes is 4 (fp32 gradients, as this trainer
    reduces them) or 2 (16-bit, as Megatron's fp16 runs without --accumulate-allreduce-grads-in-fp32).
    """
    t, p = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    c, d = cfg.context_parallel_size, cfg.data_parallel_size
    b, s, h = cfg.micro_batch_size, cfg.seq_length, cfg.hidden_size
    m = cfg.num_microbatches
    split = PipelineSplit.from_config(cfg)
    v = split.chunks_per_rank
    elem = 2 if (cfg.bf16 or cfg.fp16) else 4
    full = cfg.recompute_granularity == "full"
    selective = cfg.recompute_granularity == "selective"
    notes: list[str] = []

    gemm_rate = device.peak_tflops * 1e12 * device.gemm_efficiency
    attn_rate = device.attention_tflops * 1e12 if device.attention_tflops else gemm_rate
    hbm = device.hbm_gbps * 1e9 * device.memory_efficiency

    # Compute of one layer for one micro batch on one rank (FLOPs split over TP and CP).
    layer_flops, core_flops, logits_flops = _layer_flops(cfg, b)
    extra = layer_flops / 3 if full else (core_flops / 3 if selective else 0.0)  # recomputed forward
    shard = t * c
    gemm_flops = (layer_flops - core_flops) * (4 / 3 if full else 1.0) / shard
    attn_flops = (core_flops * (4 / 3 if (full or selective) else 1.0)) / shard
    compute = gemm_flops / gemm_rate + attn_flops / attn_rate
    passes = 3 + (1 if full else 0)  # forward, backward (x2), recomputed forward
    memory = passes * b * (s / c) * _forward_bytes_per_token(cfg, unfused_attention) / hbm
    if "memory" in ablate:
        memory = 0.0

    # Tensor/sequence parallel: 2 all-reduces (or all-gather + reduce-scatter pairs, the same bytes)
    # forward, 2 backward, 2 more when full recompute reruns forward.
    tp_bw, tp_lat = _link(device, t)
    message = elem * b * (s / c) * h
    tp_collectives = 4 + (2 if full else 0)
    tp_layer = tp_collectives * _ring(message, t, tp_bw, tp_lat, 2.0)

    # Context parallel: the ring passes K and V chunks C - 1 times forward, K, V, dK, dV backward,
    # overlapped with the attention blocks it feeds.
    cp_layer = 0.0
    if c > 1:
        cp_bw, cp_lat = _link(device, t * c)
        kv_bytes = elem * b * (s / c) * 2 * cfg.num_query_groups * cfg.kv_channels / t
        steps = (c - 1) * (1 + 2 + (1 if full else 0))
        cp_comm = steps * (kv_bytes / (cp_bw * 1e9) + cp_lat * 1e-6)
        cp_layer = max(0.0, cp_comm - attn_flops / attn_rate)

    # Expert parallel: dispatch and combine all-to-alls of the routed tokens (top-k copies of each).
    ep_layer, moe_fraction = 0.0, 0.0
    ep = getattr(cfg, "expert_model_parallel_size", 1) or 1
    if cfg.num_experts is not None and ep > 1:
        from megatron_lite.config.moe_checks import parse_moe_layer_freq

        moe_fraction = sum(parse_moe_layer_freq(cfg.moe_layer_freq, cfg.num_layers)) / cfg.num_layers
        ep_bw, ep_lat = _link(device, t * c * ep)
        routed = elem * b * (s / c) * h * cfg.moe_router_topk / (t if cfg.sequence_parallel else 1)
        ep_layer = (4 + (2 if full else 0)) * _all_to_all(routed, ep, ep_bw, ep_lat) * moe_fraction

    # Stage work per micro batch: its layers, and the logits + loss on the last stage (the slowest).
    layers_on_stage = max(split.layers_per_rank(r) for r in range(p))
    logits_time = logits_flops / shard / gemm_rate
    # The vocab-parallel cross entropy: fp32 logits written, read by softmax, its gradient written and read.
    loss_memory = 4 * 4 * b * (s / c) * cfg.padded_vocab_size / t / hbm
    if "memory" in ablate:
        loss_memory = 0.0
    embed_tp = 2 * _ring(message, t, tp_bw, tp_lat, 2.0)  # embedding output, logits input gradient
    per_mb = {
        "compute (GEMMs, attention)": layers_on_stage * compute + logits_time,
        "memory-bound kernels": layers_on_stage * memory + loss_memory,
        "TP/SP collectives": layers_on_stage * tp_layer + embed_tp,
        "CP ring (exposed)": layers_on_stage * cp_layer,
        "EP all-to-all": layers_on_stage * ep_layer,
    }
    if "tp" in ablate:
        per_mb["TP/SP collectives"] = 0.0

    # Pipeline send/receive: per micro batch and model chunk, the activation forward and its gradient
    # backward (send and receive overlap). With TP, each rank sends 1/t and the stage all-gathers it
    # over NVLink (Megatron's scatter/gather optimization).
    p2p = 0.0
    if p > 1:
        pp_bw, pp_lat = _link(device, cfg.world_size)
        piece = message / t
        gather = 0.0 if cfg.sequence_parallel else _ring(message, t, tp_bw, tp_lat, 1.0)
        p2p = 2 * v * (piece / (pp_bw * 1e9) + pp_lat * 1e-6 + gather)
    per_mb["PP send/receive"] = p2p

    steady = m * sum(per_mb.values())
    bubble_fraction = 0.0 if "bubble" in ablate else pipeline_bubble(p, m, v)
    bubble = steady * bubble_fraction / (1 - bubble_fraction)

    # Data parallel: reduce the stage's gradients (reduce-scatter + all-gather of the parameters with
    # the distributed optimizer); --overlap-grad-reduce hides it behind the last micro batch's backward.
    params = count_parameters(cfg)
    stage_params = layers_on_stage * params.per_rank_per_layer
    stage_params += (params.output_layer or params.word_embeddings) // t + params.final_norm
    dp_ranks = d * c
    dp_bw, dp_lat = _link(device, t * dp_ranks)
    grads = grad_reduce_bytes * stage_params
    if cfg.use_distributed_optimizer:
        dp = _ring(grads, dp_ranks, dp_bw, dp_lat, 1.0)
        if not cfg.overlap_param_gather:
            dp += _ring(4 * stage_params, dp_ranks, dp_bw, dp_lat, 1.0)
    else:
        dp = _ring(grads, dp_ranks, dp_bw, dp_lat, 2.0)
    if cfg.overlap_grad_reduce and dp > 0:
        backward_last = sum(per_mb.values()) * (passes - 1) / passes
        last_bucket = dp * min(1.0, DDP_BUCKET_PARAMS / max(stage_params, 1))
        dp = max(dp - backward_last, last_bucket)
    if "dp" in ablate:
        dp = 0.0

    opt_params = stage_params / (dp_ranks if cfg.use_distributed_optimizer else 1)
    opt_bytes = OPTIMIZER_BYTES_PER_PARAM - (0 if (cfg.bf16 or cfg.fp16) else 2)
    optimizer = opt_params * opt_bytes / hbm

    breakdown = {name: m * value for name, value in per_mb.items()}
    breakdown["pipeline bubble"] = bubble
    breakdown["DP gradient reduction (exposed)"] = dp
    breakdown["optimizer step"] = optimizer
    iteration = sum(breakdown.values())

    world = cfg.world_size
    model_flops = num_floating_point_operations(cfg, cfg.global_batch_size) / world
    hardware_flops = model_flops + extra * cfg.num_layers * cfg.global_batch_size / b / world
    if p > 1 and v > 1:
        notes.append(f"interleaved 1F1B, {v} model chunks per rank")
    if materialises_scores(cfg, unfused_attention):
        notes.append("attention scores through memory (explicit softmax: attention dropout or unfused)")
    if math.isclose(bubble_fraction, 0.0) and p > 1:
        notes.append("pipeline bubble ablated")
    return StepTimeEstimate(
        iteration_s=iteration,
        breakdown=breakdown,
        model_flops_per_gpu=model_flops,
        hardware_flops_per_gpu=hardware_flops,
        peak_flops=device.peak_tflops * 1e12,
        tokens_per_iteration=cfg.global_batch_size * s,
        notes=notes,
    )


def format_estimate(cfg: MegatronConfig, device: DeviceSpec, est: StepTimeEstimate) -> str:
    """The --estimate section of model_stats.py's report."""
    lines = [
        "",
        f"step-time estimate on {device.name} ({device.peak_tflops:.4g} TFLOP/s peak, GEMMs at "
        f"{device.gemm_efficiency:.1%}; HBM {device.hbm_gbps:.4g} GB/s; {device.gpus_per_node} per node, "
        f"links {device.intra_node_gbps:g} / {device.inter_node_gbps:g} GB/s in / across nodes)"
        + (f"; attention core {device.attention_tflops:.4g} TFLOP/s" if device.attention_tflops else "")
        + (f"; {device.note}" if device.note else ""),
        f"  iteration {est.iteration_s * 1e3:,.1f} ms; {est.tokens_per_s:,.0f} tokens/s; "
        f"{est.model_tflops_per_gpu:,.4g} TFLOP/s per GPU (Megatron's formula), MFU {est.mfu:.1%}; "
        f"{est.hardware_tflops_per_gpu:,.4g} TFLOP/s with recomputation",
    ]
    for name, seconds in est.breakdown.items():
        if seconds > 0:
            lines.append(f"  {name:<40} {seconds * 1e3:>14,.2f} ms  {seconds / est.iteration_s:6.1%}")
    lines += [f"  note: {n}" for n in est.notes]
    return "\n".join(lines)


def estimate_report(cfg: MegatronConfig, device_name: str, *, unfused_attention: bool = False) -> str:
    """--estimate DEVICE: the device from the table, or 'cpu' measured now; a one-line error otherwise."""
    if device_name.lower() == "cpu":
        from megatron_lite.step_time_cpu import measure_cpu_device

        device = measure_cpu_device(cfg)
    else:
        try:
            device = get_device(device_name)
        except KeyError:
            from megatron_lite.errors import fail

            fail(f"--estimate {device_name}: unknown device; give one of {', '.join(DEVICES)} or cpu")
    est = estimate_step_time(cfg, device, unfused_attention=unfused_attention)
    return format_estimate(cfg, device, est)
