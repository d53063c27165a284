"""What each Megatron-LM flag without a field of ours does here: an implementation switch, later, or refused."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from megatron_lite.arguments.megatron_flags import MegatronFlag, flags_by_dest
from megatron_lite.errors import fail


@dataclass(frozen=True)
class Policy:
    """How a Megatron flag that has no config field is treated when it is given at a non-default value."""

    kind: (
        str  # "switch": accepted, its effect here stated once at start-up; "later": an open issue; "refused"
    )
    text: str
    allowed: tuple = ()  # values that already work (besides the default)
    gate: str | None = None  # a setting that only matters when this dest is set (e.g. pipeline size > 1)


def _switch(text: str) -> Policy:
    return Policy("switch", text)


def _refused(text: str, *allowed: Any, gate: str | None = None) -> Policy:
    return Policy("refused", text, allowed, gate)


def _later(issue: int, what: str, *allowed: Any, gate: str | None = None) -> Policy:
    return Policy("later", f"{what} is not implemented yet (issue {issue})", allowed, gate)


_CP, _MLA, _PP, _MOE = (
    "context_parallel_size",
    "multi_latent_attention",
    "pipeline_model_parallel_size",
    "num_experts",
)


_FUSED = _switch(
    "no effect: a fused CUDA kernel in Megatron; megatron-lite runs the same math as PyTorch ops"
)
_SDPA = _switch(
    "attention runs through torch's scaled_dot_product_attention (flash / memory-efficient kernels on GPU, "
    "the math kernel on CPU), with the softmax statistics in fp32"
)
_OWN_SHARDS = _switch(
    "no effect: every rank already writes and reads only its own shards with torch.distributed.checkpoint"
)
_GPU_MEMORY = _switch("no effect: a GPU memory-management setting that megatron-lite does not need")
_FP8 = _refused(
    "FP8/FP4 training needs Transformer Engine on a GPU with FP8 (Hopper) or FP4 (Blackwell) units"
)
_CUDA_GRAPHS = _refused("CUDA graphs are a GPU-only feature that megatron-lite does not implement")
_TE_OVERLAP = _refused("overlapping TP communication with GEMMs needs Transformer Engine userbuffers on GPUs")
_NOT_GPT = "{} models only; megatron-lite trains decoder-only GPT models"

# Flags by dest. Order does not matter here; the patterns below apply only to dests not listed.
_BY_DEST: dict[str, Policy] = {
    "transformer_impl": _switch(
        "megatron-lite's own PyTorch layers (the math of Megatron's local spec); Transformer Engine is never used"
    ),
    "deprecated_use_mcore_models": _switch(
        "megatron-lite has one GPT model, built like megatron-core's GPTModel"
    ),
    "use_legacy_models": _refused("Megatron's legacy (non-mcore) models are not implemented; drop the flag"),
    "use_flash_attn": _SDPA,
    "attention_backend": _SDPA,
    "attention_softmax_in_fp32": _SDPA,
    "apply_query_key_layer_scaling": _SDPA,
    "flash_attention_version": _SDPA,
    "accumulate_allreduce_grads_in_fp32": _switch(
        "no effect: parameters and gradients are fp32 under bf16 autocast, so gradients are accumulated and "
        "all-reduced in fp32 already"
    ),
    "ckpt_fully_parallel_save": _OWN_SHARDS,
    "ckpt_fully_parallel_save_deprecated": _OWN_SHARDS,
    "ckpt_fully_parallel_load": _OWN_SHARDS,
    "dist_ckpt_strictness": _switch("loading is always strict: a missing or unexpected tensor is an error"),
    "use_dist_ckpt_deprecated": _switch("torch_dist is the only checkpoint format here"),
    "auto_detect_ckpt_format": _switch("the format is detected from the checkpoint directory always"),
    "empty_unused_memory_level": _GPU_MEMORY,
    "use_cpu_initialization": _switch("no effect: weights are initialized on the CPU and then moved"),
    "nccl_communicator_config_path": _switch("no effect: NCCL communicators use torch's defaults"),
    "check_for_nan_in_loss_and_grad": _switch(
        "megatron-lite always checks: iterations with a non-finite loss or gradient are skipped and counted"
    ),
    "check_for_large_grads": _switch("no effect: non-finite gradients are caught; large finite ones are not"),
    "check_for_spiky_loss": _switch("no effect: the rerun state machine is not part of megatron-lite"),
    "rerun_mode": _switch(
        "no effect: megatron-lite's non-finite skip and checkpoint fallback take the place of Megatron's rerun "
        "state machine"
    ),
    "num_dataset_builder_threads": _switch("no effect: index caches are built on rank 0 with numpy"),
    "dataloader_type": _refused(
        "only the single (sequential, resumable) data loader is implemented", "single"
    ),
    "legacy_tokenizer": _switch("megatron-lite has one implementation of each tokenizer class"),
    "distributed_timeout_seconds_after_init": _switch(
        "--distributed-timeout-minutes covers every collective"
    ),
    "use_gloo_process_groups": _switch("no effect: groups use the run's backend (gloo on CPU, nccl on GPU)"),
    "ddp_bucket_size": _switch("DDP buckets use torch's default size (25 MB)"),
    "ddp_num_buckets": _switch("DDP buckets use torch's default size (25 MB)"),
    "ddp_average_in_collective": _switch("gradients are averaged over data-parallel ranks either way"),
    "ddp_pad_buckets_for_high_nccl_busbw": _GPU_MEMORY,
    "align_grad_reduce": _switch("no effect: DDP starts each bucket's all-reduce as soon as it is ready"),
    "align_param_gather": _switch("no effect: the distributed optimizer gathers parameters after its step"),
    "manual_gc_eval": _switch("garbage is collected around evaluation as around training with --manual-gc"),
    "data_parallel_random_init": _refused("--data-parallel-random-init is not implemented"),
    "use_persistent_ckpt_worker": _switch(
        "the --async-save writer is a thread of each rank (torch.distributed.checkpoint.async_save); there is no "
        "worker process to keep"
    ),
    "async_strategy": _switch("nvrx and mcore both mean torch.distributed.checkpoint.async_save here"),
    "grad_reduce_in_bf16": _switch(
        "gradients are all-reduced in fp32, not bf16: more exact, and twice the bytes on the wire"
    ),
    "disable_bf16_reduced_precision_matmul": _switch(
        "no effect: megatron-lite leaves torch's bf16 GEMM reduction setting at its default"
    ),
    "pad_vocab_size": _switch("no effect"),
    "train_sync_interval": _GPU_MEMORY,
    "tp_comm_overlap": _TE_OVERLAP,
    "tp_comm_overlap_cfg": _TE_OVERLAP,
    "use_torch_fsdp2": _refused(
        "FSDP is not implemented; shard optimizer state with --use-distributed-optimizer"
    ),
    "use_megatron_fsdp": _refused(
        "FSDP is not implemented; shard optimizer state with --use-distributed-optimizer"
    ),
    "data_parallel_sharding_strategy": _refused(
        "FSDP sharding is not implemented; use --use-distributed-optimizer"
    ),
    "use_precision_aware_optimizer": _refused(
        "the precision-aware optimizer needs Transformer Engine's FusedAdam on a GPU"
    ),
    "hierarchical_context_parallel_sizes": _later(15, "context parallelism", gate=_CP),
    "hybrid_context_parallel": _later(15, "context parallelism"),
    "export_force_local_attention": _switch(
        "megatron-lite's attention is always its own PyTorch module (Megatron's local DotProductAttention role)"
    ),
    "spec": _switch("megatron-lite builds its GPT layers from the config; a layer spec is not used"),
    "tokenizer_hf_no_use_fast": _switch("no effect: the tokenizer class transformers picks is used"),
    "exit_signal_handler_for_training": _switch(
        "SIGTERM handling is on in megatron-lite whenever training runs"
    ),
    "exit_signal_handler_for_dataloader": _switch("no effect: data loader workers ignore SIGTERM"),
}

# Patterns over dests; the first match wins.
_BY_PATTERN: list[tuple[str, Policy]] = [
    (
        r"^(fp8|fp4)($|_)|_fp8$|^first_last_layers_bf16$|^num_layers_at_(start|end)_in_bf16$|^te_precision",
        _FP8,
    ),
    (r"(^|_)cuda_graph|^enable_cuda_graph$|^external_cuda_graph$|^optimizer_cuda_graph$", _CUDA_GRAPHS),
    (r"^tp_comm_", _TE_OVERLAP),
    (
        r"fusion($|_impl$)|_fuser$|^fused_|^moe_router_fusion$|^persist_layer_norm$|^no_persist_layer_norm$",
        _FUSED,
    ),
    (r"^async_tensor_model_parallel_allreduce$|^gradient_reduce_div_fusion$|^mla_down_proj_fusion$", _FUSED),
    (
        # Gated on the pipeline size (a config field; gates see fields too): at PP=1 these change nothing.
        r"pipeline|virtual_stage|_pp_|p2p_comm|^overlap_p2p|^account_for_|^microbatch_group_size",
        _later(13, "this pipeline-parallel option", gate=_PP),
    ),
    (
        r"^decoder_(first|last)_pipeline|^use_ring_exchange_p2p$|^defer_embedding_wgrad",
        _later(13, "this pipeline-parallel option", gate=_PP),
    ),
    # --num-experts and the MoE options megatron-lite has are config fields; these are the rest, gated on
    # --num-experts: without experts they change nothing (a notice says so).
    (r"^moe_|^expert_|^num_moe_experts$", _later(14, "this mixture-of-experts option", gate=_MOE)),
    (
        r"^cache_mla_latents$",
        _refused(
            "--cache-mla-latents needs Megatron's dynamic inference engine with FlashMLA (GPU)", gate=_MLA
        ),
    ),
    (r"^mtp_", _refused("multi-token prediction (--mtp-*) is not implemented")),
    (r"^ckpt_fully_parallel|^dist_ckpt_|^ckpt_pg_", _OWN_SHARDS),
    (
        r"^(one_logger|enable_one_logger|app_tag_run)",
        _switch("no effect: NVIDIA's one-logger telemetry is not part of megatron-lite"),
    ),
    (r"straggler", _switch("no effect: Megatron's straggler detector is not part of megatron-lite")),
    (
        r"^(enable_ft_package|calc_ft_timeouts|ft_num_warmup)",
        _switch("no effect: torchrun --max-restarts restarts the job; resume is automatic"),
    ),
    (r"^inprocess_", _switch("no effect: torchrun --max-restarts restarts the job; resume is automatic")),
    (
        r"^otel_|^run_workload_inspector|^enable_msc$|^disable_msc|^fault_injector",
        _switch("no effect: an NVIDIA cluster service not part of megatron-lite"),
    ),
    (
        r"^(mamba_|hybrid_|is_hybrid_model$|linear_|use_mamba|gdp_|disable_mamba)",
        _refused(_NOT_GPT.format("Mamba / hybrid")),
    ),
    (
        r"^(dsa_|mhc_|experimental_attention_variant$|enable_mhc)",
        _refused("this attention variant is not implemented"),
    ),
    (r"^(mup_|use_mup$)", _refused("muP parametrization is not implemented")),
    (r"^(muon_|lion_)", _refused("only the adam and sgd optimizers are implemented")),
    (r"^(retro_|retriever_)", _refused(_NOT_GPT.format("RETRO"))),
    (r"^(grpo_|rl_|langrl_|perform_rl_step$|refit_method$)", _refused(_NOT_GPT.format("RL fine-tuning"))),
    (r"^(logits_load_|logits_save_)", _refused(_NOT_GPT.format("distillation"))),
    (r"^kitchen_|^use_kitchen", _refused("NVIDIA Kitchen quantization needs its GPU library")),
    (r"^heterogeneous_", _refused(_NOT_GPT.format("heterogeneous (NAS) architectures"))),
    (
        r"^inference_|^mamba_inference|^num_speculative_tokens$",
        _switch("no effect on training: a text-generation server setting"),
    ),
    (
        r"^(log_energy|log_device_memory_used|log_straggler|barrier_with_L1_time)$",
        _switch("no effect: a GPU telemetry option"),
    ),
    (
        r"^(cpu_offloading|offload_|fine_grained_activation_offloading|activation_offload|optimizer_cpu_offload|"
        r"optimizer_offload_fraction|overlap_cpu_optimizer|pin_cpu_|use_torch_optimizer_for_cpu_offload|delay_offload|"
        r"min_offloaded_tensor_size|delta_offload|fine_grained_offloading)",
        _refused("GPU memory offloading is not implemented"),
    ),
    (
        r"^(ddp_|nccl_ub|use_sharp|sharp_enabled_group|create_all_gather_group|disable_symmetric_registration|"
        r"symmetric_ar_type|high_priority|fsdp_|megatron_fsdp|outer_dp_sharding|torch_fsdp2|enable_full_sharding)",
        _switch("no effect: an NCCL / DDP tuning knob; megatron-lite uses torch's DDP defaults"),
    ),
    (
        r"^flight_recorder",
        _switch("no effect: torch's NCCL flight recorder is configured by its own environment variables"),
    ),
]

# Whole argparse groups of Megatron's parser that are about other model families or services.
_BY_GROUP: dict[str, Policy] = {
    "vision": _refused(_NOT_GPT.format("vision")),
    "biencoder": _refused(_NOT_GPT.format("biencoder/ICT")),
    "rl": _refused(_NOT_GPT.format("RL fine-tuning")),
    "sft": _refused("supervised fine-tuning datasets are not implemented; pretrain on .bin/.idx data"),
    "inference": _switch("no effect on training: a text-generation server setting"),
    "autoresume": _switch("no effect: ADLR autoresume is NVIDIA-internal; resume is automatic with --load"),
    "profiling": _refused(
        "this profiler option is not implemented (--profile and torch.profiler's options are)", gate="profile"
    ),
    "modelopt-generic": _refused(
        "NVIDIA ModelOpt (quantization, distillation, export) is not part of megatron-lite"
    ),
}

_DEFAULT = _refused("not implemented in megatron-lite")


def policy(flag: MegatronFlag) -> Policy:
    """The treatment of a Megatron flag that has no config field."""
    if flag.dest in _BY_DEST:
        return _BY_DEST[flag.dest]
    for pattern, result in _BY_PATTERN:
        if re.search(pattern, flag.dest):
            return result
    return _BY_GROUP.get(flag.group, _DEFAULT)


def describe(flag: MegatronFlag) -> str:
    """--help text for a Megatron flag without a field."""
    p = policy(flag)
    label = {"switch": "accepted", "later": "not yet", "refused": "refused"}[p.kind]
    return f"Megatron-LM flag ({label}: {p.text}; default: {flag.default})"


def _is_default(flag: MegatronFlag, value: Any) -> bool:
    """Whether a value equals Megatron's default, allowing for its spelling (`1` and `1.0`, `x` and `[x]`)."""

    def word(item: Any) -> str:
        if isinstance(item, bool) or item is None:
            return str(item)
        try:
            return str(float(item))
        except (TypeError, ValueError):
            return str(item)

    def words(v: Any) -> list[str]:
        return [word(i) for i in (v if isinstance(v, (list, tuple)) else [v])]

    return value == flag.default or words(value) == words(flag.default)


