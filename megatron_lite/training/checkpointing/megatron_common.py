"""common.pt in Megatron-LM's form (its `args` Namespace, iteration, scheduler) with our extras, and reading it back."""

# Megatron-LM's save_checkpoint puts the non-sharded part of its state dict into common.pt: `args` (an
# argparse.Namespace), checkpoint_version 3.0, iteration, opt_param_scheduler, the optimizer's param
# groups, num_floating_point_operations_so_far and content_metadata. Ours adds one key, `megatron_lite`,
# with the exact config, the data position, the layouts it was saved at and the loss scaler: Megatron's
# reader merges unknown keys into its state dict and ignores them.

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any

from megatron_lite.arguments.megatron_flags import megatron_flags
from megatron_lite.config import MegatronConfig
from megatron_lite.errors import UserError, fail

EXTRAS_KEY = "megatron_lite"
EXTRAS_VERSION = 1
CHECKPOINT_VERSION = 3.0
# Megatron-LM's content_metadata without a distributed optimizer (_build_sharded_state_dict_metadata).
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
# Model features of Megatron's that megatron-lite cannot build (dest -> what it is). A checkpoint whose
# args set one is refused by name instead of failing on a missing tensor.
UNSUPPORTED_MODEL_FEATURES = {
    "num_experts": "mixture-of-experts layers (expert axes in the checkpoint are not read yet)",
    "mtp_num_layers": "multi-token prediction layers",
    "apply_residual_connection_post_layernorm": "residual connections after the layer norm",
    "attention_output_gate": "gated attention output",
    "experimental_attention_variant": "an experimental attention variant",
    "is_hybrid_model": "a hybrid (Mamba) model",
    "hybrid_override_pattern": "a hybrid (Mamba) layer pattern",
    "heterogeneous_layers_config_path": "heterogeneous layers",
    "glu_linear_offset": "an offset GLU",
    "activation_func_clamp_value": "a clamped activation",
    "qk_l2_norm": "L2-normalised queries and keys",
    "enable_mhc_connections": "hyper-connections",
    "softmax_type": "a non-default attention softmax",
}


def megatron_namespace(cfg: MegatronConfig, consumed_train_samples: int) -> argparse.Namespace:
    """Megatron-LM's `args` for this run: every Megatron flag's dest (its default unless given), our
    settings under the same dests, and what Megatron derives (padded vocabulary, consumed samples)."""
    values: dict[str, Any] = {flag.dest: flag.default for flag in megatron_flags()}
    values.update(cfg.megatron_args)
    ours = cfg.to_dict()
    for name in ("megatron_args", "startup_notices"):
        ours.pop(name, None)
    values.update(ours)
    values.update(
        consumed_train_samples=int(consumed_train_samples),
        consumed_valid_samples=0,
        use_mcore_models=True,
        ckpt_format="torch_dist",
        pipeline_model_parallel_size=values.get("pipeline_model_parallel_size") or 1,
    )
    return argparse.Namespace(**values)


def build_common(
    iteration: int,
    consumed_train_samples: int,
    cfg: MegatronConfig,
    scheduler: Any,
    optimizer_groups: list[dict[str, Any]] | None,
    layout: dict[str, int],
    extra_state: dict[str, Any] | None,
) -> dict[str, Any]:
    """The contents of common.pt (deep-copied by the caller's torch.save, or below for async saves)."""
    import copy

    common: dict[str, Any] = {
        "args": megatron_namespace(cfg, consumed_train_samples),
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "num_floating_point_operations_so_far": float(
            (extra_state or {}).get("floating_point_operations", 0)
        ),
        "content_metadata": dict(CONTENT_METADATA),
        EXTRAS_KEY: {
            "version": EXTRAS_VERSION,
            "config": cfg.to_dict(),
            "consumed_train_samples": int(consumed_train_samples),
            "rng_saved": not cfg.no_save_rng,
            "layout": dict(layout),
            "extra_state": dict(extra_state or {}),
        },
    }
    if scheduler is not None:
        common["opt_param_scheduler"] = scheduler.state_dict()
    if optimizer_groups is not None:
        # Where Megatron's (non-distributed) optimizers keep their param groups, `step` included.
        common["optimizer"] = {"optimizer": {"param_groups": optimizer_groups}}
    return copy.deepcopy(common)


