"""Megatron's pretraining sampler (resumable from consumed samples), the data loader, and mock data."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from megatron_lite.config import MegatronConfig
from megatron_lite.core.datasets.gpt_dataset import get_ltor_masks_and_position_ids
from megatron_lite.errors import fail
from megatron_lite.parallel_state import ParallelState


class MegatronPretrainingSampler:
    """Yields this DP rank's micro batches of sample indices, in order, from `consumed_samples` on.

    The index range is cut into chunks of micro_batch_size x dp_size; DP rank r takes
    [r*mbs, (r+1)*mbs) of each chunk, so a global batch is num_microbatches consecutive chunks and
    resuming at any consumed-sample count continues exactly where the run stopped. TP ranks share a DP
    rank and therefore read the same samples.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
    ) -> None:
        if total_samples <= 0:
            fail(f"the dataset is empty (total samples {total_samples}); check --data-path and --split")
        if not 0 <= consumed_samples <= total_samples:
            fail(
                f"resuming at {consumed_samples} consumed samples, but the dataset has only {total_samples}; "
                "was the checkpoint trained on other data or a larger --train-iters?"
            )
        if micro_batch_size <= 0 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"bad sampler layout: mbs {micro_batch_size}, dp rank {data_parallel_rank} of {data_parallel_size}"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.chunk = micro_batch_size * data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        remaining = self.total_samples - self.consumed_samples
        return remaining // self.chunk if self.drop_last else -(-remaining // self.chunk)

    def __iter__(self) -> Iterator[list[int]]:
        start = self.data_parallel_rank * self.micro_batch_size
        for chunk_start in range(self.consumed_samples, self.total_samples, self.chunk):
            chunk_end = min(chunk_start + self.chunk, self.total_samples)
            if chunk_end - chunk_start < self.chunk:
                if self.drop_last:
                    return
                # A short last chunk is shared out the same way; a rank whose slice is empty gets nothing.
                indices = list(range(chunk_start, chunk_end))[start : start + self.micro_batch_size]
                if indices:
                    yield indices
                return
            yield list(range(chunk_start + start, chunk_start + start + self.micro_batch_size))


def build_pretraining_data_loader(
    dataset: Dataset | None,
    consumed_samples: int,
    cfg: MegatronConfig,
    pstate: ParallelState | None = None,
) -> DataLoader | None:
    """A DataLoader over this DP rank's slices starting at `consumed_samples` (None without a dataset)."""
    if dataset is None:
        return None
    pstate = pstate or ParallelState()
    sampler = MegatronPretrainingSampler(
        total_samples=len(dataset),
        consumed_samples=consumed_samples,
        micro_batch_size=cfg.micro_batch_size,
        data_parallel_rank=pstate.dp_rank,
        data_parallel_size=pstate.dp_size,
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=pstate.device.type == "cuda",
        persistent_workers=cfg.num_workers > 0,
        # A private generator: creating an iterator must not draw from the global RNG, or a resumed run's
        # dropout would differ from the uninterrupted run's.
        generator=torch.Generator().manual_seed(cfg.seed),
    )


class MockGPTDataset(Dataset):
    """Deterministic random tokens for --mock-data: sample i depends only on (seed, split, i).

    Each sample draws seq_length + 1 tokens uniformly from [0, vocab_size); tokens are the first
    seq_length, labels the last seq_length. With an `eod` id, --eod-mask-loss, --reset-position-ids and
    --reset-attention-mask apply to the (rare) eod tokens exactly as for real data.
    """

    SPLITS = ("train", "valid", "test")

    def __init__(
        self,
        num_samples: int,
        seq_length: int,
        vocab_size: int,
        seed: int,
        split: str = "train",
        *,
        eod: int | None = None,
        reset_position_ids: bool = False,
        reset_attention_mask: bool = False,
        eod_mask_loss: bool = False,
    ) -> None:
        self.num_samples = num_samples
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.seed = seed
        self.split_id = self.SPLITS.index(split)
        self.eod = eod
        self.mask_flags = (reset_position_ids, reset_attention_mask, eod_mask_loss)
        self._loss_mask = torch.ones(seq_length, dtype=torch.float32)
        self._position_ids = torch.arange(seq_length, dtype=torch.int64)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range [0, {self.num_samples})")
        rng = np.random.default_rng([self.seed, self.split_id, int(index)])
        text = torch.from_numpy(rng.integers(0, self.vocab_size, self.seq_length + 1, dtype=np.int64))
        tokens, labels = text[:-1].clone(), text[1:].clone()
        if self.eod is None or not any(self.mask_flags):
            return {
                "tokens": tokens,
                "labels": labels,
                "loss_mask": self._loss_mask.clone(),
                "position_ids": self._position_ids.clone(),
            }
        attention_mask, loss_mask, position_ids = get_ltor_masks_and_position_ids(
            tokens, self.eod, *self.mask_flags
        )
        sample = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
        if attention_mask is not None:
            sample["attention_mask"] = attention_mask
        return sample


def build_mock_datasets(
    cfg: MegatronConfig, num_samples: tuple[int, int, int], eod: int | None = None
) -> tuple[MockGPTDataset | None, MockGPTDataset | None, MockGPTDataset | None]:
    """Train, valid and test mock datasets of the requested sizes (None where a size is 0).

    `eod` defaults to the last id of the vocabulary when no tokenizer gives one.
    """
    eod = cfg.vocab_size - 1 if eod is None else eod
    datasets = [
        MockGPTDataset(
            n,
            cfg.seq_length,
            cfg.vocab_size,
            cfg.seed,
            split,
            eod=eod,
            reset_position_ids=cfg.reset_position_ids,
            reset_attention_mask=cfg.reset_attention_mask,
            eod_mask_loss=cfg.eod_mask_loss,
        )
        if n > 0
        else None
        for n, split in zip(num_samples, MockGPTDataset.SPLITS)
    ]
    return datasets[0], datasets[1], datasets[2]
