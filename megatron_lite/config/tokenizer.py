"""Tokenizer settings: which tokenizer class, the files it reads, and the checks on them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_lite.config.fields import _f, fail

# Megatron-LM's --tokenizer-type choices (its flag table), then megatron-lite's own byte tokenizer.
MEGATRON_TOKENIZER_TYPES = (
    "BertWordPieceLowerCase",
    "BertWordPieceCase",
    "GPT2BPETokenizer",
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "HuggingFaceTokenizer",
    "Llama2Tokenizer",
    "TikTokenizer",
    "MultimodalTokenizer",
    "NullTokenizer",
    "NullMultimodalTokenizer",
    "SFTTokenizer",
)
TOKENIZER_TYPES = (
    "GPT2BPETokenizer",
    "ByteTokenizer",
    "NullTokenizer",
    "HuggingFaceTokenizer",
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "Llama2Tokenizer",
    "TikTokenizer",
)
# What --tokenizer-model is for each class that reads one.
TOKENIZER_MODEL_KINDS = {
    "HuggingFaceTokenizer": "a HuggingFace tokenizer directory, or a hub name already in the local cache",
    "SentencePieceTokenizer": "a SentencePiece .model file",
    "GPTSentencePieceTokenizer": "a SentencePiece .model file",
    "Llama2Tokenizer": "a SentencePiece .model file",
    "TikTokenizer": "a tiktoken vocabulary (Megatron's .json list, or a .tiktoken rank file)",
}
# Megatron's types for other model families, and why they are not here.
_NOT_SUPPORTED = {
    "BertWordPieceLowerCase": "BERT models",
    "BertWordPieceCase": "BERT models",
    "MultimodalTokenizer": "multimodal models",
    "NullMultimodalTokenizer": "multimodal models",
    "SFTTokenizer": "supervised fine-tuning",
}
TIKTOKEN_REQUIRED_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
# Megatron's TikTokenizer vocabulary size when --vocab-size is not given.
TIKTOKEN_DEFAULT_VOCAB_SIZE = 2**17


@dataclass
class TokenizerArgs:
    """Tokenizer settings: which tokenizer class and the files it reads."""

    tokenizer_type: str | None = _f(
        None, "Tokenizer class.", choices=[*MEGATRON_TOKENIZER_TYPES, "ByteTokenizer"], group="data"
    )
    vocab_file: str | None = _f(None, "GPT-2 encoder.json (default: the bundled one).", group="data")
    merge_file: str | None = _f(None, "GPT-2 vocab.bpe merges (default: the bundled one).", group="data")
    tokenizer_model: str | None = _f(
        None,
        "Tokenizer model: a SentencePiece .model, a tiktoken vocabulary, or a HuggingFace tokenizer "
        "directory (never downloaded).",
        group="data",
    )
    tiktoken_pattern: str | None = _f(
        None, "TikTokenizer pre-tokenisation regex (default v2).", choices=["v1", "v2"], group="data"
    )
    tiktoken_num_special_tokens: int = _f(
        1000, "TikTokenizer: ids reserved for special tokens before the vocabulary.", group="data"
    )
    tiktoken_special_tokens: list[str] | None = _f(
        None, "TikTokenizer special tokens (default <unk> <s> </s>).", nargs="+", group="data"
    )
    vocab_extra_ids: int = _f(0, "SentencePieceTokenizer: add <extra_id_0>.. sentinel tokens.", group="data")
    trust_remote_code: bool = _f(
        False, "HuggingFaceTokenizer: allow the tokenizer directory's own Python code.", group="data"
    )
    null_tokenizer_eod_id: int | None = _f(
        None, "NullTokenizer end-of-document id (default --vocab-size - 1).", group="data"
    )
    null_tokenizer_pad_id: int = _f(-1, "NullTokenizer padding id (-1: none).", group="data")


def check_tokenizer(cfg: Any) -> None:
    """Check the tokenizer settings against each other; one line naming the flag when they do not fit.

    `cfg` is a MegatronConfig or anything with the same attribute names (vocab_size included).
    """
    name = cfg.tokenizer_type
    if name is None:
        return
    if name in _NOT_SUPPORTED:
        fail(
            f"--tokenizer-type {name!r} is for {_NOT_SUPPORTED[name]}, which megatron-lite does not train; "
            f"choose one of: {', '.join(TOKENIZER_TYPES)}"
        )
    if name not in TOKENIZER_TYPES:
        fail(f"--tokenizer-type {name!r} is not supported; choose one of: {', '.join(TOKENIZER_TYPES)}")
    takes_bpe_files = name in ("GPT2BPETokenizer", "HuggingFaceTokenizer")
    if not takes_bpe_files and (cfg.vocab_file is not None or cfg.merge_file is not None):
        fail(f"--tokenizer-type {name} takes no --vocab-file/--merge-file; leave them out")
    if name in TOKENIZER_MODEL_KINDS:
        if cfg.tokenizer_model is None:
            fail(f"--tokenizer-type {name} needs --tokenizer-model: {TOKENIZER_MODEL_KINDS[name]}")
    elif cfg.tokenizer_model is not None:
        fail(f"--tokenizer-type {name} takes no --tokenizer-model; leave it out")
    if cfg.vocab_extra_ids and name != "SentencePieceTokenizer":
        fail(f"--vocab-extra-ids applies to --tokenizer-type SentencePieceTokenizer only, not {name}")
    if cfg.vocab_extra_ids < 0:
        fail(f"--vocab-extra-ids must be >= 0, got {cfg.vocab_extra_ids}")
    if cfg.vocab_size is not None and cfg.vocab_size <= 0:
        fail(f"--vocab-size must be positive, got {cfg.vocab_size}")
    if name == "NullTokenizer":
        _check_null(cfg)
    if name == "TikTokenizer":
        _check_tiktoken(cfg)


def _check_null(cfg: Any) -> None:
    if cfg.vocab_size is None:
        fail("--tokenizer-type NullTokenizer needs --vocab-size N (ids 0..N-1; end of document N-1)")
    eod = cfg.null_tokenizer_eod_id
    if eod is not None and not 0 <= eod < cfg.vocab_size:
        fail(
            f"--null-tokenizer-eod-id {eod} is outside the vocabulary 0..{cfg.vocab_size - 1} (--vocab-size)"
        )


def _check_tiktoken(cfg: Any) -> None:
    specials = list(cfg.tiktoken_special_tokens or TIKTOKEN_REQUIRED_SPECIAL_TOKENS)
    count = cfg.tiktoken_num_special_tokens
    if len(set(specials)) != len(specials):
        fail(f"--tiktoken-special-tokens {' '.join(specials)}: a token is listed twice")
    missing = [t for t in TIKTOKEN_REQUIRED_SPECIAL_TOKENS if t not in specials]
    if missing:
        fail(
            f"--tiktoken-special-tokens must include {' '.join(TIKTOKEN_REQUIRED_SPECIAL_TOKENS)}; missing {' '.join(missing)}"
        )
    if count < len(specials):
        fail(
            f"--tiktoken-num-special-tokens {count} is fewer than the {len(specials)} "
            "--tiktoken-special-tokens; raise it"
        )
    vocab = cfg.vocab_size if cfg.vocab_size is not None else TIKTOKEN_DEFAULT_VOCAB_SIZE
    if count >= vocab:
        fail(
            f"--tiktoken-num-special-tokens {count} leaves no room for the vocabulary of --vocab-size {vocab}"
        )
