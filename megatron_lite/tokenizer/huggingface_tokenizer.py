"""Megatron's HuggingFaceTokenizer: transformers' AutoTokenizer from a local directory or the local cache."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from megatron_lite.errors import fail
from megatron_lite.tokenizer.base import TextTokenizer, missing_package

# A hub name is "name" or "org/name"; anything else that does not exist is a mistyped path.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class HuggingFaceTokenizer(TextTokenizer):
    """ids = tokenizer(text).input_ids (special tokens the tokenizer adds included), eod = its eos token.

    vocab_size is len(tokenizer), added tokens included, as in Megatron. Nothing is downloaded: the
    tokenizer is read with local_files_only from a directory or from the local HuggingFace cache.
    """

    name = "HuggingFaceTokenizer"

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        trust_remote_code: bool = False,
        vocab_file: str | None = None,
        merge_file: str | None = None,
    ) -> None:
        try:
            import transformers
        except ImportError:
            missing_package("transformers", "hf", self.name)
        path = os.path.expanduser(pretrained_model_name_or_path)
        self.path = path
        if os.path.isfile(path):
            fail(
                f"--tokenizer-model {path}: a file; give the directory that holds the HuggingFace tokenizer files"
            )
        if not os.path.isdir(path) and not _HUB_NAME.fullmatch(pretrained_model_name_or_path):
            fail(f"--tokenizer-model {path}: directory not found; give a HuggingFace tokenizer directory")
        kwargs: dict[str, Any] = {}
        if vocab_file is not None:
            kwargs["vocab_file"] = vocab_file
        if merge_file is not None:
            kwargs["merges_file"] = merge_file
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                path, local_files_only=True, trust_remote_code=trust_remote_code, **kwargs
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            if os.path.isdir(path):
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                fail(f"--tokenizer-model {path}: transformers cannot load a tokenizer from it ({reason})")
            fail(
                f"--tokenizer-model {path}: not a local directory and not in the local HuggingFace cache; "
                "megatron-lite never downloads, so fetch it first (huggingface-cli download) or give a directory"
            )
        self.bos = self.tokenizer.bos_token_id
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id
        if self.eos is None:
            fail(
                f"--tokenizer-model {path}: the tokenizer has no eos token, which {self.name} uses as the "
                "end-of-document token; set eos_token in its tokenizer_config.json"
            )
        self._vocab_size = len(self.tokenizer)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self.eos

    def encode(self, text: str) -> list[int]:
        # verbose=False: no "longer than model_max_length" warning for long documents (ids are unchanged).
        return self.tokenizer(text, verbose=False).input_ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), verbose=False).input_ids if len(texts) else []

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self.tokenizer.decode(self.in_vocab(ids))
