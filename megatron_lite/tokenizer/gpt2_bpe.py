"""GPT-2 byte-level BPE (Megatron's GPT2BPETokenizer) on tiktoken, built offline from shipped files."""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import tiktoken
import tiktoken.load

from megatron_lite.errors import fail

ASSETS = Path(__file__).resolve().parent / "assets"
SHIPPED_RANKS = ASSETS / "r50k_base.tiktoken.gz"
ENDOFTEXT = "<|endoftext|>"
EOD_ID = 50256
N_VOCAB = 50257

# The GPT-2 (r50k) pre-tokenisation regex as published in tiktoken's tiktoken_ext/openai_public.py;
# equivalent to the original GPT-2 pattern, with possessive quantifiers for speed.
R50K_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

# Texts are joined into strings of about this many characters before encoding: tiktoken pays a fixed
# cost per call, so many small documents encode ~3x slower one by one than as one large string.
JOIN_TARGET_CHARS = 1 << 20


def load_shipped_ranks(path: Path = SHIPPED_RANKS) -> dict[bytes, int]:
    """Read tiktoken's own `<base64 token> <rank>` format from the gzipped file shipped with the package."""
    ranks: dict[bytes, int] = {}
    with gzip.open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                fail(f"{path}:{line_no}: not a tiktoken rank line; reinstall megatron-lite")
    return ranks


@contextlib.contextmanager
def _tiktoken_cache_disabled() -> Iterator[None]:
    # tiktoken caches files by *path* in a temp dir: a user who edits their vocab file in place would
    # silently get the old one back. An empty TIKTOKEN_CACHE_DIR turns that cache off.
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved


def load_user_ranks(vocab_file: str, merge_file: str) -> dict[bytes, int]:
    """Ranks from the original GPT-2 release files: encoder.json (--vocab-file) and vocab.bpe (--merge-file)."""
    for flag, path in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
        if not os.path.isfile(path):
            fail(f"{path}: {flag} not found; give the GPT-2 encoder.json/vocab.bpe pair or leave both out")
    try:
        with _tiktoken_cache_disabled():
            return tiktoken.load.data_gym_to_mergeable_bpe_ranks(
                vocab_bpe_file=merge_file, encoder_json_file=vocab_file
            )
    except (AssertionError, KeyError, ValueError, UnicodeDecodeError) as err:
        kind = "not valid JSON" if isinstance(err, json.JSONDecodeError) else "does not match the merges"
        fail(
            f"{vocab_file}: {kind} of {merge_file}; --vocab-file must be GPT-2's encoder.json and "
            "--merge-file its vocab.bpe"
        )


class GPT2BPETokenizer:
    """GPT-2 BPE: 50,257 ids, `<|endoftext|>` = 50256 is the end-of-document token."""

    name = "GPT2BPETokenizer"

    def __init__(self, vocab_file: str | None = None, merge_file: str | None = None) -> None:
        if (vocab_file is None) != (merge_file is None):
            fail(
                "--vocab-file and --merge-file go together: give both (GPT-2 encoder.json and vocab.bpe) or neither"
            )
        if vocab_file is not None and merge_file is not None:
            ranks = load_user_ranks(vocab_file, merge_file)
        else:
            ranks = load_shipped_ranks()
        if len(ranks) != EOD_ID:
            fail(f"{vocab_file or SHIPPED_RANKS}: has {len(ranks)} BPE tokens, GPT-2 has {EOD_ID}")
        self._enc = tiktoken.Encoding(
            name="gpt2",
            pat_str=R50K_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens={ENDOFTEXT: EOD_ID},
            explicit_n_vocab=N_VOCAB,
        )
        self._eod_set = frozenset({ENDOFTEXT})

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def eod(self) -> int:
        return EOD_ID

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text; a literal "<|endoftext|>" in the text is encoded as text, never as eod."""
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        # Ids of the model's padded vocabulary (>= 50257) have no text; skip them rather than fail.
        return self._enc.decode([int(i) for i in ids if 0 <= int(i) < N_VOCAB])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text, computed as fast as `encode_flat`."""
        flat, lengths = self.encode_flat(texts)
        ends = np.cumsum(lengths)
        return [chunk.tolist() for chunk in np.split(flat, ends[:-1])] if len(texts) else []

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids concatenated (uint32) and the length of each; same ids as `encode` text by text.

        Small texts are joined with "<|endoftext|>" and encoded as one string: tiktoken splits on an
        allowed special token and encodes the pieces independently, so the result is each text's
        ordinary encoding with eod between them, which we cut apart again.
        """
        pieces: list[np.ndarray] = []
        lengths = np.zeros(len(texts), dtype=np.int64)
        group: list[int] = []
        group_chars = 0

        def flush() -> None:
            nonlocal group_chars
            if not group:
                return
            ids = self._encode_numpy(ENDOFTEXT.join(texts[i] for i in group), self._eod_set)
            eods = np.flatnonzero(ids == EOD_ID)
            bounds = np.concatenate(([-1], eods, [len(ids)]))
            lengths[group] = np.diff(bounds) - 1
            pieces.append(ids[ids != EOD_ID] if len(eods) else ids)
            group.clear()
            group_chars = 0

        for i, text in enumerate(texts):
            if ENDOFTEXT in text:
                # The literal string must stay text, so this one cannot share a joined string.
                flush()
                ids = self._encode_numpy(text, frozenset())
                lengths[i] = len(ids)
                pieces.append(ids)
                continue
            group.append(i)
            group_chars += len(text)
            if group_chars >= JOIN_TARGET_CHARS:
                flush()
        flush()
        flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint32)
        return flat, lengths

    def _encode_numpy(self, text: str, allowed: frozenset[str]) -> np.ndarray:
        try:
            return self._enc.encode_to_numpy(text, allowed_special=allowed, disallowed_special=())
        except UnicodeEncodeError:
            # Lone surrogates (possible via JSON "\ud800" escapes) are not encodable; replace them as
            # tiktoken's encode_ordinary does.
            fixed = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return self._enc.encode_to_numpy(fixed, allowed_special=allowed, disallowed_special=())
