"""Megatron's `args` of a run (every flag's value) and the start-up block that prints them."""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron_lite.arguments.megatron_flags import megatron_flags
from megatron_lite.config import MegatronConfig


def megatron_args(cfg: MegatronConfig) -> dict[str, Any]:
    """Every Megatron-LM argument's value for this run (its `vars(args)`), plus megatron-lite's own settings.

    Megatron's defaults, then our config's fields (the implemented flags), then the Megatron-only flags given.
    """
    values: dict[str, Any] = {flag.dest: flag.default for flag in megatron_flags()}
    for f in dataclasses.fields(cfg):
        if f.name not in ("megatron_args", "startup_notices"):
            values[f.name] = getattr(cfg, f.name)
    values.update(cfg.megatron_args)
    return values


def format_arguments(cfg: MegatronConfig, title: str = "arguments") -> str:
    """Megatron's start-up block: one `name ..... value` line per argument, sorted case-insensitively."""
    lines = [f"  {name} {'.' * (48 - len(name))} {value}" for name, value in megatron_args(cfg).items()]
    return "\n".join(
        [
            f"------------------------ {title} ------------------------",
            *sorted(lines, key=str.lower),
            f"-------------------- end of {title} ---------------------",
        ]
    )


def startup_lines(cfg: MegatronConfig) -> list[str]:
    """What rank 0 prints before training: the arguments block, then what each Megatron-only flag maps to."""
    return [format_arguments(cfg), *(f"> {notice}" for notice in cfg.startup_notices)]
