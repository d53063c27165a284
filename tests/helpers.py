"""Shared by tests across the tree: the tiny-model config factory and the subprocess/torchrun launchers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_lite.arguments.render import as_flags
from megatron_lite.config import MegatronConfig

ROOT = Path(__file__).resolve().parent.parent
PRETRAIN_GPT = ROOT / "pretrain_gpt.py"

# The tiny GPT the tests build or train: 2 layers, h=32, 4 heads, s=16, micro batch 2, lr 1e-3, mock data.
# Keys are MegatronConfig fields (Megatron flag names with underscores); tests override what they need.
TINY_MODEL: dict[str, Any] = {
    "num_layers": 2,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "seq_length": 16,
    "micro_batch_size": 2,
    "lr": 1e-3,
    "mock_data": True,
}

# A one-layer model (h=16, 2 heads, s=8), and the pretrain() run of it that training-loop tests share.
ONE_LAYER: dict[str, Any] = {"num_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "seq_length": 8}
ONE_LAYER_RUN: dict[str, Any] = {**ONE_LAYER, "vocab_size": 64, "num_workers": 0, "peak_tflops": 0.5}


def tiny_config(world_size: int = 1, vocab_size: int | None = 257, **overrides: Any) -> MegatronConfig:
    """TINY_MODEL with `overrides` (and train_iters=1 unless given), finalized for world_size and vocab_size."""
    values = {**TINY_MODEL, "train_iters": 1, **overrides}
    return MegatronConfig(**values).finalize(world_size, vocab_size)


def tiny_flags(**overrides: Any) -> list[str]:
    """TINY_MODEL with `overrides` as pretrain_gpt.py flags in Megatron's spelling (None leaves a setting out).

    Values are written with str(), which reads back as the same number (1e-3 -> "0.001").
    """
    return as_flags({**TINY_MODEL, **overrides})


# ---- child processes ------------------------------------------------------------------------------------


def subprocess_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A child's environment: one thread per rank, temporary files under tmp_path, the repo importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT), **extra}


def run_python(
    args: Sequence[str | Path], tmp_path: Path, *, timeout: float = 300, text: bool = True, **env: str
) -> subprocess.CompletedProcess:
    """`python *args` run in tmp_path with subprocess_env (plus `env`), its output captured."""
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=tmp_path,
        env=subprocess_env(tmp_path, **env),
        capture_output=True,
        text=text,
        timeout=timeout,
    )


def start_python(
    args: Sequence[str | Path], tmp_path: Path, *, merge_stderr: bool = False
) -> subprocess.Popen:
    """`python *args` started in tmp_path with subprocess_env; stdout (with stderr when merged) piped as text."""
    return subprocess.Popen(
        [sys.executable, *map(str, args)],
        cwd=tmp_path,
        env=subprocess_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        text=True,
    )


def torchrun_args(
    script: str | Path, args: Sequence[str], *, nproc: int = 2, launcher_flags: Sequence[str] = ()
) -> list[str]:
    """Python's arguments for torchrun (`-m torch.distributed.run`) of `script` on nproc ranks of this machine.

    launcher_flags choose the rendezvous (keep it on 127.0.0.1) and the restart policy.
    """
    return [
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc-per-node={nproc}",
        *launcher_flags,
        str(script),
        *args,
    ]
