"""The file-fuzz tests' material: one small real checkpoint and dataset, mutations of their files, the property."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from helpers import tiny_config
from hypothesis import strategies as st

from megatron_lite.core.datasets.preprocessing import preprocess_main
from megatron_lite.errors import UserError
from megatron_lite.parallel_state import ParallelState
from megatron_lite.training.checkpointing import save_checkpoint
from megatron_lite.training.checkpointing.verify import file_checksum, write_manifest
from megatron_lite.training.lr_schedule import OptimizerParamScheduler
from megatron_lite.training.optimizer import build_optimizer
from megatron_lite.training.setup import gpt_model_provider

ITERATION = 2
ITER_DIR = f"iter_{ITERATION:07d}"
TRACKER = "latest_checkpointed_iteration.txt"
YAML_TEXT = (
    "num_layers: 1\nhidden_size: 16\nnum_attention_heads: 2\nseq_length: 8\nlr: 0.001\ntrain_iters: 2\n"
)
JSONL_TEXT = '{"text": "hello world"}\n{"text": "second doc, with \\u00e9"}\n{"text": "third"}\n'


def tiny_run_config():
    """The fuzzed checkpoint's model: 1 layer, h=16, 2 heads, s=8, the byte tokenizer's vocabulary."""
    return tiny_config(
        1, 257, num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=8, train_iters=ITERATION
    )


def build_model():
    cfg = tiny_run_config()
    model = gpt_model_provider(cfg, ParallelState())
    optimizer = build_optimizer(model, cfg, ParallelState())
    scheduler = OptimizerParamScheduler.from_config(optimizer, cfg)
    return cfg, model, optimizer, scheduler


def make_checkpoint(root: Path) -> Path:
    """--save directory of a tiny GPT after 2 real Adam steps (drawn gradients stand in for the data)."""
    cfg, model, optimizer, scheduler = build_model()
    generator = torch.Generator().manual_seed(0)
    for _ in range(ITERATION):
        for param in model.parameters():
            param.grad = torch.randn(param.shape, generator=generator) * 1e-2
        optimizer.step()
        scheduler.step(1)
    save_checkpoint(root, ITERATION, model, optimizer, scheduler, cfg, None, consumed_train_samples=4)
    return root


def make_dataset(root: Path) -> tuple[Path, str]:
    """A JSONL file and its dataset preprocessed with the byte tokenizer: (jsonl, prefix)."""
    root.mkdir(parents=True, exist_ok=True)
    jsonl = root / "input.jsonl"
    jsonl.write_text(JSONL_TEXT, encoding="utf-8")
    prefix = root / "data"
    argv = ["--input", str(jsonl), "--output-prefix", str(prefix), "--tokenizer-type", "ByteTokenizer"]
    preprocess_main([*argv, "--append-eod", "--workers", "1", "--log-interval", "1000000"])
    return jsonl, f"{prefix}_text_document"


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ---- mutations ------------------------------------------------------------------------------------------
_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
_ESCAPES = st.sampled_from(
    ["..", "../..", "../../../../etc/hostname", "/etc/hostname", "", ".", "a/b", "x\\y"]
)


@st.composite
def byte_mutation(draw, data: bytes) -> bytes:
    """Truncated, bytes flipped, emptied, or made non-UTF-8 at a drawn place."""
    kind = draw(st.sampled_from(["truncate", "flip", "empty", "non_utf8", "append"]))
    if kind == "empty" or not data:
        return b""
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "non_utf8":
        at = draw(st.integers(0, len(data)))
        return (
            data[:at]
            + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80\x80"]))
            + data[at:]
        )
    if kind == "append":
        return data + draw(st.binary(min_size=1, max_size=16))
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        out[draw(st.integers(0, len(out) - 1))] ^= draw(st.integers(1, 255))
    return bytes(out)


@st.composite
def json_mutation(draw, data: bytes) -> bytes:
    """A byte mutation, a JSON value of another shape, or (for a mapping) an entry renamed to a path."""
    kind = draw(st.sampled_from(["bytes", "shape", "field", "escape"]))
    value = json.loads(data)
    if kind == "bytes":
        return draw(byte_mutation(data))
    if kind == "shape":
        return json.dumps(draw(_JSON_VALUES)).encode()
    inner = value.get("files", value)
    if not isinstance(inner, dict) or not inner:
        return json.dumps(draw(_JSON_VALUES)).encode()
    key = draw(st.sampled_from(sorted(inner)))
    if kind == "field":
        inner[key] = draw(_JSON_VALUES)
    else:
        inner[draw(_ESCAPES) + ("/" + key if draw(st.booleans()) else "")] = inner.pop(key)
    return json.dumps(value).encode()


@st.composite
def tracker_mutation(draw, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["bytes", "number", "text"]))
    if kind == "bytes":
        return draw(byte_mutation(data))
    if kind == "number":
        number = draw(st.integers(-(2**70), 2**70).map(str) | st.sampled_from(["-1", "0", "3", "9" * 5000]))
        return number.encode()
    return draw(st.text(max_size=12)).encode("utf-8", "surrogatepass")


def resign(ckpt: Path) -> None:
    """Recompute checksums.json for the files as they are now, so that the loader reaches the mutated file
    (a damaged file that its manifest still describes is caught by the checksums first)."""
    manifest = ckpt / "checksums.json"
    try:
        names = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return
    if isinstance(names, dict):
        write_manifest(ckpt, {n: file_checksum(ckpt / n) for n in names if (ckpt / n).is_file()})


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)
    return target


def assert_user_error_or_success(action, *places: Path) -> None:
    """The property: `action()` succeeds, or raises UserError with one line naming one of `places`."""
    try:
        action()
    except UserError as err:
        message = str(err)
        assert "\n" not in message, message
        assert any(str(p) in message for p in places), f"{message!r} names none of {places}"
