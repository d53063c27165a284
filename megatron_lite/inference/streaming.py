"""Incremental detokenization: print generated tokens as they come without splitting UTF-8 characters."""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"
# A UTF-8 character has at most 4 bytes and every token carries at least one, so a character that is
# still incomplete after this many pending tokens never will be (the model produced invalid bytes).
MAX_PENDING = 4


class IncrementalDecoder:
    """Feed token ids one at a time; get back the text that is now complete.

    Byte-level tokenizers (GPT-2 BPE, bytes) can split one character over several tokens, and
    decoding a token alone then yields U+FFFD. Tokens are held back while their decoded text ends in
    an incomplete character and released together once it completes. Pending tokens always start at
    a character boundary, so decoding them alone is exact.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.pending: list[int] = []

    def push(self, token: int) -> str:
        """Add one token; return the text it completes ("" while a character is still partial)."""
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith(REPLACEMENT) and len(self.pending) < MAX_PENDING:
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        """Whatever is still held back, decoded as it is."""
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text
