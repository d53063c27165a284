"""Megatron's TikTokenizer: a tiktoken BPE from a vocabulary file, its ids after the special tokens."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence

import numpy as np
import tiktoken

from megatron_lite.config.tokenizer import TIKTOKEN_DEFAULT_VOCAB_SIZE, TIKTOKEN_REQUIRED_SPECIAL_TOKENS
from megatron_lite.errors import fail
from megatron_lite.tokenizer.base import TextTokenizer, require_file

# Megatron's two pre-tokenisation regexes (megatron/training/tokenizer/tokenizer.py, PATTERN_TIKTOKEN*).
PATTERN_TIKTOKEN_V1 = r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
PATTERN_TIKTOKEN_V2 = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PATTERNS = {"v1": PATTERN_TIKTOKEN_V1, "v2": PATTERN_TIKTOKEN_V2}
SPECIAL_FILLER = "<SPECIAL_{}>"


def read_vocabulary(path: str) -> list[bytes]:
    """The tokens of a vocabulary file in rank order.

    Megatron's format is a JSON list of {"rank": i, "token_bytes": base64, "token_str": text} with
    rank i at position i and ranks 0..255 the single bytes 0..255. tiktoken's own `.tiktoken` format
    (a `<base64 token> <rank>` line per token, ranks 0..n-1) is read as well.
    """
    require_file(path, "--tokenizer-model", "a tiktoken vocabulary (.json or .tiktoken)")
    with open(path, "rb") as f:
        raw = f.read()
    if raw.lstrip()[:1] == b"[":
        return _read_megatron_json(path, raw)
    return _read_rank_lines(path, raw)


def _read_megatron_json(path: str, raw: bytes) -> list[bytes]:
    try:
        entries = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        fail(
            f"--tokenizer-model {path}: not valid JSON ({err}); Megatron's tiktoken vocabulary is a JSON list"
        )
    tokens = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != {"rank", "token_bytes", "token_str"}:
            fail(f"--tokenizer-model {path}: entry {i} is not a {{rank, token_bytes, token_str}} object")
        if entry["rank"] != i:
            fail(
                f"--tokenizer-model {path}: entry {i} has rank {entry['rank']}; ranks must be 0, 1, 2, ... in order"
            )
        try:
            token = base64.b64decode(entry["token_bytes"], validate=True)
        except (binascii.Error, TypeError, ValueError):
            fail(f"--tokenizer-model {path}: entry {i} token_bytes is not base64")
        if i < 256 and token != bytes([i]):
            fail(
                f"--tokenizer-model {path}: rank {i} must be the single byte {i} (ranks 0..255 are the bytes)"
            )
        tokens.append(token)
    return tokens


def _read_rank_lines(path: str, raw: bytes) -> list[bytes]:
    tokens = []
    for line_no, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            tokens.append(base64.b64decode(token, validate=True))
            if int(rank) != len(tokens) - 1:
                fail(
                    f"--tokenizer-model {path}:{line_no}: rank {int(rank)}, expected {len(tokens) - 1} (ranks in order)"
                )
        except (ValueError, binascii.Error):
            fail(
                f"--tokenizer-model {path}:{line_no}: neither Megatron's tiktoken JSON nor a "
                "'<base64 token> <rank>' .tiktoken line"
            )
    return tokens


class TikTokenizer(TextTokenizer):
    """Megatron's TikTokenizer: ids 0..S-1 are the special tokens, vocabulary token of rank r is S + r.

    S is --tiktoken-num-special-tokens: the --tiktoken-special-tokens (default <unk> <s> </s>), then
    <SPECIAL_k> fillers. The vocabulary is cut to its first --vocab-size - S tokens (--vocab-size
    default 131072, Megatron's) and must have that many. Text is encoded with encode_ordinary: a
    special token written in the text stays text. eod = eos = `</s>`, bos = `<s>`.
    """

    name = "TikTokenizer"

    def __init__(
        self,
        path: str,
        pattern: str | None = "v2",
        vocab_size: int | None = None,
        num_special_tokens: int = 1000,
        special_tokens: Sequence[str] | None = None,
    ) -> None:
        self.path = path
        self._vocab_size = int(vocab_size) if vocab_size is not None else TIKTOKEN_DEFAULT_VOCAB_SIZE
        specials = list(special_tokens) if special_tokens else list(TIKTOKEN_REQUIRED_SPECIAL_TOKENS)
        specials += [SPECIAL_FILLER.format(i) for i in range(len(specials), num_special_tokens)]
        self.special_tokens = specials
        self.num_special_tokens = num_special_tokens
        inner = self._vocab_size - num_special_tokens
        tokens = read_vocabulary(path)
        if len(tokens) < inner:
            fail(
                f"--tokenizer-model {path} has {len(tokens)} tokens, but --vocab-size {self._vocab_size} less "
                f"--tiktoken-num-special-tokens {num_special_tokens} needs {inner}; lower --vocab-size to at most "
                f"{len(tokens) + num_special_tokens}"
            )
        ranks = {token: rank + num_special_tokens for rank, token in enumerate(tokens[:inner])}
        if len(ranks) != inner:
            fail(f"--tokenizer-model {path}: a token appears twice in the first {inner} entries")
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            fail(f"--tokenizer-model {path}: byte {missing[0]} has no token; every single byte needs one")
        self.unk = specials.index("<unk>")
        self.bos = specials.index("<s>")
        self.eos = specials.index("</s>")
        self.pad = specials.index("<pad>") if "<pad>" in specials else None
        self._enc = tiktoken.Encoding(
            name="megatron-tiktoken",
            pat_str=PATTERNS[pattern or "v2"],
            mergeable_ranks=ranks,
            special_tokens={token: i for i, token in enumerate(specials)},
        )

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self.eos

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._enc.decode(self.in_vocab(ids))
