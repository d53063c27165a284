"""Named RNG streams (Megatron's CudaRNGStatesTracker, for CPU and CUDA) and the dropout that uses them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# Megatron's stream names and seed offsets.
MODEL_PARALLEL_RNG = "model-parallel-rng"
DATA_PARALLEL_RNG = "data-parallel-rng"
MODEL_PARALLEL_SEED_OFFSET = 2718


def _cuda_in_use() -> bool:
    # Track CUDA whenever it exists: a stream seeded before the first CUDA op must still cover it.
    return torch.cuda.is_available()


class RNGStatesTracker:
    """Named generator states that `fork(name)` swaps into the default generators for a block of code.

    A stream's state is kept for the CPU generator and, when CUDA is in use, for the current CUDA
    device's generator, so dropout on either device draws from the stream. Leaving the block saves the
    advanced stream state and puts the default generators back exactly as they were.
    """

    def __init__(self) -> None:
        self._states: dict[str, dict[str, torch.Tensor]] = {}
        self._seeds: set[int] = set()

    def reset(self) -> None:
        self._states = {}
        self._seeds = set()

    def is_initialized(self) -> bool:
        return bool(self._states)

    def add(self, name: str, seed: int) -> None:
        """Start a new stream `name` from `seed`; names and seeds must be unique."""
        if seed in self._seeds:
            raise ValueError(f"seed {seed} already exists in the RNG tracker")
        if name in self._states:
            raise ValueError(f"RNG state {name!r} already exists in the tracker")
        self._seeds.add(seed)
        state = {"cpu": torch.Generator().manual_seed(seed).get_state()}
        if _cuda_in_use():
            state["cuda"] = torch.Generator(device="cuda").manual_seed(seed).get_state()
        self._states[name] = state

    def get_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """A copy of every stream's state (for checkpoints and activation recompute)."""
        return {name: {dev: s.clone() for dev, s in state.items()} for name, state in self._states.items()}

    def set_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        """Replace the streams by ones returned from get_states (the seed set is not restored)."""
        self._states = {name: {dev: s.clone() for dev, s in state.items()} for name, state in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Run the block with the default generators drawing from stream `name`."""
        if name not in self._states:
            raise KeyError(
                f"RNG state {name!r} is not in the tracker; seed it with model_parallel_manual_seed"
            )
        state = self._states[name]
        saved_cpu = torch.get_rng_state()
        torch.set_rng_state(state["cpu"])
        saved_cuda = None
        if "cuda" in state and _cuda_in_use():
            saved_cuda = torch.cuda.get_rng_state()
            torch.cuda.set_rng_state(state["cuda"])
        try:
            yield
        finally:
            state["cpu"] = torch.get_rng_state()
            torch.set_rng_state(saved_cpu)
            if saved_cuda is not None:
                state["cuda"] = torch.cuda.get_rng_state()
                torch.cuda.set_rng_state(saved_cuda)


_RNG_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    """The process-wide tracker (Megatron's get_cuda_rng_tracker)."""
    return _RNG_TRACKER


get_cuda_rng_tracker = get_rng_tracker


def model_parallel_manual_seed(seed: int, tp_rank: int = 0) -> None:
    """Seed the default generators with `seed` and the tracker's streams as Megatron does.

    The default generators (identical on all TP ranks) drive dropout on replicated activations;
    "model-parallel-rng" = seed + 2718 + tp_rank drives dropout inside the TP region, so each rank's
    heads get their own masks.
    """
    torch.manual_seed(seed)
    seed_model_parallel_rng(seed, tp_rank)


model_parallel_cuda_manual_seed = model_parallel_manual_seed


def seed_model_parallel_rng(seed: int, tp_rank: int = 0) -> None:
    """Reset the tracker to Megatron's streams for `seed`, leaving the default generators alone."""
    _RNG_TRACKER.reset()
    _RNG_TRACKER.add(DATA_PARALLEL_RNG, seed)
    _RNG_TRACKER.add(MODEL_PARALLEL_RNG, seed + MODEL_PARALLEL_SEED_OFFSET + tp_rank)


def checkpoint_with_rng_tracker(function: Callable[..., Any], *args: Any) -> Any:
    """torch.utils.checkpoint (non-reentrant) that also replays the tracker's streams on recompute.

    checkpoint() restores the default generators for the recomputation; the tracker's streams have moved
    on by then, so we hand the recomputation the states they had at forward time, and afterwards put
    back the states the rest of backward expects. Dropout masks are thus identical in both passes.
    """
    forward_states = _RNG_TRACKER.get_states()

    @contextlib.contextmanager
    def replay() -> Iterator[None]:
        current = _RNG_TRACKER.get_states()
        _RNG_TRACKER.set_states(forward_states)
        try:
            yield
        finally:
            _RNG_TRACKER.set_states(current)

    return checkpoint(
        function,
        *args,
        use_reentrant=False,
        preserve_rng_state=True,
        context_fn=lambda: (contextlib.nullcontext(), replay()),
    )


class Dropout(nn.Module):
    """Dropout that draws from the tracker's model-parallel stream when `use_model_parallel_rng`.

    Use the stream for activations that differ across TP ranks (attention heads, sequence-parallel
    shards) and the default generator for activations replicated on every TP rank, so replicas stay equal.
    """

    def __init__(self, p: float, use_model_parallel_rng: bool = False) -> None:
        super().__init__()
        self.p = p
        self.use_model_parallel_rng = use_model_parallel_rng

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.use_model_parallel_rng:
            with _RNG_TRACKER.fork(MODEL_PARALLEL_RNG):
                return nn.functional.dropout(x, self.p, training=True)
        return nn.functional.dropout(x, self.p, training=True)

    def draw_seed(self, device: torch.device) -> int:
        """A seed from this dropout's stream, for kernels that draw their own masks from it (context-parallel
        attention): recompute replays the stream, so it gets the same seed and the same masks."""
        context = (
            _RNG_TRACKER.fork(MODEL_PARALLEL_RNG) if self.use_model_parallel_rng else contextlib.nullcontext()
        )
        with context:
            return int(torch.randint(0, 2**62, (1,), device=device).item())

    def extra_repr(self) -> str:
        return f"p={self.p}, use_model_parallel_rng={self.use_model_parallel_rng}"
