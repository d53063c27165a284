"""`build_tokenizer`: the --tokenizer-type flag (and the files it names) to a tokenizer object."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, Protocol

import numpy as np

from megatron_lite.config.tokenizer import TOKENIZER_TYPES, TokenizerArgs, check_tokenizer
from megatron_lite.errors import fail

__all__ = [
    "BUNDLED_TOKENIZER_TYPES",
    "TOKENIZER_OPTIONS",
    "TOKENIZER_TYPES",
    "Tokenizer",
    "build_tokenizer",
    "tokenizer_options",
]

# The classes that need no file of the user's: GPT-2 BPE ships its files, the byte tokenizer has none.
BUNDLED_TOKENIZER_TYPES = ("GPT2BPETokenizer", "ByteTokenizer")
# Settings build_tokenizer reads besides the type: the TokenizerArgs fields, and --vocab-size (a model
# setting that NullTokenizer and TikTokenizer also read, as in Megatron).
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TokenizerArgs) if f.name != "tokenizer_type"}
_DEFAULTS["vocab_size"] = None
TOKENIZER_OPTIONS = tuple(_DEFAULTS)


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


def tokenizer_options(cfg: Any) -> dict[str, Any]:
    """The tokenizer settings of a config (or any object with those attribute names), defaults filled in."""
    return {name: getattr(cfg, name, default) for name, default in _DEFAULTS.items()}


def build_tokenizer(
    args: str | Any, vocab_file: str | None = None, merge_file: str | None = None, **options: Any
) -> Tokenizer:
    """The tokenizer of `--tokenizer-type`, as Megatron's build_tokenizer(args).

    `args` is a config (MegatronConfig, a Namespace: its tokenizer settings are read; --vocab-file or
    --merge-file without a type mean GPT2BPETokenizer), or the type's name with the settings as
    keywords (names = TOKENIZER_OPTIONS). Settings that do not fit the type are one-line errors
    naming the flag.
    """
    if isinstance(args, str):
        unknown = sorted(set(options) - set(_DEFAULTS))
        if unknown:
            raise TypeError(f"build_tokenizer got unknown settings: {', '.join(unknown)}")
        settings = {**_DEFAULTS, **options, "vocab_file": vocab_file, "merge_file": merge_file}
        name = args
    else:
        settings = tokenizer_options(args)
        name = args.tokenizer_type
        if name is None and (settings["vocab_file"] is not None or settings["merge_file"] is not None):
            # Megatron's GPT examples give only the BPE files; they can only mean the GPT-2 tokenizer.
            name = "GPT2BPETokenizer"
    s = SimpleNamespace(tokenizer_type=name, **settings)
    if name is None:
        fail(f"--tokenizer-type is required; choose one of: {', '.join(TOKENIZER_TYPES)}")
    check_tokenizer(s)
    return _build(name, s)


def _build(name: str, s: SimpleNamespace) -> Tokenizer:
    # Each class's module is imported only when it is used: transformers and sentencepiece are optional.
    if name == "GPT2BPETokenizer":
        from megatron_lite.tokenizer.gpt2_bpe import GPT2BPETokenizer

        return GPT2BPETokenizer(s.vocab_file, s.merge_file)
    if name == "ByteTokenizer":
        from megatron_lite.tokenizer.byte_tokenizer import ByteTokenizer

        return ByteTokenizer()
    if name == "NullTokenizer":
        from megatron_lite.tokenizer.null_tokenizer import NullTokenizer

        return NullTokenizer(s.vocab_size, s.null_tokenizer_eod_id, s.null_tokenizer_pad_id)
    if name == "HuggingFaceTokenizer":
        from megatron_lite.tokenizer.huggingface_tokenizer import HuggingFaceTokenizer

        return HuggingFaceTokenizer(s.tokenizer_model, s.trust_remote_code, s.vocab_file, s.merge_file)
    if name == "GPTSentencePieceTokenizer":
        from megatron_lite.tokenizer.gpt_sentencepiece_tokenizer import GPTSentencePieceTokenizer

        return GPTSentencePieceTokenizer(s.tokenizer_model)
    if name == "Llama2Tokenizer":
        from megatron_lite.tokenizer.llama2_tokenizer import Llama2Tokenizer

        return Llama2Tokenizer(s.tokenizer_model)
    if name == "SentencePieceTokenizer":
        from megatron_lite.tokenizer.sentencepiece_tokenizer import SentencePieceTokenizer

        return SentencePieceTokenizer(s.tokenizer_model, s.vocab_extra_ids)
    if name == "TikTokenizer":
        from megatron_lite.tokenizer.tiktoken_tokenizer import TikTokenizer

        return TikTokenizer(
            s.tokenizer_model,
            s.tiktoken_pattern,
            s.vocab_size,
            s.tiktoken_num_special_tokens,
            s.tiktoken_special_tokens,
        )
    raise AssertionError(f"check_tokenizer let through {name!r}")
