"""Megatron's NullTokenizer: the text is already token ids, written as space-separated integers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from megatron_lite.errors import fail
from megatron_lite.tokenizer.base import TextTokenizer


class NullTokenizer(TextTokenizer):
    """Ids are the integers in the text; `--vocab-size N` gives ids 0..N-1 and eod N-1.

    This is Megatron-LM main's accounting (megatron/core/tokenizers, since April 2026): vocab_size is
    N exactly and eod the last id, or --null-tokenizer-eod-id. core_v0.15.0's legacy class had
    vocab_size N+1 with eod N; megatron-lite pads the vocabulary from --vocab-size itself, so it
    follows main, where the tokenizer's vocabulary and --vocab-size agree.
    """

    name = "NullTokenizer"

    def __init__(self, vocab_size: int, eod_id: int | None = None, pad_id: int = -1) -> None:
        self._vocab_size = int(vocab_size)
        self._eod = int(eod_id) if eod_id is not None else self._vocab_size - 1
        self.pad = int(pad_id)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    def encode(self, text: str) -> list[int]:
        """Megatron's `[int(x) for x in text.split(' ')]`, with each id checked against the vocabulary."""
        try:
            ids = [int(x) for x in text.split(" ")]
        except ValueError:
            bad = next(x for x in text.split(" ") if not _is_int(x))
            fail(
                f"NullTokenizer: {bad[:40]!r} is not a token id; its text must be integers separated by single spaces"
            )
        for i in ids:
            if not 0 <= i < self._vocab_size:
                fail(
                    f"NullTokenizer: token id {i} is outside 0..{self._vocab_size - 1} (--vocab-size {self._vocab_size})"
                )
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return " ".join(str(int(i)) for i in ids)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True
