"""The field helper every config group uses, and the shared wording of config errors."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from megatron_lite.errors import fail

__all__ = ["_f", "fail", "flag_name", "require"]

# A field's metadata holds its help text and "group" (the --help section), optionally "choices", "nargs" and
# "derived" (filled by finalize, not a flag). Field names are Megatron's argparse `dest` names, so Megatron's
# flag table (megatron_lite/arguments/megatron_flags.json) gives each field its option strings and action.


def _f(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field with its help text; lists get a fresh default each time."""
    meta["help"] = help
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    """The command-line spelling of a field, for messages."""
    from megatron_lite.arguments.megatron_flags import option_for_dest

    return option_for_dest(name)


def require(cfg: Any, *names: str) -> None:
    """Fail naming the first flag that is still unset."""
    for name in names:
        if getattr(cfg, name) is None:
            fail(f"{flag_name(name)} is required")
