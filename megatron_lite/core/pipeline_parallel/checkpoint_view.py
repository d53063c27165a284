"""A rank's pipeline chunks seen as (its part of) one GPTModel, so checkpoints hold the whole model's names."""

from __future__ import annotations

from torch import nn


def checkpoint_module(chunks: list[nn.Module]) -> nn.Module:
    """A module over the chunks' own parameters named as in the whole model: `embedding`, `decoder.layers`
    (every chunk's layers in order, each with its global `layer_number`), `decoder.final_layernorm`,
    `output_layer`. The last stage's copy of tied embeddings is `embedding.word_embeddings.weight`, the
    key it has in the whole model (Megatron's checkpoints tie it to the first stage's the same way), so
    it is read from that key and written as a replica of it."""
    view = nn.Module()
    first = next((c for c in chunks if c.pre_process), None)
    last = next((c for c in chunks if c.post_process), None)
    if first is not None:
        view.embedding = first.embedding
    elif last is not None and last.share_embeddings_and_output_weights:
        view.embedding = nn.Module()
        view.embedding.word_embeddings = nn.Module()
        view.embedding.word_embeddings.register_parameter("weight", last.output_layer.weight)
    view.decoder = nn.Module()
    view.decoder.layers = nn.ModuleList(layer for chunk in chunks for layer in chunk.decoder.layers)
    if last is not None:
        view.decoder.final_layernorm = last.decoder.final_layernorm
        if not last.share_embeddings_and_output_weights:
            view.output_layer = last.output_layer
    return view
