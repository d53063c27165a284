"""Megatron's Llama2Tokenizer: SentencePiece ids with bos before every text, eod = eos."""

from __future__ import annotations

from collections.abc import Sequence

from megatron_lite.errors import fail
from megatron_lite.tokenizer.gpt_sentencepiece_tokenizer import GPTSentencePieceTokenizer


class Llama2Tokenizer(GPTSentencePieceTokenizer):
    """Llama-2's SentencePiece use: every text starts with bos (`<s>`); eod = eos (`</s>`)."""

    name = "Llama2Tokenizer"

    def __init__(self, model_file: str) -> None:
        super().__init__(model_file)
        if self.bos < 0:
            fail(
                f"--tokenizer-model {model_file}: the model has no bos piece, which {self.name} puts before every text"
            )

    def encode(self, text: str) -> list[int]:
        return [self.bos, *self.sp.encode(text)]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [[self.bos, *ids] for ids in super().encode_batch(texts)]
