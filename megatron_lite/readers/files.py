"""Readers of plain files (bytes, UTF-8 text, JSON, YAML, torch.save files) and of names that must stay inside a directory."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from megatron_lite.errors import fail

_KINDS = {dict: "object", list: "list", str: "string"}


def read_bytes(path: str | os.PathLike, fix: str, *, limit: int | None = None) -> bytes:
    """The bytes of `path`; a missing, unreadable or (with `limit`) oversized file is one line ending in `fix`."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read() if limit is None else handle.read(limit + 1)
    except FileNotFoundError:
        fail(f"{path}: not found; {fix}")
    except IsADirectoryError:
        fail(f"{path}: a directory, not a file; {fix}")
    except OSError as err:
        fail(f"{path}: cannot be read ({err.strerror or err}); {fix}")
    if limit is not None and len(data) > limit:
        fail(f"{path}: longer than the {limit} bytes such a file has; {fix}")
    return data


def decode_utf8(path: str | os.PathLike, data: bytes, fix: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        fail(f"{path}: is not UTF-8 text (byte {err.start}); {fix}")


def read_text(path: str | os.PathLike, fix: str, *, limit: int | None = None) -> str:
    """A UTF-8 text file."""
    return decode_utf8(path, read_bytes(path, fix, limit=limit), fix)


def read_json(path: str | os.PathLike, fix: str, *, expect: type | None = dict) -> Any:
    """A JSON file whose top level is of type `expect` (any type when None)."""
    text = read_text(path, fix)
    try:
        value = json_loads(text)
    except ValueError as err:
        fail(f"{path}: is not valid JSON ({_first_line(err)}); {fix}")
    if expect is not None and not isinstance(value, expect):
        fail(
            f"{path}: holds a JSON {_json_kind(value)} where a JSON {_KINDS.get(expect, expect.__name__)} "
            f"belongs; {fix}"
        )
    return value


def json_loads(text: str | bytes) -> Any:
    """json.loads, with nesting too deep for the parser reported as the ValueError it is."""
    import json

    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_yaml(path: str | os.PathLike, fix: str) -> Any:
    """A YAML file, parsed with yaml.safe_load (plain data only)."""
    import yaml

    text = read_text(path, fix)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        fail(f"{path}:{where} is not valid YAML ({_first_line(getattr(err, 'problem', None) or err)})")
    except (ValueError, TypeError, OverflowError, RecursionError) as err:
        # safe_load builds dates and numbers itself: `2001-13-45` is a date with a month of 13.
        fail(f"{path}: holds a value YAML cannot build ({_first_line(err) or type(err).__name__}); {fix}")


def load_torch_file(path: str | os.PathLike, what: str, fix: str, allowed: list[Any] | None = None) -> Any:
    """An object saved with torch.save, read with weights_only=True (plus the `allowed` globals): a file
    that is truncated, altered or not torch's is one line naming it."""
    import torch

    data = read_bytes(path, fix)
    try:
        with torch.serialization.safe_globals(list(allowed or [])):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load has no one error type for a damaged file
        fail(f"{path}: cannot be read as {what} ({type(err).__name__}: truncated or damaged); {fix}")


def is_plain_name(name: Any) -> bool:
    """Whether `name` is a file name of a directory itself: no separator, not `.`, `..` or empty."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in ("/", "\\", "\x00"))
        and not os.path.isabs(name)
    )


def file_inside(directory: str | os.PathLike, name: Any, source: str | os.PathLike) -> Path:
    """directory/name, where `name` comes from metadata file `source`: refused unless it is a plain file
    name whose path (links resolved) stays inside `directory`."""
    directory = Path(directory)
    if not is_plain_name(name):
        fail(f"{source} names {name!r}, which is not a file name inside {directory}; the file is damaged")
    path = directory / name
    if path.is_symlink() and directory.resolve() not in path.resolve().parents:
        fail(f"{path} is a link to outside {directory}; copy the file into the directory instead")
    return path


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return _KINDS.get(type(value), type(value).__name__)


def _first_line(err: Any) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else ""
