"""Shared dataset helpers: --split parsing, and the build-once .npy index cache."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Callable, Sequence

import numpy as np

from megatron_lite.errors import fail

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")
DEFAULT_SPLIT = "969, 30, 1"


def parse_and_normalize_split(split: str) -> list[float]:
    """Megatron's --split: numbers found by the regex [.0-9]+, padded to 3 with zeros, normalised to sum 1."""
    try:
        weights = [float(x) for x in re.findall(r"[.0-9]+", split)]
    except ValueError:
        fail(f"--split {split!r}: not a list of numbers such as '949,50,1'")
    if len(weights) > len(SPLIT_NAMES):
        fail(f"--split {split!r}: at most 3 weights (train, valid, test)")
    weights += [0.0] * (len(SPLIT_NAMES) - len(weights))
    total = sum(weights)
    if total <= 0:
        fail(f"--split {split!r}: the weights sum to zero; give e.g. '949,50,1'")
    return [w / total for w in weights]


def split_matrix(weights: Sequence[float]) -> list[tuple[float, float] | None]:
    """Each split's (begin, end) fraction of the documents from cumulative bookends; None for weight 0."""
    bookends = [0.0]
    for w in weights:
        bookends.append(bookends[-1] + w)
    return [None if w == 0 else (bookends[i], bookends[i + 1]) for i, w in enumerate(weights)]


def split_indices(num_elements: int, bounds: tuple[float, float]) -> np.ndarray:
    """Document ids of one split: arange(round(lo*N), round(hi*N)) as int32 (Python's round, like Megatron)."""
    begin = int(round(bounds[0] * float(num_elements)))
    end = int(round(bounds[1] * float(num_elements)))
    return np.arange(begin, end, dtype=np.int32)


def describe(description: dict) -> tuple[str, str]:
    """The description text (what the cache key covers) and its md5, Megatron's cache key."""
    text = json.dumps(description, indent=4)
    return text, hashlib.md5(text.encode("utf-8")).hexdigest()


def file_signature(path: str) -> dict[str, int]:
    """Size and modification time: a rewritten dataset gets a new cache key, never a stale index."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _temp_name(path: str) -> str:
    return f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def atomic_save_npy(path: str, array: np.ndarray) -> None:
    """Write `path` via a temporary file and a rename, so readers see the whole file or none."""
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    tmp = _temp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class IndexCache:
    """`{cache_dir}/{md5}-{kind}-{split}-{name}.npy` arrays plus their `description.txt`.

    `load_or_build` follows the distributed protocol: the builder rank builds (or finds) the files
    and then enters the barrier; the other ranks wait in the barrier first and then map the files.
    A rank that finds no files after the barrier (cache on node-local disk) builds them itself,
    which gives identical arrays because the build is deterministic.
    """

    def __init__(self, cache_dir: str, kind: str, split: str, description: dict) -> None:
        self.cache_dir = cache_dir
        self.description, self.md5 = describe(description)
        self.stem = os.path.join(cache_dir, f"{self.md5}-{kind}-{split}")
        self.built = False  # whether this process built the arrays (False: read from the cache)

    def path(self, name: str) -> str:
        return f"{self.stem}-{name}.npy"

    @property
    def description_path(self) -> str:
        return f"{self.stem}-description.txt"

    def load_or_build(
        self,
        names: Sequence[str],
        build: Callable[[], dict[str, np.ndarray]],
        is_builder: bool = True,
        barrier: Callable[[], None] | None = None,
    ) -> dict[str, np.ndarray]:
        if is_builder:
            try:
                arrays = self._load(names)
                if arrays is None:
                    arrays = self._build_and_save(names, build)
            finally:
                # Release the other ranks even on failure: they then fail the same way instead of hanging.
                if barrier is not None:
                    barrier()
            return arrays
        if barrier is not None:
            barrier()
        arrays = self._load(names)
        if arrays is None:
            logger.warning("index cache %s not found after the builder rank; building it here", self.stem)
            arrays = self._build_and_save(names, build)
        return arrays

    def _load(self, names: Sequence[str]) -> dict[str, np.ndarray] | None:
        try:
            return {name: np.load(self.path(name), mmap_mode="r", allow_pickle=False) for name in names}
        except (OSError, ValueError):
            return None

    def _build_and_save(
        self, names: Sequence[str], build: Callable[[], dict[str, np.ndarray]]
    ) -> dict[str, np.ndarray]:
        arrays = build()
        self.built = True
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            for name in names:
                atomic_save_npy(self.path(name), arrays[name])
            atomic_write_text(self.description_path, self.description)
        except OSError as err:
            logger.warning(
                "cannot write the index cache in %s (%s); using the indices from memory", self.cache_dir, err
            )
            return arrays
        return self._load(names) or arrays
