"""Incremental detokenization: print generated tokens as they come without splitting UTF-8 characters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Feed token ids one at a time; get back the text that is now final.

    Byte-level tokenizers (GPT-2 BPE, bytes) can split one character over several tokens; decoding
    the bytes so far then ends in U+FFFD. UTF-8 decoding with replacement has two properties this
    relies on: an incomplete character at the end always decodes to exactly one U+FFFD, and more
    bytes only ever change that last character. So everything before a trailing U+FFFD is final and
    is released at once; the trailing one waits for the next token. Whenever the text decodes
    cleanly to its end, the tokens so far end on a character boundary and become context.

    New tokens are decoded after the last CONTEXT tokens (initially the tail of `context`, e.g. the
    prompt) and only the text beyond the context's own decoding is released: SentencePiece drops a
    piece's leading space when it starts the decoded text, and NullTokenizer joins ids with spaces, so
    a token decoded alone would lose the space before it. The concatenated output equals
    decode(context + tokens) less decode(context).
    """

    CONTEXT = 4

    def __init__(self, tokenizer: Any, context: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.pending: list[int] = []
        self._set_context(list(context))

    def _set_context(self, ids: list[int]) -> None:
        self.context = ids[-self.CONTEXT :]
        self.base = len(self.tokenizer.decode(self.context)) if self.context else 0
        self.released = 0  # characters of the pending tokens' text already returned

    def push(self, token: int) -> str:
        """Add one token; return the text that became final ("" while a character is still partial)."""
        self.pending.append(token)
        text = self.tokenizer.decode(self.context + self.pending)
        final = len(text) - 1 if text.endswith(REPLACEMENT) else len(text)
        start = self.base + self.released
        out = text[start:final] if final > start else ""
        self.released = max(self.released, final - self.base)
        if final == len(text):
            ids, self.pending = self.context + self.pending, []
            self._set_context(ids)
        return out

    def flush(self) -> str:
        """Whatever is still held back, decoded as it is."""
        text = ""
        if self.pending:
            text = self.tokenizer.decode(self.context + self.pending)[self.base + self.released :]
        self.pending = []
        self._set_context([])
        return text
