"""Settings written back as pretrain_gpt.py flags, in Megatron's spelling (for messages, imports and tests)."""

from __future__ import annotations

from typing import Any

from megatron_lite.arguments.megatron_flags import flags_by_dest


def as_flags(values: dict[str, Any]) -> list[str]:
    """{dest: value} as flags: a switch appears when it differs from its default, None leaves a setting out."""
    argv: list[str] = []
    table = flags_by_dest()
    for dest, value in values.items():
        if value is None:
            continue
        spec = table.get(dest)
        options = spec.flags if spec is not None else ("--" + dest.replace("_", "-"),)
        if isinstance(value, bool):
            if spec is not None and spec.action == "store_false":
                argv += [] if value else [options[0]]
            elif spec is not None and spec.action == "boolean_optional":
                argv.append(options[0] if value else "--no-" + options[0][2:])
            else:
                argv += [options[0]] if value else []
        elif isinstance(value, (list, tuple)):
            argv += [options[0], *map(str, value)]
        else:
            argv += [options[0], str(value)]
    return argv