def check_megatron_args(
    values: dict[str, Any], source: dict[str, str], settings: dict[str, Any] | None = None
) -> list[str]:
    """Refuse what cannot run; return the start-up notices for implementation switches (one line each).

    `source` names where each value came from (the flag as typed, or the YAML file and key); `settings`
    are the config fields given, which gates may name (e.g. --pipeline-model-parallel-size).
    """
    gates = {**(settings or {}), **values}
    notices: list[str] = []
    table = flags_by_dest()
    for dest, value in values.items():
        flag = table[dest]
        p = policy(flag)
        given = _given(flag, value, source.get(dest))
        if p.kind == "switch":
            # Never silent: a switch is reported even when given at Megatron's default.
            notices.append(f"{given}: {p.text}")
        elif _is_default(flag, value) or value in p.allowed or str(value) in (str(a) for a in p.allowed):
            continue
        elif p.gate is not None and not _active(p.gate, gates):
            notices.append(f"{given}: no effect without {table[p.gate].option}")
        elif p.kind == "later":
            fail(f"{given}: {p.text}")
        else:
            fail(f"{given}: {p.text}")
    return notices


def _active(dest: str, values: dict[str, Any]) -> bool:
    """Whether the setting that enables a feature is on (a size above 1, a count, a switch)."""
    value = values.get(dest)
    return value not in (None, False, 0, 1)


