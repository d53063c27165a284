"""`build_tokenizer`: the --tokenizer-type flag to a tokenizer object, and the interface they share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from megatron_lite.errors import fail
from megatron_lite.tokenizer.byte_tokenizer import ByteTokenizer
from megatron_lite.tokenizer.gpt2_bpe import GPT2BPETokenizer

TOKENIZER_TYPES = ("GPT2BPETokenizer", "ByteTokenizer")


class Tokenizer(Protocol):
    """What the data pipeline, training and generation need from a tokenizer."""

    name: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def eod(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]: ...


def build_tokenizer(
    tokenizer_type: str, vocab_file: str | None = None, merge_file: str | None = None
) -> GPT2BPETokenizer | ByteTokenizer:
    """The tokenizer named by --tokenizer-type; GPT-2 uses the shipped BPE unless files are given."""
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "ByteTokenizer":
        if vocab_file is not None or merge_file is not None:
            fail("--tokenizer-type ByteTokenizer takes no --vocab-file/--merge-file; leave them out")
        return ByteTokenizer()
    fail(f"--tokenizer-type {tokenizer_type!r} is not supported; choose one of: {', '.join(TOKENIZER_TYPES)}")
