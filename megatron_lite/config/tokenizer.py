"""Tokenizer settings: which tokenizer class and the files it reads."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_lite.config.fields import _f


@dataclass
class TokenizerArgs:
    """Tokenizer settings: which tokenizer class and the files it reads."""

    tokenizer_type: str | None = _f(
        None, "Tokenizer.", choices=["GPT2BPETokenizer", "ByteTokenizer"], group="data"
    )
    vocab_file: str | None = _f(None, "GPT-2 encoder.json (default: the bundled one).", group="data")
    merge_file: str | None = _f(None, "GPT-2 vocab.bpe merges (default: the bundled one).", group="data")
