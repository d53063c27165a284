"""Megatron-LM's GPT training flags as data: option strings, dest, action, type, default, choices, group."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Written by tools/extract_megatron_flags.py from Megatron-LM's own parser (core_v0.15.0 and its 2026 main).
TABLE_PATH = Path(__file__).with_name("megatron_flags.json")


@dataclass(frozen=True)
class MegatronFlag:
    """One argparse action of Megatron-LM's `add_megatron_arguments`."""

    flags: tuple[str, ...]
    dest: str
    action: str  # store | store_true | store_false | boolean_optional
    type: str | None  # int | float | str | bool | the name of a Megatron parsing function
    default: Any
    choices: tuple | None
    nargs: Any
    group: str
    versions: tuple[str, ...]

    @property
    def option(self) -> str:
        return self.flags[0]

    @property
    def takes_value(self) -> bool:
        return self.action == "store"


@functools.lru_cache(maxsize=1)
def megatron_flags() -> tuple[MegatronFlag, ...]:
    """Every flag of Megatron-LM's GPT training parser, in option order."""
    rows = json.loads(TABLE_PATH.read_text(encoding="utf-8"))
    return tuple(
        MegatronFlag(
            flags=tuple(r["flags"]),
            dest=r["dest"],
            action=r["action"],
            type=r["type"],
            default=r["default"],
            choices=tuple(r["choices"]) if r["choices"] is not None else None,
            nargs=r["nargs"],
            group=r["group"],
            versions=tuple(r["versions"]),
        )
        for r in rows
    )


@functools.lru_cache(maxsize=1)
def flags_by_dest() -> dict[str, MegatronFlag]:
    """Megatron's flags keyed by argparse dest (the name in `args` and in our config)."""
    return {f.dest: f for f in megatron_flags()}


def option_for_dest(dest: str) -> str:
    """The command-line spelling of a setting: Megatron's first option string, or --dest-with-dashes."""
    flag = flags_by_dest().get(dest)
    if flag is not None:
        return flag.option
    return "--" + dest.replace("_", "-")
