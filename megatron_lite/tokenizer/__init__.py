"""Tokenizers chosen by --tokenizer-type: GPT-2 BPE and bytes (no files needed), and Megatron's file-backed classes."""

from megatron_lite.tokenizer.byte_tokenizer import ByteTokenizer
from megatron_lite.tokenizer.gpt2_bpe import GPT2BPETokenizer
from megatron_lite.tokenizer.tokenizer import (
    BUNDLED_TOKENIZER_TYPES,
    TOKENIZER_OPTIONS,
    TOKENIZER_TYPES,
    Tokenizer,
    build_tokenizer,
    tokenizer_options,
)

__all__ = [
    "BUNDLED_TOKENIZER_TYPES",
    "TOKENIZER_OPTIONS",
    "TOKENIZER_TYPES",
    "ByteTokenizer",
    "GPT2BPETokenizer",
    "Tokenizer",
    "build_tokenizer",
    "tokenizer_options",
]
