"""Text generation from trained checkpoints: sampling, KV-cache decoding and streaming detokenization."""

from megatron_lite.inference.generation import (
    filter_logits,
    generate,
    load_model_for_inference,
    sample_next_token,
)
from megatron_lite.inference.streaming import IncrementalDecoder

__all__ = [
    "IncrementalDecoder",
    "filter_logits",
    "generate",
    "load_model_for_inference",
    "sample_next_token",
]
