"""Exact parameter counts of the GPT-2 family, built on the meta device (no memory)."""

import pytest
import torch
from gpt_helpers import make_config

from megatron_lite.core.models.gpt import GPTModel


def _count(untied: bool, **shape) -> int:
    cfg = make_config(
        vocab_size=50257,
        seq_length=1024,
        make_vocab_size_divisible_by=1,
        untie_embeddings_and_output_weights=untied,
        disable_qkv_bias=untied,
        **shape,
    )
    with torch.device("meta"):
        model = GPTModel(cfg)
    params = list(model.parameters())
    assert all(p.is_meta for p in params)
    return sum(p.numel() for p in params)


def test_gpt2_124m_tied_with_all_biases():
    assert _count(False, num_layers=12, hidden_size=768, num_attention_heads=12) == 124_439_808


@pytest.mark.parametrize(
    ("layers", "hidden", "heads", "expected"),
    [
        (12, 768, 12, 163_009_536),
        (24, 1024, 16, 406_212_608),
        (36, 1280, 20, 838_220_800),
        (48, 1600, 25, 1_637_792_000),
    ],
)
def test_gpt2_family_untied_without_qkv_bias(layers, hidden, heads, expected):
    assert _count(True, num_layers=layers, hidden_size=hidden, num_attention_heads=heads) == expected
