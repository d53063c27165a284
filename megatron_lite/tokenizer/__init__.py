"""Tokenizers: GPT-2 BPE (offline, via tiktoken) and a byte tokenizer, chosen by --tokenizer-type."""

from megatron_lite.tokenizer.byte_tokenizer import ByteTokenizer
from megatron_lite.tokenizer.gpt2_bpe import GPT2BPETokenizer
from megatron_lite.tokenizer.tokenizer import TOKENIZER_TYPES, Tokenizer, build_tokenizer

__all__ = ["TOKENIZER_TYPES", "ByteTokenizer", "GPT2BPETokenizer", "Tokenizer", "build_tokenizer"]
