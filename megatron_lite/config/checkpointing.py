"""Checkpoint settings: where to save and load, what to keep, how saves are written."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_lite.config.fields import _f, fail, flag_name


@dataclass
class CheckpointArgs:
    """Checkpoint settings: where to save and load, what to keep, how saves are written."""

    save: str | None = _f(None, "Directory to save checkpoints to.", group="checkpointing")
    save_interval: int | None = _f(None, "Iterations between checkpoints.", group="checkpointing")
    load: str | None = _f(None, "Directory to load a checkpoint from.", group="checkpointing")
    no_save_optim: bool = _f(False, "Do not save the optimizer state.", group="checkpointing")
    no_save_rng: bool = _f(False, "Do not save the RNG state.", group="checkpointing")
    no_load_optim: bool = _f(False, "Do not load the optimizer state.", group="checkpointing")
    no_load_rng: bool = _f(False, "Do not load the RNG state.", group="checkpointing")
    finetune: bool = _f(False, "Load only the weights; start at iteration 0.", group="checkpointing")
    ckpt_format: str = _f(
        "torch_dist",
        "Checkpoint format: torch_dist; torch (Megatron's legacy per-rank files) is written as torch_dist.",
        choices=["torch_dist", "torch"],
        group="checkpointing",
    )
    exit_on_missing_checkpoint: bool = _f(False, "Exit if --load has no checkpoint.", group="checkpointing")
    use_checkpoint_args: bool = _f(
        False,
        "Take the model's settings (sizes, norms, position embedding, tokenizer) from the --load checkpoint's "
        "args, as Megatron-LM's load_args_from_checkpoint does.",
        group="checkpointing",
    )
    use_mp_args_from_checkpoint_args: bool = _f(
        False, "With --use-checkpoint-args, take the TP size from the checkpoint too.", group="checkpointing"
    )
    save_keep_last: int | None = _f(None, "Keep only the newest K checkpoints.", group="checkpointing")
    save_retain_interval: int | None = _f(
        None,
        "Keep only checkpoints whose iteration is a multiple of N (and the newest); delete the others.",
        group="checkpointing",
    )
    async_save: bool = _f(
        False,
        "Write checkpoints in a background thread while training goes on (torch.distributed.checkpoint."
        "async_save); each is published once every rank has written it. torch_dist format only.",
        group="checkpointing",
    )
    ckpt_assume_constant_structure: bool = _f(
        False,
        "The state's structure is the same at every save of this run: reuse the previous save's DCP plan.",
        group="checkpointing",
    )


def check_checkpointing(cfg: Any) -> None:
    """What Megatron refuses about how checkpoints are written, as one line each."""
    retain = cfg.save_retain_interval
    if retain is not None:
        if retain <= 0:
            fail(f"{flag_name('save_retain_interval')} must be positive, got {retain}")
        if cfg.save_interval is not None and retain % cfg.save_interval != 0:
            fail(
                f"{flag_name('save_retain_interval')} {retain} must be a multiple of "
                f"{flag_name('save_interval')} {cfg.save_interval}"
            )
    if cfg.ckpt_format == "torch" and cfg.save is not None:
        # Decision: a Megatron line asking for the legacy format still runs; what it gets is stated once.
        notice = (
            f"{flag_name('ckpt_format')} torch: checkpoints are written as torch_dist, Megatron's default "
            "(Megatron-LM loads them with --ckpt-format torch_dist or --auto-detect-ckpt-format); legacy "
            "mp_rank_XX/model_optim_rng.pt files are not written"
        )
        if notice not in cfg.startup_notices:
            cfg.startup_notices.append(notice)
    if cfg.async_save and cfg.ckpt_format != "torch_dist":
        # Megatron: "Async checkpoint save not implemented for {format} distributed checkpoint format".
        fail(
            f"{flag_name('async_save')} works with {flag_name('ckpt_format')} torch_dist only, "
            f"not {cfg.ckpt_format}"
        )
