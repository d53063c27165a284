"""GPTDataset: fixed-length samples cut from shuffled, concatenated documents (Megatron semantics)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from megatron_lite.core.datasets.indexed_dataset import IndexedDataset
from megatron_lite.core.datasets.utils import IndexCache, file_signature
from megatron_lite.errors import fail

logger = logging.getLogger(__name__)

# Each sample holds one token more than the sequence so that labels are the tokens shifted by one.
ADD_EXTRA_TOKEN = 1
# The last epoch gets its own shuffle when it contributes less than this share of an epoch, so that
# its few samples do not crowd out whole epochs' worth of documents at random.
SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80
INDEX_NAMES = ("document_index", "sample_index", "shuffle_index")


@dataclass
class GPTDatasetConfig:
    """Everything besides the documents that defines a GPTDataset's samples."""

    random_seed: int
    sequence_length: int
    tokenizer_name: str
    eod: int
    split: str | None = None
    split_matrix: list | None = None
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    data_cache_path: str | None = None
    # Megatron's create_attention_mask (--no-create-attention-mask-in-dataloader turns it off): samples
    # carry the [1, s, s] mask. The model needs it only with reset_attention_mask; it is causal otherwise.
    create_attention_mask: bool = True


def default_cache_dir(dataset_path: str, kind: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(dataset_path)), "cache", f"{kind}_indices")


class GPTDataset(torch.utils.data.Dataset):
    """Samples of `sequence_length + 1` tokens over the documents `indices` of an IndexedDataset.

    `num_samples` decides how many epochs of those documents are laid out (None: one epoch). The
    three indices are cached as .npy files; in a distributed run pass `is_builder` (True on one rank)
    and a `barrier` so that one rank builds them and the others map the result.
    """

    def __init__(
        self,
        indexed_dataset: IndexedDataset,
        dataset_path: str,
        indices: np.ndarray,
        num_samples: int | None,
        index_split: str,
        config: GPTDatasetConfig,
        *,
        is_builder: bool = True,
        barrier: Callable[[], None] | None = None,
    ) -> None:
        self.dataset = indexed_dataset
        self.dataset_path = dataset_path
        self.indices = np.asarray(indices, dtype=np.int32)
        self.num_samples = num_samples
        self.index_split = index_split
        self.config = config
        if config.sequence_length < 1:
            fail(f"--seq-length {config.sequence_length}: must be at least 1")
        if len(self.indices) == 0:
            fail(f"{dataset_path}: the {index_split} split has no documents")
        description = {
            "class": type(self).__name__,
            "dataset_path": os.path.abspath(dataset_path),
            "num_samples": num_samples,
            "index_split": index_split,
            "random_seed": config.random_seed,
            "sequence_length": config.sequence_length,
            "split": config.split,
            "split_matrix": config.split_matrix,
            "tokenizer": config.tokenizer_name,
            "add_extra_token_to_sequence": ADD_EXTRA_TOKEN,
            "files": {
                "idx": file_signature(indexed_dataset.idx_path),
                "bin": file_signature(indexed_dataset.bin_path),
            },
        }
        cache_dir = config.data_cache_path or default_cache_dir(dataset_path, "GPTDataset")
        self.cache = IndexCache(cache_dir, "GPTDataset", index_split, description)
        self.unique_description = self.cache.description
        self.unique_description_hash = self.cache.md5
        arrays = self.cache.load_or_build(INDEX_NAMES, self._build_indices, is_builder, barrier)
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]
        self._plain_masks: tuple[torch.Tensor | None, torch.Tensor, torch.Tensor] | None = None

    # -- indices ------------------------------------------------------------------------------------

    def _build_indices(self) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        arrays = build_gpt_indices(
            self.dataset.sequence_lengths,
            self.indices,
            self.num_samples,
            self.config.sequence_length,
            self.config.random_seed,
        )
        if len(arrays["shuffle_index"]) == 0:
            tokens = int(self.dataset.sequence_lengths[self.indices].sum(dtype=np.int64))
            fail(
                f"{self.dataset_path}: the {self.index_split} split has {tokens} tokens, fewer than one sample of "
                f"--seq-length {self.config.sequence_length} + 1; use more data or a shorter --seq-length"
            )
        logger.info(
            "built GPTDataset %s indices for %s in %.2f s: %d samples",
            self.index_split,
            self.dataset_path,
            time.perf_counter() - start,
            len(arrays["shuffle_index"]),
        )
        return arrays

    @property
    def num_epochs(self) -> int:
        tokens_per_epoch = int(self.dataset.sequence_lengths[self.indices].sum(dtype=np.int64))
        return num_epochs_for(tokens_per_epoch, self.num_samples, self.config.sequence_length)

    # -- samples ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def get_text(self, idx: int) -> np.ndarray:
        """The `sequence_length + 1` tokens of sample `idx` (after shuffling), as int64."""
        j = int(self.shuffle_index[idx])
        doc_first, offset_first = (int(x) for x in self.sample_index[j])
        doc_last, offset_last = (int(x) for x in self.sample_index[j + 1])
        if doc_first == doc_last:
            text = self.dataset.get(
                int(self.document_index[doc_first]), offset_first, offset_last - offset_first + 1
            )
            return text.astype(np.int64)
        parts = [self.dataset.get(int(self.document_index[doc_first]), offset_first)]
        parts += [self.dataset.get(int(self.document_index[d])) for d in range(doc_first + 1, doc_last)]
        parts.append(self.dataset.get(int(self.document_index[doc_last]), 0, offset_last + 1))
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        text = torch.from_numpy(self.get_text(idx))
        tokens, labels = text[:-1].contiguous(), text[1:].contiguous()
        cfg = self.config
        if not (cfg.reset_position_ids or cfg.reset_attention_mask or cfg.eod_mask_loss):
            # Without the three options the masks never change: build them once.
            if self._plain_masks is None:
                self._plain_masks = get_ltor_masks_and_position_ids(
                    tokens, cfg.eod, False, False, False, create_attention_mask=cfg.create_attention_mask
                )
            # The causal mask is shared by every sample, as Megatron caches it: collation copies it into
            # the batch, and copying s*s bytes per sample would cost more than reading the tokens.
            attention_mask, loss_mask, position_ids = self._plain_masks
            sample = {
                "tokens": tokens,
                "labels": labels,
                "loss_mask": loss_mask.clone(),
                "position_ids": position_ids.clone(),
            }
        else:
            attention_mask, loss_mask, position_ids = get_ltor_masks_and_position_ids(
                tokens,
                cfg.eod,
                cfg.reset_position_ids,
                cfg.reset_attention_mask,
                cfg.eod_mask_loss,
                create_attention_mask=cfg.create_attention_mask,
            )
            sample = {
                "tokens": tokens,
                "labels": labels,
                "loss_mask": loss_mask,
                "position_ids": position_ids,
            }
        if attention_mask is not None:
            sample["attention_mask"] = attention_mask
        return sample


