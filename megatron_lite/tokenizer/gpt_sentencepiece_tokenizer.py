"""Megatron's GPTSentencePieceTokenizer: a SentencePiece model's own ids, eod = its eos piece."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from megatron_lite.errors import fail
from megatron_lite.tokenizer.base import TextTokenizer
from megatron_lite.tokenizer.sentencepiece_tokenizer import load_sentencepiece


class GPTSentencePieceTokenizer(TextTokenizer):
    """The model's pieces as they are: ids = sp.encode_as_ids(text), eod = the model's eos (`</s>`)."""

    name = "GPTSentencePieceTokenizer"

    def __init__(self, model_file: str) -> None:
        self.model_file = model_file
        self.sp = load_sentencepiece(model_file, self.name)
        self.bos = self.sp.bos_id()
        self.eos = self.sp.eos_id()
        self.pad = self.sp.pad_id()
        if self.eos < 0:
            fail(
                f"--tokenizer-model {model_file}: the model has no eos piece, which {self.name} uses as the "
                "end-of-document token; train it with an eos_id"
            )

    @property
    def vocab_size(self) -> int:
        return len(self.sp)

    @property
    def eod(self) -> int:
        return self.eos

    def encode(self, text: str) -> list[int]:
        return self.sp.encode_as_ids(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # One call for the whole batch; one thread, since preprocessing already runs a process per core.
        return self.sp.encode(list(texts), num_threads=1) if len(texts) else []

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self.sp.decode_ids(self.in_vocab(ids))
