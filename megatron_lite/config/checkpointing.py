"""Checkpoint settings: where to save and load, what to keep."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_lite.config.fields import _f


@dataclass
class CheckpointArgs:
    """Checkpoint settings: where to save and load, what to keep."""

    save: str | None = _f(None, "Directory to save checkpoints to.", group="checkpointing")
    save_interval: int | None = _f(None, "Iterations between checkpoints.", group="checkpointing")
    load: str | None = _f(None, "Directory to load a checkpoint from.", group="checkpointing")
    no_save_optim: bool = _f(False, "Do not save the optimizer state.", group="checkpointing")
    no_save_rng: bool = _f(False, "Do not save the RNG state.", group="checkpointing")
    no_load_optim: bool = _f(False, "Do not load the optimizer state.", group="checkpointing")
    no_load_rng: bool = _f(False, "Do not load the RNG state.", group="checkpointing")
    finetune: bool = _f(False, "Load only the weights; start at iteration 0.", group="checkpointing")
    ckpt_format: str = _f("torch_dist", "Checkpoint format.", choices=["torch_dist"], group="checkpointing")
    exit_on_missing_checkpoint: bool = _f(False, "Exit if --load has no checkpoint.", group="checkpointing")
    save_keep_last: int | None = _f(None, "Keep only the newest K checkpoints.", group="checkpointing")