def is_megatron_layout(common: dict[str, Any]) -> bool:
    """Whether common.pt is Megatron's (ours from now on, or Megatron-LM's own) rather than our old one."""
    return isinstance(common.get("args"), argparse.Namespace)


def extras(common: dict[str, Any]) -> dict[str, Any] | None:
    """Our extras, or None for a checkpoint that Megatron-LM wrote."""
    value = common.get(EXTRAS_KEY)
    return value if isinstance(value, dict) else None


def config_of(common: dict[str, Any], ckpt: Path) -> MegatronConfig:
    """The config a Megatron-layout checkpoint was saved with: ours exactly, or one built from Megatron's args."""
    ours = extras(common)
    if ours is not None:
        return MegatronConfig.from_dict(ours["config"])
    return config_from_megatron_args(common["args"], ckpt)


def config_from_megatron_args(args: argparse.Namespace, ckpt: Path) -> MegatronConfig:
    """Our config from Megatron-LM's `args` (our fields are its dests); refuses, in one line naming the
    flag, a model megatron-lite cannot build."""
    values = dict(vars(args))
    if not values.get("use_mcore_models", True) and values.get("use_legacy_models", False):
        fail(
            f"checkpoint {ckpt} holds a legacy (non-mcore) Megatron model; megatron-lite reads mcore GPT models"
        )
    flags = {flag.dest: flag for flag in megatron_flags()}
    for dest, what in UNSUPPORTED_MODEL_FEATURES.items():
        value = values.get(dest)
        flag = flags.get(dest)
        default = flag.default if flag is not None else None
        if value not in (None, False, 0, 0.0, default):
            option = flag.option if flag is not None else "--" + dest.replace("_", "-")
            fail(f"checkpoint {ckpt} was trained with {option} {value}: megatron-lite cannot build {what}")
    names = {f.name for f in dataclasses.fields(MegatronConfig)}
    # The run's layout and its derived sizes are the loader's own; the paths are the old run's.
    for name in ("world_size", "data_parallel_size", "padded_vocab_size", "save", "load", "megatron_args"):
        names.discard(name)
    kept = {k: v for k, v in values.items() if k in names}
    try:
        from megatron_lite.arguments.compat import check_implemented_choices

        check_implemented_choices(kept)
        cfg = MegatronConfig.from_dict(kept)
        from megatron_lite.config.model import derive_model

        derive_model(cfg)
    except UserError as err:
        fail(f"checkpoint {ckpt}: its args name a model megatron-lite cannot build: {err}")
    except (TypeError, ValueError) as err:
        fail(f"checkpoint {ckpt}: its args cannot be read as a megatron-lite config ({err})")
    if cfg.vocab_size is None:
        cfg.vocab_size = _true_vocab_size(cfg, values.get("padded_vocab_size"))
    cfg.padded_vocab_size = values.get("padded_vocab_size")
    return cfg


def _true_vocab_size(cfg: MegatronConfig, padded: int | None) -> int | None:
    """Megatron-LM keeps only the padded vocabulary in `args` when the tokenizer sets it: ask the tokenizer,
    and fall back to the padded size (the extra rows are padding the model never predicts)."""
    if cfg.tokenizer_type is not None:
        try:
            from megatron_lite.tokenizer import build_tokenizer

            return build_tokenizer(cfg).vocab_size
        except (UserError, OSError, TypeError, ValueError):
            pass
    return padded


def scheduler_state(common: dict[str, Any]) -> dict[str, Any] | None:
    return common.get("opt_param_scheduler")


def optimizer_groups(common: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The optimizer's saved param groups (Megatron's place for them), or None when it was not saved."""
    optimizer = common.get("optimizer")
    if not isinstance(optimizer, dict):
        return None
    inner = optimizer.get("optimizer", optimizer)
    groups = inner.get("param_groups") if isinstance(inner, dict) else None
    return groups if isinstance(groups, list) else None


def optimizer_step(groups: list[dict[str, Any]] | None) -> float | None:
    """Adam's step count, which Megatron's optimizers keep in the param groups."""
    for group in groups or []:
        step = group.get("step")
        if step is not None and not math.isnan(float(step)):
            return float(step)
    return None


def consumed_samples(common: dict[str, Any]) -> int:
    ours = extras(common)
    if ours is not None:
        return int(ours["consumed_train_samples"])
    return int(getattr(common["args"], "consumed_train_samples", 0) or 0)
