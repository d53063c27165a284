"""Tied word embeddings across the first and last pipeline stage: one gradient, summed in the embedding group."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.parallel_state import ParallelState


def tied_embedding_weight(chunks: list[nn.Module], pstate: ParallelState) -> torch.Tensor | None:
    """This rank's copy of the tied word embeddings: the embedding on the first stage, the output layer's
    `shared` copy on the last; None when the embeddings are untied or the rank holds neither."""
    if pstate.pp_size == 1:
        return None
    for chunk in chunks:
        if not getattr(chunk, "share_embeddings_and_output_weights", False):
            return None
        if chunk.pre_process:
            return chunk.embedding.word_embeddings.weight
        if chunk.post_process:
            return chunk.output_layer.weight
    return None


def all_reduce_embedding_grads(chunks: list[nn.Module], pstate: ParallelState) -> None:
    """Sum the first stage's lookup gradient and the last stage's projection gradient of the tied weight,
    as the whole model's single weight gets both (Megatron's _allreduce_word_embedding_grads)."""
    weight = tied_embedding_weight(chunks, pstate)
    if weight is None or pstate.embedding_group is None:
        return
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    dist.all_reduce(weight.grad, group=pstate.embedding_group)
