"""Megatron's run-time switches: --deterministic-mode and --manual-gc, undone when the run ends."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Iterator, MutableMapping
from typing import Any

import torch
import torch.distributed as dist

from megatron_lite.errors import fail

# What --deterministic-mode sets unless the launcher already did (Megatron's values): NCCL's ring all-reduce
# sums in a fixed order, and cuBLAS with a fixed workspace picks the same kernels every run.
DETERMINISM_ENV_DEFAULTS = {"NCCL_ALGO": "Ring", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
# The values Megatron accepts when they are already set.
ACCEPTED_NCCL_ALGO_TOKENS = frozenset({"Ring", "CollnetDirect", "CollnetChain", "^NVLS"})
ACCEPTED_CUBLAS_WORKSPACE_CONFIGS = frozenset({":4096:8", ":16:8"})


def apply_determinism_env(env: MutableMapping[str, str]) -> None:
    """Check the determinism environment variables already set, then fill in the missing ones.

    NCCL reads NCCL_ALGO when a communicator is created and cuBLAS reads CUBLAS_WORKSPACE_CONFIG at its
    first GEMM, so this must run before either; a launcher can export them itself.
    """
    algo = env.get("NCCL_ALGO")
    if algo is not None:
        tokens = [t.strip() for t in algo.split(",") if t.strip()]
        if not tokens or not all(t in ACCEPTED_NCCL_ALGO_TOKENS for t in tokens):
            fail(
                f"--deterministic-mode: NCCL_ALGO={algo} is not a reproducible all-reduce; use one of "
                f"{', '.join(sorted(ACCEPTED_NCCL_ALGO_TOKENS))} or unset it"
            )
    workspace = env.get("CUBLAS_WORKSPACE_CONFIG")
    if workspace is not None and workspace not in ACCEPTED_CUBLAS_WORKSPACE_CONFIGS:
        fail(
            f"--deterministic-mode: CUBLAS_WORKSPACE_CONFIG={workspace} is not deterministic; use "
            f"{' or '.join(sorted(ACCEPTED_CUBLAS_WORKSPACE_CONFIGS))} or unset it"
        )
    for name, value in DETERMINISM_ENV_DEFAULTS.items():
        env.setdefault(name, value)


@contextlib.contextmanager
def run_switches(cfg: Any) -> Iterator[None]:
    """--deterministic-mode for the block; afterwards torch's determinism setting and the garbage
    collector (which --manual-gc turns off during training) are as they were before it."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    gc_enabled = gc.isenabled()
    if cfg.deterministic_mode:
        if "NCCL_ALGO" not in os.environ and dist.is_initialized() and dist.get_backend() == "nccl":
            # pretrain_gpt.py creates the NCCL communicators before the config is final.
            print(
                "warning: --deterministic-mode: NCCL_ALGO was not set when the NCCL process group was "
                "created; export NCCL_ALGO=Ring in the launcher's environment for reproducible all-reduces",
                file=sys.stderr,
                flush=True,
            )
        apply_determinism_env(os.environ)
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        if gc_enabled:
            gc.enable()


# ---- --manual-gc: Python's collector at the same points on every rank -----------------------------------
# Automatic collections start whenever a rank's allocation counts say so, at different times on different
# ranks, and the others wait for it at the next collective; collecting at fixed iterations aligns them.
def manual_gc_start(cfg: Any) -> None:
    """At the start of training: turn the automatic collector off and collect everything once."""
    if cfg.manual_gc:
        gc.disable()
        gc.collect()


def manual_gc_after_iteration(cfg: Any, iteration: int) -> None:
    """A full collection every --manual-gc-interval iterations (none with 0)."""
    if cfg.manual_gc and cfg.manual_gc_interval != 0 and iteration % cfg.manual_gc_interval == 0:
        gc.collect()


def manual_gc_before_evaluation(cfg: Any) -> None:
    if cfg.manual_gc and cfg.manual_gc_eval:
        gc.collect()


def manual_gc_after_evaluation(cfg: Any) -> None:
    # Megatron collects only the youngest generation here: the objects evaluation created.
    if cfg.manual_gc and cfg.manual_gc_eval:
        gc.collect(generation=0)
