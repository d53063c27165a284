"""Loading a checkpoint at any TP and DP size: the whole training state, only the weights, or full tensors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from megatron_lite.config import MegatronConfig
from megatron_lite.config.fields import flag_name
from megatron_lite.errors import fail
from megatron_lite.parallel_state import ParallelState
from megatron_lite.readers.checkpoint import SafeFileSystemReader
from megatron_lite.training.checkpointing import keys
from megatron_lite.training.checkpointing.collectives import quiet_single_process, raise_read_failure
from megatron_lite.training.checkpointing.common import read_common, saved_config
from megatron_lite.training.checkpointing.layout import Layout, logical_full
from megatron_lite.training.checkpointing.megatron_common import is_megatron_layout
from megatron_lite.training.checkpointing.megatron_load import (
    full_tensors,
    load_training_state,
    load_weights,
    read_dcp,
    read_metadata,
)
from megatron_lite.training.checkpointing.names import (
    TRACKER_FILENAME,
    read_latest_iteration,
    resolve_checkpoint,
)
from megatron_lite.training.checkpointing.rng import restore_rng
from megatron_lite.training.checkpointing.state_dict import (
    install_optimizer_state,
    model_targets,
    optimizer_targets,
)
from megatron_lite.training.checkpointing.verify import fail_if_damaged, newest_intact_checkpoint
from megatron_lite.training.optimizer import unwrap_model
from megatron_lite.training.state import TrainProgress


def load_checkpoint(
    load_dir: str | os.PathLike | None,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    cfg: MegatronConfig,
    pstate: ParallelState | None,
) -> TrainProgress | None:
    """Restore the latest checkpoint in load_dir into model, optimizer, scheduler and the RNGs.

    Returns None when load_dir holds no checkpoint (a UserError with --exit-on-missing-checkpoint).
    The checkpoint may come from any TP and DP size. --no-load-optim skips the optimizer, --no-load-rng
    the RNG states, and --finetune both plus the scheduler, starting again at iteration 0.
    """
    pstate = pstate or ParallelState()
    if load_dir is None:
        return None
    load_dir = Path(load_dir)
    iteration = read_latest_iteration(load_dir)
    if iteration is None:
        if cfg.exit_on_missing_checkpoint:
            fail(
                f"--load {load_dir} holds no checkpoint ({TRACKER_FILENAME} is missing) and --exit-on-missing-checkpoint is set"
            )
        return None
    ckpt, iteration = newest_intact_checkpoint(load_dir, iteration, pstate)
    common = read_common(ckpt)
    _check_same_model(saved_config(common, ckpt), cfg, ckpt)
    if is_megatron_layout(common):
        release = ckpt.name == "release"
        if release and pstate.rank == 0:
            print(f"> {ckpt} is a release checkpoint: loading its weights only, at iteration 0", flush=True)
        return load_training_state(
            ckpt, iteration, common, model, optimizer, scheduler, cfg, pstate, release=release
        )
    # This project's checkpoints from before it wrote Megatron's layout.
    load_optim = optimizer is not None and not (cfg.no_load_optim or cfg.finetune)
    load_rng = not (cfg.no_load_rng or cfg.finetune)
    if load_optim and common["optimizer"] is None:
        fail(
            f"checkpoint {ckpt} holds no optimizer state (saved with --no-save-optim); pass --no-load-optim or --finetune"
        )
    if load_rng and not common["rng_saved"]:
        fail(f"checkpoint {ckpt} holds no RNG state (saved with --no-save-rng); pass --no-load-rng")

    module = unwrap_model(model)
    targets, finishers = model_targets(module, common["tensors"], pstate, ckpt)
    new_states: dict[torch.nn.Parameter, dict[str, Any]] = {}
    if load_optim:
        optim_targets, optim_finishers, new_states = optimizer_targets(
            optimizer, module, common["tensors"], pstate
        )
        targets.update(optim_targets)
        finishers += optim_finishers
    read_shards(targets, ckpt, pstate)
    for finish in finishers:
        finish()
    if load_optim:
        install_optimizer_state(optimizer, new_states, common["optimizer"])
    if scheduler is not None and not cfg.finetune and common["opt_param_scheduler"] is not None:
        scheduler.load_state_dict(common["opt_param_scheduler"])
    if load_rng:
        restore_rng(ckpt, common, cfg, pstate, iteration)
    if cfg.finetune:
        return TrainProgress()
    extra_state = dict(common["extra_state"])
    return TrainProgress(
        iteration=iteration,
        consumed_train_samples=int(common["consumed_train_samples"]),
        skipped_iterations=int(extra_state.get("skipped_iterations", 0)),
        extra_state=extra_state,
    )


def load_model_weights(
    model: torch.nn.Module,
    ckpt_dir: str | os.PathLike,
    pstate: ParallelState | None = None,
    iteration: int | None = None,
) -> int:
    """Load only the model weights (latest checkpoint unless `iteration`), at any TP size; returns the iteration."""
    pstate = pstate or ParallelState()
    ckpt = resolve_checkpoint(Path(ckpt_dir), iteration)
    fail_if_damaged(ckpt, pstate)
    common = read_common(ckpt)
    if is_megatron_layout(common):
        load_weights(unwrap_model(model), saved_config(common, ckpt).num_layers, ckpt, pstate)
        return int(common.get("iteration", 0))
    targets, finishers = model_targets(unwrap_model(model), common["tensors"], pstate, ckpt)
    read_shards(targets, ckpt, pstate)
    for finish in finishers:
        finish()
    return int(common["iteration"])


def read_full_tensors(
    ckpt_dir: str | os.PathLike, iteration: int | None = None, *, prefix: str = keys.MODEL_PREFIX
) -> dict[str, torch.Tensor]:
    """Every stored tensor under `prefix` as one full, unsharded tensor (vocab rows cut to the true
    vocabulary), read in this one process; for converters, inspection and tests."""
    ckpt = resolve_checkpoint(Path(ckpt_dir), iteration)
    fail_if_damaged(ckpt, ParallelState())
    common = read_common(ckpt)
    if is_megatron_layout(common):
        if prefix == keys.MODEL_PREFIX:
            return full_tensors(ckpt, saved_config(common, ckpt))
        metadata = read_metadata(ckpt)
        wanted = {
            key: torch.empty(tuple(value.size), dtype=value.properties.dtype)
            for key, value in metadata.state_dict_metadata.items()
            if key.startswith(prefix) and hasattr(value, "size")
        }
        read_dcp(wanted, ckpt, ParallelState())
        return {key[len(prefix) :]: tensor for key, tensor in wanted.items()}
    layouts = {
        key: Layout.from_dict(value) for key, value in common["tensors"].items() if key.startswith(prefix)
    }
    buffers = {key: torch.empty(lay.stored_shape, dtype=lay.torch_dtype) for key, lay in layouts.items()}
    read_shards(buffers, ckpt, ParallelState())
    return {key[len(prefix) :]: logical_full(buffers[key], lay) for key, lay in layouts.items()}


def read_shards(targets: dict[str, Any], ckpt: Path, pstate: ParallelState) -> None:
    try:
        with quiet_single_process():
            dcp.load(targets, storage_reader=SafeFileSystemReader(ckpt), no_dist=pstate.world_size == 1)
    except (Exception, CheckpointException) as err:
        raise_read_failure(err, ckpt)


# Model-shape settings: a checkpoint only loads into a model that agrees on all of them. The derived
# ones are compared only when the settings they derive from agree, so one cause gives one complaint.
_MODEL_SHAPE_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "vocab_size",
    "position_embedding_type",
    "normalization",
    "swiglu",
    "squared_relu",
    "untie_embeddings_and_output_weights",
    "add_bias_linear",
    "layernorm_epsilon",
    "layernorm_zero_centered_gamma",
    "qk_layernorm",
    "window_size",
    "quick_geglu",
    "glu_linear_offset",
    "activation_func_clamp_value",
    "softmax_type",
    "window_attn_skip_freq",
    "enable_gpt_oss",
)
_ROPE_FIELDS = (
    "rotary_base",
    "rotary_percent",
    "rotary_interleaved",
    "rotary_seq_len_interpolation_factor",
    "use_rope_scaling",
)
_DERIVED_SHAPE_FIELDS = ("num_query_groups", "kv_channels", "ffn_hidden_size")


def _uses_gelu(cfg: MegatronConfig) -> bool:
    return not (cfg.gated_linear_unit or cfg.squared_relu)


def _check_same_model(saved: MegatronConfig, cfg: MegatronConfig, ckpt: Path) -> None:
    """Refuse a checkpoint of another model: its weights would load, or fail, without saying why."""

    def show(value: Any) -> str:
        if isinstance(value, bool):
            return "on" if value else "off"
        return str(value)

    def differences(names: tuple[str, ...]) -> list[tuple[str, Any, Any]]:
        # Named by the field's own flag; a store_false flag (--disable-bias-linear) reads inverted.
        found = []
        for name in names:
            old, new = getattr(saved, name), getattr(cfg, name)
            if old != new:
                flag = flag_name(name)
                if flag.startswith(("--disable-", "--no-")) and isinstance(old, bool):
                    old, new = not old, not new
                found.append((flag, old, new))
        return found

    found = differences(_MODEL_SHAPE_FIELDS)
    if saved.position_embedding_type == cfg.position_embedding_type == "learned_absolute":
        found += differences(("max_position_embeddings",))
    if saved.position_embedding_type == cfg.position_embedding_type == "rope":
        found += differences(_ROPE_FIELDS)
        if saved.use_rope_scaling and cfg.use_rope_scaling:
            found += differences(("rope_scaling_factor",))
    if _uses_gelu(saved) and _uses_gelu(cfg):
        # Old checkpoints trained the tanh form: resuming one without --openai-gelu would change the model.
        found += differences(("openai_gelu",))
    if saved.qkv_bias != cfg.qkv_bias and saved.add_bias_linear == cfg.add_bias_linear:
        found.append(("QKV bias (--add-qkv-bias/--disable-qkv-bias)", saved.qkv_bias, cfg.qkv_bias))
    if not found:
        found = differences(_DERIVED_SHAPE_FIELDS)
    if found:
        problems = "; ".join(
            f"{flag} {show(old)} in the checkpoint, {show(new)} given" for flag, old, new in found
        )
        fail(f"checkpoint {ckpt} holds a different model: {problems}; give the checkpoint's model flags")
