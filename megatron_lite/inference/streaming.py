"""Incremental detokenization: print generated tokens as they come without splitting UTF-8 characters."""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Feed token ids one at a time; get back the text that is now final.

    Byte-level tokenizers (GPT-2 BPE, bytes) can split one character over several tokens; decoding
    the bytes so far then ends in U+FFFD. UTF-8 decoding with replacement has two properties this
    relies on: an incomplete character at the end always decodes to exactly one U+FFFD, and more
    bytes only ever change that last character. So everything before a trailing U+FFFD is final and
    is released at once; the trailing one waits for the next token. Whenever the text decodes
    cleanly to its end, the tokens so far end on a character boundary and are dropped, so each push
    decodes only the few tokens since then. The concatenated output equals decode(all tokens).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.pending: list[int] = []
        self.released = 0  # characters of decode(pending) already returned

    def push(self, token: int) -> str:
        """Add one token; return the text that became final ("" while a character is still partial)."""
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        final = len(text) - 1 if text.endswith(REPLACEMENT) else len(text)
        out = text[self.released : final]
        self.released = max(self.released, final)
        if final == len(text):
            self.pending = []
            self.released = 0
        return out

    def flush(self) -> str:
        """Whatever is still held back, decoded as it is."""
        text = self.tokenizer.decode(self.pending)[self.released :] if self.pending else ""
        self.pending = []
        self.released = 0
        return text
