"""Recompute a module's output in backward without keeping it: Megatron's output-discarding checkpoint."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# --recompute-modules layernorm. A plain checkpoint of a norm saves little: the norm's output is also
# the input that the next linear layer saves for its weight gradient, so it stays alive either way. This
# checkpoint runs the norm without a graph and, once the consumer has run, frees the output's storage.
# A hook on the consumer's output (its gradient is computed just before the consumer's backward needs
# the saved input) reruns the norm and refills the freed storage in place: every node that saved the
# output sees its values again, and the tensor's version counter is untouched.


class _OutputDiscardingFunction(torch.autograd.Function):
    """forward: module(x) without a graph; backward: the gradient through the recomputed graph.

    The module's parameters are inputs too, so the output requires grad when they do and their
    gradients come back through this node like any other's.
    """

    @staticmethod
    def forward(ctx: Any, checkpoint: CheckpointWithoutOutput, x: torch.Tensor, *params: torch.Tensor):
        ctx.checkpoint = checkpoint
        ctx.save_for_backward(x)
        with torch.no_grad():
            return checkpoint.module(x)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        checkpoint, ctx.checkpoint = ctx.checkpoint, None  # break the cycle output -> node -> checkpoint
        (saved,) = ctx.saved_tensors
        x, output = checkpoint.recompute(saved)
        checkpoint.output = checkpoint._recomputed = None
        inputs = [x, *checkpoint.params]
        needed = [t for t in inputs if t.requires_grad]
        grads = dict(zip(map(id, needed), torch.autograd.grad(output, needed, grad_output)))
        return (None, *(grads.get(id(t)) for t in inputs))


class CheckpointWithoutOutput:
    """For one call: `out = checkpoint(x)` runs the module; once out's consumer has run,
    `checkpoint.discard_output_and_register_recompute(consumer_output)` frees out until backward."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.params: list[torch.Tensor] = []
        self.output: torch.Tensor | None = None
        self._recomputed: tuple[torch.Tensor, torch.Tensor] | None = None
        self._autocast: tuple[str, bool, torch.dtype] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Backward runs outside the forward's autocast region: the recomputation re-enters it.
        device = x.device.type
        self._autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.output = _OutputDiscardingFunction.apply(self, x, *self.params)
        return self.output

    def discard_output_and_register_recompute(self, hook_tensor: torch.Tensor) -> None:
        """Free the output's storage; refill it when backward reaches hook_tensor's gradient."""
        if not (self.output.requires_grad and hook_tensor.requires_grad):
            return
        self.output.untyped_storage().resize_(0)
        (saved,) = self.output.grad_fn.saved_tensors

        def refill(grad: torch.Tensor) -> None:
            self.recompute(saved)

        hook_tensor.register_hook(refill)

    def recompute(self, saved_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, output) of the module rerun with a graph; the freed output's storage is refilled."""
        if self._recomputed is None:
            x = saved_input.detach().requires_grad_(saved_input.requires_grad)
            device, enabled, dtype = self._autocast
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                output = self.module(x)
            storage = self.output.untyped_storage()
            if storage.nbytes() == 0:
                storage.resize_(output.untyped_storage().nbytes())
                storage.copy_(output.untyped_storage())
            self._recomputed = (x, output)
        return self._recomputed
