"""Megatron's learning-rate schedule: linear warmup, then constant, linear or cosine decay, counted in samples."""

from __future__ import annotations

import math
from typing import Any

import torch

from megatron_lite.config import MegatronConfig
from megatron_lite.errors import fail

DECAY_STYLES = ("constant", "linear", "cosine")


class OptimizerParamScheduler:
    """Sets the learning rate of every param group from the number of samples trained so far.

    Megatron counts schedule "steps" in samples (one iteration advances by the global batch size),
    so warmup and decay spans given in iterations are multiplied by the global batch size.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        init_lr: float,
        max_lr: float,
        min_lr: float,
        lr_warmup_steps: int,
        lr_decay_steps: int,
        lr_decay_style: str,
    ) -> None:
        if lr_decay_style not in DECAY_STYLES:
            fail(
                f"--lr-decay-style {lr_decay_style} is not supported; choose one of {', '.join(DECAY_STYLES)}"
            )
        if lr_warmup_steps < 0 or lr_decay_steps < 0:
            fail("--lr-warmup-iters and --lr-decay-iters must not be negative")
        self.optimizer = optimizer
        self.init_lr = float(init_lr)
        self.max_lr = float(max_lr)
        self.min_lr = float(min_lr)
        self.lr_warmup_steps = int(lr_warmup_steps)
        self.lr_decay_steps = int(lr_decay_steps)
        self.lr_decay_style = lr_decay_style
        self.num_steps = 0
        self.step(0)

    @classmethod
    def from_config(cls, optimizer: torch.optim.Optimizer, cfg: MegatronConfig) -> OptimizerParamScheduler:
        """The schedule a finalized config asks for; iteration counts become sample counts."""
        gbs = cfg.global_batch_size
        decay_steps = cfg.lr_decay_iters * gbs
        if cfg.lr_warmup_fraction is not None:
            warmup_steps = int(cfg.lr_warmup_fraction * decay_steps)
        else:
            warmup_steps = cfg.lr_warmup_iters * gbs
        return cls(
            optimizer,
            init_lr=cfg.lr_warmup_init,
            max_lr=cfg.lr,
            min_lr=cfg.min_lr,
            lr_warmup_steps=warmup_steps,
            lr_decay_steps=decay_steps,
            lr_decay_style=cfg.lr_decay_style,
        )

    def get_lr(self) -> float:
        """The learning rate after `num_steps` samples."""
        steps = self.num_steps
        if self.lr_warmup_steps > 0 and steps <= self.lr_warmup_steps:
            return self.init_lr + (self.max_lr - self.init_lr) * steps / self.lr_warmup_steps
        if self.lr_decay_style == "constant":
            return self.max_lr
        if steps > self.lr_decay_steps:
            return self.min_lr
        span = self.lr_decay_steps - self.lr_warmup_steps
        if span <= 0:
            # Warmup covers the whole decay span: nothing is left to decay over.
            return self.max_lr
        ratio = (steps - self.lr_warmup_steps) / span
        if self.lr_decay_style == "linear":
            coeff = 1.0 - ratio
        else:
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def step(self, increment: int) -> float:
        """Advance by `increment` samples and write the new learning rate into the optimizer."""
        self.num_steps += int(increment)
        lr = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {
            "max_lr": self.max_lr,
            "min_lr": self.min_lr,
            "init_lr": self.init_lr,
            "lr_warmup_steps": self.lr_warmup_steps,
            "lr_decay_steps": self.lr_decay_steps,
            "lr_decay_style": self.lr_decay_style,
            "num_steps": self.num_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the position in the schedule; its shape (lr, warmup, decay) comes from the current config,
        so a resumed run may change them, as Megatron's --override-opt-param-scheduler allows."""
        self.num_steps = 0
        self.step(int(state["num_steps"]))
