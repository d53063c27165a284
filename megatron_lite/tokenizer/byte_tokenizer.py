"""A byte-level tokenizer: ids 0..255 are UTF-8 bytes, 256 is the end-of-document token."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates cannot be UTF-8; replace them with U+FFFD as the GPT-2 tokenizer does.
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


class ByteTokenizer:
    """UTF-8 bytes as ids: vocabulary 257, eod 256; no files needed."""

    name = "ByteTokenizer"
    vocab_size = 257
    eod = 256

    def encode(self, text: str) -> list[int]:
        return list(_utf8(text))

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        # eod and anything else outside a byte's range is not text: skip it rather than fail mid-sample.
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(_utf8(text)) for text in texts]

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids concatenated (uint32) and the length of each."""
        encoded = [_utf8(text) for text in texts]
        flat = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.uint32)
        return flat, np.array([len(b) for b in encoded], dtype=np.int64)
