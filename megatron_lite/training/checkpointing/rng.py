"""Every rank's RNG streams in a checkpoint: captured at save, restored at load, re-seeded where the layout changed."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_lite.config import MegatronConfig
from megatron_lite.core.tensor_parallel import get_rng_tracker, model_parallel_manual_seed
from megatron_lite.errors import fail
from megatron_lite.parallel_state import ParallelState
from megatron_lite.readers import load_torch_file
from megatron_lite.training.checkpointing.names import rng_file_name

# What restoring a damaged RNG state raises: wrong keys, types, lengths or out-of-range numbers.
RNG_STATE_ERRORS = (LookupError, TypeError, ValueError, ArithmeticError, RuntimeError, AttributeError)


def capture_rng(pstate: ParallelState) -> dict[str, Any]:
    """A copy of this rank's streams (python, numpy, torch, CUDA, the model's tracker)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "tp_rank": pstate.tp_rank,
        "dp_rank": pstate.dp_rank,
        "random": (version, list(internal), gauss),
        # As tensors and numbers: torch.load(weights_only=True) takes no numpy arrays.
        "np": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "rng_tracker_states": get_rng_tracker().get_states(),
    }


def megatron_rng_state(pstate: ParallelState) -> dict[str, Any]:
    """This rank's streams as Megatron-LM's get_rng_state records them (for its rng_state ShardedObject)."""
    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.get_rng_state(),
        "rng_tracker_states": get_rng_tracker().get_states(),
    }


def set_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["np"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_rng_tracker().set_states(state["rng_tracker_states"])


def restore_rng(
    ckpt: Path, common: dict[str, Any], cfg: MegatronConfig, pstate: ParallelState, iteration: int
) -> None:
    """Each rank takes the streams of the saved rank at the same (PP, DP, CP, TP) place. When the TP size changed,
    or this DP rank did not exist, it is re-seeded from (seed, iteration, DP rank): the same value on all
    TP ranks of a DP group, whose replicated activations must keep drawing identical dropout masks."""
    saved = common["layout"]
    same_pp = saved.get("pipeline_model_parallel_size", 1) == pstate.pp_size
    same_cp = saved.get("context_parallel_size", 1) == pstate.cp_size
    if (
        same_pp
        and same_cp
        and saved["tensor_model_parallel_size"] == pstate.tp_size
        and pstate.dp_rank < saved["data_parallel_size"]
    ):
        # The saved rank at this (PP, DP, CP, TP) place, in Megatron's rank order.
        rank = pstate.tp_rank + pstate.tp_size * (
            pstate.cp_rank + pstate.cp_size * (pstate.dp_rank + saved["data_parallel_size"] * pstate.pp_rank)
        )
        path = ckpt / rng_file_name(rank)
        fix = "restore it from a copy, or pass --no-load-rng to start fresh random streams"
        state = load_torch_file(path, "an RNG state", fix)
        try:
            set_rng(state)
        except RNG_STATE_ERRORS as err:
            fail(f"{path}: not an RNG state this project saved ({type(err).__name__}); {fix}")
        return
    # Pipeline stages draw from their own seeds (seed + 100 x PP rank), as at the start of a run.
    seed = reseed_value(cfg.seed + 100 * pstate.pp_rank, iteration, pstate.dp_rank)
    random.seed(seed)
    np.random.seed(seed)
    model_parallel_manual_seed(seed, pstate.tp_rank)


def reseed_value(seed: int, iteration: int, dp_rank: int) -> int:
    """The seed of a rank whose saved RNG state does not exist; differs from the run's start seed so a
    resumed run does not replay the first iterations' dropout masks."""
    return (seed + 1_000_003 * (iteration + 1) + 10_007 * dp_rank) % (2**31 - 1)
