"""Megatron's SentencePieceTokenizer, and the SentencePiece model loading all three SentencePiece classes share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from megatron_lite.errors import fail
from megatron_lite.tokenizer.base import TextTokenizer, missing_package, require_file


def load_sentencepiece(model_file: str, tokenizer: str) -> Any:
    """A SentencePieceProcessor for --tokenizer-model; `sentencepiece` is imported only here."""
    try:
        import sentencepiece
    except ImportError:
        missing_package("sentencepiece", "sentencepiece", tokenizer)
    require_file(model_file, "--tokenizer-model", "a SentencePiece .model file")
    try:
        return sentencepiece.SentencePieceProcessor(model_file=model_file)
    except (OSError, RuntimeError) as err:
        fail(
            f"--tokenizer-model {model_file}: not a SentencePiece model ({str(err).strip() or type(err).__name__})"
        )


class SentencePieceTokenizer(TextTokenizer):
    """Megatron's general SentencePiece wrapper: <CLS> <SEP> <EOD> <MASK> (and pad/bos/eos) added as specials.

    Special tokens missing from the model get ids after its pieces, in Megatron's order; eod is
    `<EOD>`. Encoding splits the text at every special token written in it (NeMo's loop), and
    decoding puts spaces around special tokens, as Megatron does.
    """

    name = "SentencePieceTokenizer"

    def __init__(self, model_file: str, vocab_extra_ids: int = 0) -> None:
        self.model_file = model_file
        self.sp = load_sentencepiece(model_file, self.name)
        self.vocab = {self.sp.id_to_piece(i): i for i in range(len(self.sp))}
        self.special_tokens: dict[str, int] = {}
        self.cls = self._add_special("<CLS>")
        self.sep = self._add_special("<SEP>")
        self._eod = self._add_special("<EOD>")
        self.mask = self._add_special("<MASK>")
        self.pad = self._add_special(self._piece_or(self.sp.pad_id(), "<PAD>"))
        self.bos = self._add_special(self._piece_or(self.sp.bos_id(), "<BOS>"))
        self.eos = self._add_special(self._piece_or(self.sp.eos_id(), "<EOS>"))
        self.extra_ids = [self._add_special(f"<extra_id_{i}>") for i in range(vocab_extra_ids)]
        self.inv_special_tokens = {i: t for t, i in self.special_tokens.items()}

    def _piece_or(self, piece_id: int, fallback: str) -> str:
        # A disabled piece (id -1) is out of range for id_to_piece; Megatron then adds the fallback name.
        return self.sp.id_to_piece(piece_id) if 0 <= piece_id < len(self.sp) else fallback

    def _add_special(self, token: str) -> int:
        if token not in self.vocab:
            self.vocab[token] = len(self.vocab)
        self.special_tokens[token] = self.vocab[token]
        return self.vocab[token]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def eod(self) -> int:
        return self._eod

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        start = 0
        while True:
            # The special token that occurs first wins; on a tie, the one added first.
            found = [(text.find(t, start), n, t) for n, t in enumerate(self.special_tokens)]
            found = [f for f in found if f[0] >= 0]
            if not found:
                break
            at, _, token = min(found)
            ids.extend(self.sp.encode_as_ids(text[start:at]))
            ids.append(self.special_tokens[token])
            start = at + len(token)
        ids.extend(self.sp.encode_as_ids(text[start:]))
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = self.in_vocab(ids)
        text = ""
        last = 0
        for i, token_id in enumerate(ids):
            if token_id in self.inv_special_tokens:
                text += self.sp.decode_ids(ids[last:i]) + " " + self.inv_special_tokens[token_id] + " "
                last = i + 1
        return text + self.sp.decode_ids(ids[last:])
