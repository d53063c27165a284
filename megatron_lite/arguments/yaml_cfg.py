"""`--yaml-cfg FILE`: Megatron-LM's YAML files (flat keys, `language_model:` / `model_parallel:` sections)."""

from __future__ import annotations

import functools
import json
import os
import re
import typing
from pathlib import Path
from typing import Any

from megatron_lite.arguments.megatron_flags import TABLE_PATH, MegatronFlag, flags_by_dest, megatron_flags
from megatron_lite.arguments.parser import base_type, field_types
from megatron_lite.config import config_fields
from megatron_lite.errors import fail
from megatron_lite.readers.files import read_yaml

_SECTIONS = ("language_model", "model_parallel", "training", "data", "checkpointing", "logging")

# TransformerConfig names that say in another way what one of Megatron's flags says.
_TRANSFORMER_CONFIG_NAMES: dict[str, typing.Callable[[Any], dict[str, Any]]] = {
    "layernorm_zero_centered_gamma": lambda v: {"apply_layernorm_1p": v},
    "num_moe_experts": lambda v: {"num_experts": v},
    "gated_linear_unit": lambda v: {"swiglu": v} if v else {},
    "activation_func": lambda v: _activation(v),
    "bias_activation_fusion": lambda v: {"bias_gelu_fusion": v},
    "virtual_pipeline_model_parallel_size": lambda v: {"num_virtual_stages_per_pipeline_rank": v},
    "memory_efficient_layer_norm": lambda v: {},
}

# Keys that Megatron-LM's own YAML files still carry although its parser has dropped them: (default, what a
# different value would need).
_RETIRED_KEYS: dict[str, tuple[Any, str]] = {
    "standalone_embedding_stage": (False, "pipeline parallelism, not implemented yet (issue 13)"),
    "pipeline_model_parallel_split_rank": (
        None,
        "encoder-decoder pipelines, which megatron-lite does not train",
    ),
    "moe_router_topk_limited_devices": (None, "device-limited MoE routing, not implemented yet (issue 14)"),
}


def _activation(name: Any) -> dict[str, Any]:
    choices = {"gelu": {}, "swiglu": {"swiglu": True}, "squaredrelu": {"squared_relu": True}}
    if name not in choices:
        raise ValueError(f"must be one of {', '.join(choices)}")
    return choices[name]


@functools.lru_cache(maxsize=1)
def _transformer_config_defaults() -> dict[str, Any]:
    path = TABLE_PATH.with_name("megatron_transformer_config.json")
    return json.loads(path.read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=1)
def _option_to_flag() -> dict[str, MegatronFlag]:
    """Each option string, spelt with underscores (`no_mmap_bin_files`), to its flag."""
    return {opt[2:].replace("-", "_"): flag for flag in megatron_flags() for opt in flag.flags}


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


def _coerce_field(name: str, value: Any) -> Any:
    """Check and convert a YAML value to a config field's type; raises ValueError with the reason."""
    annotation = field_types()[name]
    kind = base_type(annotation)
    if "list[" in str(annotation):
        items = value.split() if isinstance(value, str) else value
        if kind in (int, float) and isinstance(items, (int, float)) and not isinstance(items, bool):
            items = [items]  # Megatron's own YAML gives one number where the flag takes several
        if not isinstance(items, list):
            raise ValueError(f"must be a list, got {value!r}")
        return [str(v) if kind is str else _coerce_scalar(kind, v, None) for v in items]
    choices = next(f for f in config_fields() if f.name == name).metadata.get("choices")
    return _coerce_scalar(kind, value, choices)


def _coerce_scalar(kind: Any, value: Any, choices: Any) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {value!r}")
        return value
    if isinstance(value, bool):
        raise ValueError(f"must be {kind.__name__}, got {value!r}")
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(f"must be int, got {value!r}")
    try:
        converted = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be {kind.__name__}, got {value!r}") from None
    if choices and converted not in choices:
        raise ValueError(f"must be one of {', '.join(map(str, choices))}, got {value!r}")
    return converted


def _coerce_megatron(flag: MegatronFlag, value: Any) -> Any:
    if flag.action in ("store_true", "store_false", "boolean_optional"):
        return _coerce_scalar(bool, value, None)
    kind = {"int": int, "float": float}.get(flag.type or "", None)

    def one(item: Any) -> Any:
        if kind is None:
            return item if isinstance(item, (bool, int, float)) else str(item)
        return _coerce_scalar(kind, item, flag.choices)

    if flag.nargs not in (None, 0) or isinstance(value, list):
        items = value if isinstance(value, list) else str(value).split()
        return [one(item) for item in items]
    return one(value)


def _read(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        fail(f"--yaml-cfg {path}: no such file")
    raw = read_yaml(file, "save it as UTF-8 YAML")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        fail(f"{path}: expected a mapping of settings at the top level")
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SECTIONS and isinstance(value, dict):
            flat.update({str(k): v for k, v in value.items()})
        else:
            flat[str(key)] = value
    return flat


def load_yaml(path: str) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Read a YAML config: (config field values, other Megatron args, start-up notices). Null means unset.

    Every unknown key and bad value in the file is reported in one message naming the file.
    """
    fields = {f.name for f in config_fields()}
    table = flags_by_dest()
    values: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    unknown: list[str] = []
    bad: list[str] = []
    notices: list[str] = []

    def put(dest: str, value: Any, key: str) -> None:
        try:
            if dest in fields:
                values[dest] = _coerce_field(dest, value)
            else:
                extras[dest] = _coerce_megatron(table[dest], value)
        except ValueError as err:
            bad.append(f"key '{key}' {err}")

    for key, value in _read(path).items():
        if value is None:
            continue
        value = _expand_env(value, path)
        name = key.replace("-", "_")
        if name in fields or name in table:
            put(name, value, key)
        elif name in _option_to_flag():
            flag = _option_to_flag()[name]
            if flag.action == "store_false" and isinstance(value, bool):
                value = not value
            put(flag.dest, value, key)
        elif name in _RETIRED_KEYS:
            default, needs = _RETIRED_KEYS[name]
            if value != default:
                bad.append(f"key '{key}' {value} needs {needs}")
        elif name in _TRANSFORMER_CONFIG_NAMES:
            try:
                mapped = _TRANSFORMER_CONFIG_NAMES[name](value)
            except ValueError as err:
                bad.append(f"key '{key}' {err}")
                continue
            for dest, v in mapped.items():
                put(dest, v, key)
        elif name in _transformer_config_defaults():
            if value != _transformer_config_defaults()[name]:
                notices.append(
                    f"{path}: {key}: {value}: no effect (a megatron-core TransformerConfig field set internally)"
                )
        else:
            unknown.append(key)
    problems = list(bad)
    if unknown:
        keys = ", ".join(repr(k) for k in unknown)
        problems.append(f"unknown key{'s' if len(unknown) > 1 else ''} {keys}")
        problems.append("see `python pretrain_gpt.py --help` for the settings")
    if problems:
        fail(f"{path}: {'; '.join(problems)}")
    return values, extras, notices