def get_ltor_masks_and_position_ids(
    tokens: torch.Tensor,
    eod: int,
    reset_position_ids: bool,
    reset_attention_mask: bool,
    eod_mask_loss: bool,
    *,
    create_attention_mask: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Left-to-right masks for one sample (Megatron's _get_ltor_masks_and_position_ids, vectorised).

    Returns (attention_mask [1,s,s] bool with True = masked, made when create_attention_mask or
    reset_attention_mask, else None; loss_mask [s] float32; position_ids [s] int64). Positions and
    (with reset_attention_mask) attention restart after each eod.
    """
    s = tokens.numel()
    positions = torch.arange(s, dtype=torch.int64)
    is_eod = tokens == eod
    loss_mask = torch.ones(s, dtype=torch.float32)
    if eod_mask_loss:
        loss_mask[is_eod] = 0.0
    # A document starts right after each eod; `starts` marks those positions.
    after_eod = torch.zeros(s, dtype=torch.bool)
    after_eod[1:] = is_eod[:-1]
    position_ids = positions
    if reset_position_ids:
        last_start = torch.cummax(
            torch.where(after_eod, positions, torch.zeros_like(positions)), dim=0
        ).values
        position_ids = positions - last_start
    attention_mask = None
    if create_attention_mask or reset_attention_mask:
        attention_mask = positions[None, :] > positions[:, None]  # the future is masked
        if reset_attention_mask:
            segment = torch.cumsum(after_eod.to(torch.int64), dim=0)
            attention_mask |= segment[None, :] != segment[:, None]
        attention_mask = attention_mask.unsqueeze(0)
    return attention_mask, loss_mask, position_ids


# -- index construction (pure numpy, no Python loop over documents or samples) ----------------------


def num_epochs_for(tokens_per_epoch: int, num_samples: int | None, sequence_length: int) -> int:
    """Fewest epochs whose tokens cover `num_samples` samples (each needs sequence_length more + 1)."""
    if num_samples is None:
        return 1
    needed = num_samples * sequence_length + ADD_EXTRA_TOKEN
    return max(1, -(-needed // tokens_per_epoch))


def build_gpt_indices(
    sequence_lengths: np.ndarray,
    indices: np.ndarray,
    num_samples: int | None,
    sequence_length: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """document_index, sample_index and shuffle_index as Megatron builds them, from RandomState(seed)."""
    indices = np.asarray(indices, dtype=np.int32)
    tokens_per_epoch = int(sequence_lengths[indices].sum(dtype=np.int64))
    if tokens_per_epoch == 0:
        return {
            "document_index": np.zeros(0, np.int32),
            "sample_index": np.zeros((1, 2), np.int32),
            "shuffle_index": np.zeros(0, np.uint32),
        }
    num_epochs = num_epochs_for(tokens_per_epoch, num_samples, sequence_length)
    separate_final_epoch = False
    samples_before_final = 0
    if num_epochs > 1:
        assert num_samples is not None
        samples_before_final = ((num_epochs - 1) * tokens_per_epoch - ADD_EXTRA_TOKEN) // sequence_length
        samples_in_final = num_samples - samples_before_final
        samples_per_epoch = (tokens_per_epoch - ADD_EXTRA_TOKEN) // sequence_length
        separate_final_epoch = samples_in_final < int(SEPARATE_FINAL_EPOCH_THRESHOLD * samples_per_epoch)

    rng = np.random.RandomState(seed)
    if separate_final_epoch:
        document_index = np.concatenate(
            (_shuffled_epochs(indices, num_epochs - 1, rng), _shuffled_epochs(indices, 1, rng))
        )
    else:
        document_index = _shuffled_epochs(indices, num_epochs, rng)

    sample_index = build_sample_index(
        sequence_lengths, document_index, sequence_length, num_epochs * tokens_per_epoch
    )
    total = len(sample_index) - 1
    shuffle_index = _shuffle_index(samples_before_final if separate_final_epoch else total, total, rng)
    return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}


def _shuffled_epochs(indices: np.ndarray, num_epochs: int, rng: np.random.RandomState) -> np.ndarray:
    document_index = np.tile(indices, num_epochs).astype(np.int32)
    rng.shuffle(document_index)
    return document_index


def build_sample_index(
    sequence_lengths: np.ndarray, document_index: np.ndarray, sequence_length: int, total_tokens: int
) -> np.ndarray:
    """Row k = (position in document_index, token offset) where sample k starts; [n+1, 2].

    Sample k covers tokens [k*seq, (k+1)*seq] of the concatenated documents (one token of overlap
    with the next sample). A start is located with searchsorted over cumulative document lengths;
    empty documents are skipped because the rightmost document starting at or before the position
    wins, as in Megatron's loop.
    """
    num_samples = (total_tokens - ADD_EXTRA_TOKEN) // sequence_length
    doc_ends = np.cumsum(sequence_lengths[document_index], dtype=np.int64)
    doc_starts = np.concatenate(([0], doc_ends[:-1]))
    positions = np.arange(num_samples + 1, dtype=np.int64) * sequence_length
    rows = np.searchsorted(doc_starts, positions, side="right") - 1
    dtype = np.int32 if len(document_index) <= np.iinfo(np.int32).max else np.int64
    sample_index = np.empty((num_samples + 1, 2), dtype=dtype)
    sample_index[:, 0] = rows
    sample_index[:, 1] = positions - doc_starts[rows]
    return sample_index


def _shuffle_index(first: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    """arange(total) with [0, first) and [first, total) shuffled separately."""
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    head = np.arange(first, dtype=dtype)
    rng.shuffle(head)
    if first == total:
        return head
    tail = np.arange(first, total, dtype=dtype)
    rng.shuffle(tail)
    return np.concatenate((head, tail))
