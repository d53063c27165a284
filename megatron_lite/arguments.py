"""Megatron's command-line flags and `--yaml-cfg` files, turned into one MegatronConfig."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from megatron_lite.config import MegatronConfig, config_fields
from megatron_lite.errors import fail

# Megatron's YAML files nest model and parallel settings in these sections; their keys are flat fields here.
_YAML_SECTIONS = ("language_model", "model_parallel", "training", "data", "checkpointing", "logging")
# Megatron's TransformerConfig spells a few fields differently from their flags.
_YAML_ALIASES = {"layernorm_epsilon": "norm_epsilon"}


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line without the usage dump."""

    def error(self, message: str) -> typing.NoReturn:
        fail(f"{message} (see --help)")


def _base_type(annotation: Any) -> type:
    """The scalar type of a field annotation such as `int | None` or `list[str] | None`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return _base_type(args[0])
    if typing.get_origin(annotation) is list:
        return _base_type(args[0])
    return annotation


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(MegatronConfig)


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one flag per config field; unset flags are absent from the namespace."""
    parser = _Parser(
        prog="pretrain_gpt.py",
        description="Pretrain a GPT model (Megatron-LM flags).",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--yaml-cfg", dest="yaml_cfg", help="YAML file of settings; explicit flags override it."
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    hints = _field_types()
    for f in config_fields():
        group_name = f.metadata.get("group", "other")
        group = groups.setdefault(group_name, parser.add_argument_group(group_name))
        flag = "--" + f.name.replace("_", "-")
        annotation = hints[f.name]
        kind = _base_type(annotation)
        default_text = "" if f.default is dataclasses.MISSING else f" (default: {f.default})"
        kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"] + default_text}
        if kind is bool:
            group.add_argument(flag, action="store_true", **kwargs)
            continue
        kwargs["type"] = kind
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if f.metadata.get("nargs"):
            kwargs["nargs"] = f.metadata["nargs"]
        group.add_argument(flag, **kwargs)
    return parser


def _expand_env(value: Any, path: str) -> Any:
    """Replace ${VAR} in YAML strings by the environment's value, as Megatron does."""
    if isinstance(value, str):

        def lookup(match: re.Match) -> str:
            name = match.group(1)
            if name not in os.environ:
                fail(f"{path}: ${{{name}}} is used but the environment variable {name} is not set")
            return os.environ[name]

        return re.sub(r"\$\{(\w+)\}", lookup, value)
    if isinstance(value, list):
        return [_expand_env(v, path) for v in value]
    return value


def _coerce(name: str, value: Any, path: str) -> Any:
    """Check and convert one YAML value to the field's type, naming the file and key on error."""
    annotation = _field_types()[name]
    kind = _base_type(annotation)
    is_list = "list[" in str(annotation)
    if value is None:
        if type(None) in typing.get_args(annotation):
            return None
        fail(f"{path}: key '{name}' must be {kind.__name__}, got null")
    if is_list:
        items = value.split() if isinstance(value, str) else value
        if not isinstance(items, list):
            fail(f"{path}: key '{name}' must be a list, got {value!r}")
        return [str(v) for v in items]
    if kind is bool:
        if not isinstance(value, bool):
            fail(f"{path}: key '{name}' must be true or false, got {value!r}")
        return value
    if isinstance(value, bool):
        fail(f"{path}: key '{name}' must be {kind.__name__}, got {value!r}")
    try:
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        converted = kind(value)
    except (TypeError, ValueError):
        fail(f"{path}: key '{name}' must be {kind.__name__}, got {value!r}")
    choices = next(f for f in config_fields() if f.name == name).metadata.get("choices")
    if choices and converted not in choices:
        fail(f"{path}: key '{name}' must be one of {', '.join(choices)}, got {value!r}")
    return converted


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML config into field values; unknown keys and bad values are errors naming the file."""
    file = Path(path)
    if not file.is_file():
        fail(f"--yaml-cfg {path}: no such file")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        fail(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)})")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        fail(f"{path}: expected a mapping of settings at the top level")
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _YAML_SECTIONS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    names = {f.name for f in config_fields()}
    values: dict[str, Any] = {}
    for key, value in flat.items():
        name = str(key).replace("-", "_")
        name = _YAML_ALIASES.get(name, name)
        if name not in names:
            fail(f"{path}: unknown key '{key}'; see `python pretrain_gpt.py --help` for the settings")
        values[name] = _coerce(name, _expand_env(value, path), path)
    return values


def parse_config(argv: list[str] | None = None) -> MegatronConfig:
    """Flags over YAML over defaults; the result is not yet finalized (that needs world and vocab sizes)."""
    parser = build_parser()
    namespace = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    yaml_path = namespace.pop("yaml_cfg", None)
    if yaml_path is not None:
        values.update(load_yaml(yaml_path))
    values.update(namespace)
    return MegatronConfig(**values)
