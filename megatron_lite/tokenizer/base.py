"""The base of the file-backed tokenizers: batch encoding from `encode`, and helpers they share."""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import NoReturn

import numpy as np

from megatron_lite.errors import fail


class TextTokenizer:
    """A tokenizer as the data pipeline, training and generation use it (Megatron's tokenize/detokenize).

    Subclasses set `name`, `vocab_size` and `eod` and implement `encode`/`decode`; `bos`, `eos` and
    `pad` are Megatron's values for the class (None where the class has none).
    """

    name = "TextTokenizer"
    bos: int | None = None
    eos: int | None = None
    pad: int | None = None

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def eod(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids concatenated (int64) and the length of each; the same ids as `encode`."""
        encoded = self.encode_batch(texts)
        lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
        flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64, count=int(lengths.sum()))
        return flat, lengths

    def in_vocab(self, ids: Sequence[int] | np.ndarray) -> list[int]:
        """The ids that name a token: generation can sample ids of the model's padded rows, which have no text."""
        n = self.vocab_size
        return [int(i) for i in ids if 0 <= int(i) < n]


def require_file(path: str, flag: str, what: str) -> str:
    """`path` if it is a file this process can read; else one line naming the flag."""
    if os.path.isdir(path):
        fail(f"{flag} {path}: a directory, not {what}")
    if not os.path.isfile(path):
        fail(f"{flag} {path}: file not found; give {what}")
    try:
        # Opening is the only reliable test (os.access says yes to root, and ACLs or network file systems
        # may differ); the libraries would otherwise fail later with a traceback or a misleading message.
        with open(path, "rb"):
            pass
    except OSError as err:
        fail(f"{flag} {path}: cannot be read ({err.strerror or err}); give {what} this user can read")
    return path


def missing_package(package: str, extra: str, tokenizer: str) -> NoReturn:
    """One line saying which optional dependency a tokenizer class needs and how to install it."""
    fail(
        f"--tokenizer-type {tokenizer} needs the '{package}' package, which is not installed: "
        f"pip install 'megatron-lite[{extra}]' (or pip install {package})"
    )
