"""Megatron's command-line flags and `--yaml-cfg` files, turned into one MegatronConfig."""

from __future__ import annotations

from typing import Any

from megatron_lite.arguments.compat import check_implemented_choices, check_megatron_args
from megatron_lite.arguments.parser import build_parser
from megatron_lite.arguments.yaml_cfg import load_yaml
from megatron_lite.config import MegatronConfig, config_fields

__all__ = ["build_parser", "config_from_namespace", "load_yaml", "parse_config"]


def parse_config(argv: list[str] | None = None) -> MegatronConfig:
    """Flags over YAML over defaults; the result is not yet finalized (that needs world and vocab sizes).

    Megatron flags that change nothing here are kept in `cfg.megatron_args`; what they map to is in
    `cfg.startup_notices`, printed once at start-up. Flags that cannot run stop here with one line.
    """
    return config_from_namespace(vars(build_parser().parse_args(argv)))


def config_from_namespace(namespace: dict[str, Any]) -> MegatronConfig:
    """A parsed namespace (flags given, plus `yaml_cfg`) as a MegatronConfig, with the YAML merged under it."""
    namespace = dict(namespace)
    fields = {f.name for f in config_fields()}
    values: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    source: dict[str, str] = {}
    notices: list[str] = []
    yaml_path = namespace.pop("yaml_cfg", None)
    if yaml_path is not None:
        yaml_values, yaml_extras, notices = load_yaml(yaml_path)
        values.update(yaml_values)
        extras.update(yaml_extras)
        source.update({dest: f"{yaml_path}: {dest}" for dest in yaml_extras})
    for dest, value in namespace.items():
        if dest in fields:
            values[dest] = value
        else:
            extras[dest] = value
            source.pop(dest, None)
    notices += check_megatron_args(extras, source, values)
    check_implemented_choices(values)
    cfg = MegatronConfig(**values)
    cfg.megatron_args = extras
    cfg.startup_notices = notices
    return cfg
