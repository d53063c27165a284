"""The command-line parser: one flag per config field, plus every other Megatron-LM flag, from the flag table."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from typing import Any

from megatron_lite.arguments.megatron_flags import MegatronFlag, megatron_flags
from megatron_lite.config import MegatronConfig, config_fields
from megatron_lite.errors import fail


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line without the usage dump."""

    def error(self, message: str) -> typing.NoReturn:
        fail(f"{message} (see --help)")


def base_type(annotation: Any) -> type:
    """The scalar type of a field annotation such as `int | None` or `list[str] | None`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return base_type(args[0])
    if typing.get_origin(annotation) is list:
        return base_type(args[0])
    return annotation


@functools.lru_cache(maxsize=1)
def field_types() -> dict[str, Any]:
    """Each config field's resolved annotation."""
    return typing.get_type_hints(MegatronConfig)


def parse_bool(text: str) -> bool:
    """Megatron's `type=bool`-style values written as words."""
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def megatron_value_type(flag: MegatronFlag) -> Any:
    """The converter for a Megatron flag without a field: its own scalar type, else the text as given."""
    return {"int": int, "float": float, "bool": parse_bool}.get(flag.type or "", str)


def _add(
    group: argparse._ArgumentGroup, options: list[str], action: str, dest: str, help: str, **kw: Any
) -> None:
    if action == "store_true":
        group.add_argument(*options, action="store_true", dest=dest, help=help)
    elif action == "store_false":
        group.add_argument(*options, action="store_false", dest=dest, help=help)
    elif action == "boolean_optional":
        positive = [o for o in options if not o.startswith("--no-")]
        group.add_argument(*positive, action=argparse.BooleanOptionalAction, dest=dest, help=help)
    else:
        group.add_argument(*options, dest=dest, help=help, **kw)


def build_parser() -> argparse.ArgumentParser:
    """Megatron-LM's whole GPT training parser; flags left unset are absent from the namespace."""
    from megatron_lite.arguments.compat import describe

    parser = _Parser(
        prog="pretrain_gpt.py",
        description="Pretrain a GPT model (Megatron-LM flags).",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--yaml-cfg", dest="yaml_cfg", help="YAML file of settings; explicit flags override it."
    )
    groups: dict[str, argparse._ArgumentGroup] = {}

    def group_for(name: str) -> argparse._ArgumentGroup:
        return groups.setdefault(name, parser.add_argument_group(name))

    by_dest: dict[str, list[MegatronFlag]] = {}
    for flag in megatron_flags():
        by_dest.setdefault(flag.dest, []).append(flag)
    hints = field_types()
    fields = {f.name: f for f in config_fields()}
    for name, f in fields.items():
        kind = base_type(hints[name])
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata['help']} (default: {default})"
        kw: dict[str, Any] = {"type": kind}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if f.metadata.get("nargs"):
            kw["nargs"] = f.metadata["nargs"]
        specs = by_dest.pop(name, None)
        group = group_for(f.metadata.get("group", "other"))
        if not specs:
            action = "store_true" if kind is bool else "store"
            _add(group, ["--" + name.replace("_", "-")], action, name, help_text, **kw)
            continue
        for spec in specs:
            spec_kw = dict(kw)
            if spec.choices is not None and "choices" in kw:
                # Megatron's values parse; those megatron-lite lacks are refused in one line after parsing.
                spec_kw["choices"] = list(kw["choices"]) + [c for c in spec.choices if c not in kw["choices"]]
            _add(group, list(spec.flags), spec.action, name, help_text, **spec_kw)
    for dest, specs in by_dest.items():
        if dest == "yaml_cfg":
            continue
        for spec in specs:
            kw = {"type": megatron_value_type(spec)}
            if spec.choices is not None:
                kw["choices"] = [str(c) if kw["type"] is str else c for c in spec.choices]
            if spec.nargs not in (None, 0):
                kw["nargs"] = spec.nargs
            _add(
                group_for(f"Megatron-LM: {spec.group}"),
                list(spec.flags),
                spec.action,
                dest,
                describe(spec),
                **kw,
            )
    return parser
