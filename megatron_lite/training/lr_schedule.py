"""Megatron's OptimizerParamScheduler: learning rate (warmup, then constant, linear, cosine, inverse-square-root
or WSD decay) and weight decay (constant, linear or cosine increase) per param group, counted in samples."""

from __future__ import annotations

import math
from typing import Any

import torch

from megatron_lite.config import MegatronConfig
from megatron_lite.config.training import lr_schedule_steps, weight_decay_range
from megatron_lite.errors import fail

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
WD_INCR_STYLES = ("constant", "linear", "cosine")


class OptimizerParamScheduler:
    """Sets every param group's learning rate and weight decay from the number of samples trained so far.

    Megatron counts schedule "steps" in samples (one iteration advances by its global batch size), so
    spans given in iterations are multiplied by the global batch size. A param group's own "max_lr" and
    "min_lr" (the --decoupled-lr groups) replace the schedule's; its "wd_mult" scales the weight decay
    (0 for biases and other 1-D parameters).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        init_lr: float,
        max_lr: float,
        min_lr: float,
        lr_warmup_steps: float,
        lr_decay_steps: int,
        lr_decay_style: str,
        start_wd: float = 0.0,
        end_wd: float = 0.0,
        wd_incr_steps: int = 0,
        wd_incr_style: str = "constant",
        wsd_decay_steps: int | None = None,
        lr_wsd_decay_style: str = "exponential",
    ) -> None:
        if lr_decay_style not in DECAY_STYLES:
            fail(
                f"--lr-decay-style {lr_decay_style} is not supported; choose one of {', '.join(DECAY_STYLES)}"
            )
        if lr_wsd_decay_style not in WSD_DECAY_STYLES:
            fail(f"--lr-wsd-decay-style {lr_wsd_decay_style} is not one of {', '.join(WSD_DECAY_STYLES)}")
        if wd_incr_style not in WD_INCR_STYLES:
            fail(f"--weight-decay-incr-style {wd_incr_style} is not one of {', '.join(WD_INCR_STYLES)}")
        if lr_warmup_steps < 0 or lr_decay_steps < 0:
            fail("--lr-warmup-iters and --lr-decay-iters must not be negative")
        if lr_decay_style == "WSD" and wsd_decay_steps is None:
            fail("--lr-decay-style WSD needs --lr-wsd-decay-iters or --lr-wsd-decay-samples")
        self.optimizer = optimizer
        self.init_lr = float(init_lr)
        self.max_lr = float(max_lr)
        self.min_lr = float(min_lr)
        self.lr_warmup_steps = lr_warmup_steps
        self.lr_decay_steps = int(lr_decay_steps)
        self.lr_decay_style = lr_decay_style
        self.wsd_decay_steps = wsd_decay_steps
        self.lr_wsd_decay_style = lr_wsd_decay_style
        self.start_wd = float(start_wd)
        self.end_wd = float(end_wd)
        self.wd_incr_steps = int(wd_incr_steps)
        self.wd_incr_style = wd_incr_style
        self.num_steps = 0
        self.step(0)

    @classmethod
    def from_config(cls, optimizer: torch.optim.Optimizer, cfg: MegatronConfig) -> OptimizerParamScheduler:
        """The schedule a finalized config asks for, with Megatron's spans in samples."""
        steps = lr_schedule_steps(cfg)
        start_wd, end_wd = weight_decay_range(cfg)
        return cls(
            optimizer,
            init_lr=cfg.lr_warmup_init,
            max_lr=cfg.lr,
            min_lr=cfg.min_lr,
            lr_warmup_steps=steps["warmup"],
            lr_decay_steps=steps["decay"],
            lr_decay_style=cfg.lr_decay_style,
            start_wd=start_wd,
            end_wd=end_wd,
            wd_incr_steps=steps["wd_incr"],
            wd_incr_style=cfg.weight_decay_incr_style,
            wsd_decay_steps=steps["wsd_decay"],
            lr_wsd_decay_style=cfg.lr_wsd_decay_style,
        )

    def get_wd(self, param_group: dict[str, Any] | None = None) -> float:
        """The weight decay after `num_steps` samples (before the group's wd_mult)."""
        group = param_group or {}
        start_wd = group.get("start_wd", self.start_wd)
        end_wd = group.get("end_wd", self.end_wd)
        if self.num_steps > self.wd_incr_steps or self.wd_incr_style == "constant" or self.wd_incr_steps <= 0:
            return end_wd
        ratio = self.num_steps / self.wd_incr_steps
        if self.wd_incr_style == "linear":
            coeff = ratio
        else:
            coeff = 0.5 * (math.cos(math.pi * (1.0 - ratio)) + 1.0)
        return start_wd + coeff * (end_wd - start_wd)

    def get_lr(self, param_group: dict[str, Any] | None = None) -> float:
        """The learning rate after `num_steps` samples; a group's max_lr/min_lr replace the schedule's."""
        group = param_group or {}
        max_lr = group.get("max_lr", self.max_lr)
        min_lr = group.get("min_lr", self.min_lr)
        steps = self.num_steps
        if self.lr_warmup_steps > 0 and steps <= self.lr_warmup_steps:
            return self.init_lr + (max_lr - self.init_lr) * steps / self.lr_warmup_steps
        if self.lr_decay_style == "constant":
            return max_lr
        if steps > self.lr_decay_steps:
            return min_lr
        if self.lr_decay_style == "inverse-square-root":
            warmup = max(self.lr_warmup_steps, 1)
            return max(min_lr, max_lr * warmup**0.5 / max(steps, 1) ** 0.5)
        span = self.lr_decay_steps - self.lr_warmup_steps
        if span <= 0:
            # Warmup covers the whole decay span (the config refuses this; a direct caller may not).
            return max_lr
        ratio = (steps - self.lr_warmup_steps) / span
        if self.lr_decay_style == "linear":
            coeff = 1.0 - ratio
        elif self.lr_decay_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        else:
            coeff = self._wsd_coeff(steps)
        return min_lr + coeff * (max_lr - min_lr)

    def _wsd_coeff(self, steps: float) -> float:
        """Warmup-stable-decay: 1 until the last wsd_decay_steps of the decay span, then the annealing curve."""
        anneal_start = self.lr_decay_steps - self.wsd_decay_steps
        if steps <= anneal_start:
            return 1.0
        ratio = (steps - anneal_start) / self.wsd_decay_steps
        if self.lr_wsd_decay_style == "linear":
            return 1.0 - ratio
        if self.lr_wsd_decay_style == "cosine":
            return 0.5 * (math.cos(math.pi * ratio) + 1.0)
        if self.lr_wsd_decay_style == "exponential":
            return 2.0 * math.pow(0.5, ratio) - 1.0
        return 1.0 - math.sqrt(ratio)  # minus_sqrt

    def step(self, increment: int) -> float:
        """Advance by `increment` samples and write each group's learning rate and weight decay.

        Returns the learning rate of the schedule itself (the groups without a decoupled lr).
        """
        self.num_steps += int(increment)
        for group in self.optimizer.param_groups:
            group["lr"] = self.get_lr(group)
            group["weight_decay"] = self.get_wd(group) * group.get("wd_mult", 1.0)
        return self.get_lr()

    def state_dict(self) -> dict[str, Any]:
        return {
            "max_lr": self.max_lr,
            "min_lr": self.min_lr,
            "init_lr": self.init_lr,
            "lr_warmup_steps": self.lr_warmup_steps,
            "lr_decay_steps": self.lr_decay_steps,
            "lr_decay_style": self.lr_decay_style,
            "num_steps": self.num_steps,
            "start_wd": self.start_wd,
            "end_wd": self.end_wd,
            "wd_incr_style": self.wd_incr_style,
            "wd_incr_steps": self.wd_incr_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the position in the schedule; its shape (lr, warmup, decay) comes from the current config,
        so a resumed run may change them, as Megatron's --override-opt-param-scheduler allows."""
        self.num_steps = 0
        self.step(int(state["num_steps"]))