def _given(flag: MegatronFlag, value: Any, yaml_key: str | None) -> str:
    """The flag as the user gave it: `--fp8-format hybrid`, `--use-mcore-models`, or `file.yaml: key: value`."""
    if yaml_key is not None:
        return f"{yaml_key}: {value}"
    if flag.action == "boolean_optional":
        return flag.option if value else "--no-" + flag.option[2:]
    if not flag.takes_value:
        return flag.option
    shown = " ".join(map(str, value)) if isinstance(value, list) else str(value)
    return f"{flag.option} {shown}"


def check_implemented_choices(values: dict[str, Any]) -> None:
    """Refuse a value that Megatron accepts for a field but megatron-lite does not implement, in one line."""
    from megatron_lite.config import config_fields

    for f in config_fields():
        choices = f.metadata.get("choices")
        value = values.get(f.name)
        if choices is None or value is None:
            continue
        # nargs="+" fields hold lists: each item must be implemented.
        items = value if isinstance(value, list) else [value]
        value = next((item for item in items if item not in choices), None)
        if value is None:
            continue
        flag = flags_by_dest().get(f.name)
        name = flag.option if flag is not None else "--" + f.name.replace("_", "-")
        fail(
            f"{name} {value} is not implemented in megatron-lite (implemented: {', '.join(map(str, choices))})"
        )
