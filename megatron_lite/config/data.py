"""Dataset settings: paths, splits, caches, masks, loader workers, and their check."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_lite.config.fields import _f, fail


@dataclass
class DataArgs:
    """Dataset settings: paths, splits, caches, masks, loader workers."""

    data_path: list[str] | None = _f(
        None, "Dataset prefixes, optionally weighted: 0.3 A 0.7 B.", nargs="*", group="data"
    )
    split: str | None = _f(None, "Train/valid/test split of the documents (default 969,30,1).", group="data")
    train_data_path: list[str] | None = _f(
        None, "Training dataset prefixes (instead of --split).", nargs="*", group="data"
    )
    valid_data_path: list[str] | None = _f(None, "Validation dataset prefixes.", nargs="*", group="data")
    test_data_path: list[str] | None = _f(None, "Test dataset prefixes.", nargs="*", group="data")
    data_cache_path: str | None = _f(
        None, "Where dataset index caches go (default: next to the data).", group="data"
    )
    num_workers: int = _f(2, "Data loader worker processes.", group="data")
    mock_data: bool = _f(False, "Train on synthetic random tokens instead of --data-path.", group="data")
    reset_position_ids: bool = _f(
        False, "Restart position ids after each end-of-document token.", group="data"
    )
    reset_attention_mask: bool = _f(False, "Do not attend across end-of-document tokens.", group="data")
    eod_mask_loss: bool = _f(False, "Exclude end-of-document tokens from the loss.", group="data")
    mmap_bin_files: bool = _f(
        True, "Memory-map the .bin files (--no-mmap-bin-files: read them with seek+read).", group="data"
    )
    create_attention_mask_in_dataloader: bool = _f(
        True, "Samples carry the [1, s, s] attention mask (True = masked), as in Megatron.", group="data"
    )


def check_data(cfg: Any) -> None:
    """The dataset options that cannot go together; one line naming the flags."""
    if getattr(cfg, "reset_attention_mask", False) and not getattr(
        cfg, "create_attention_mask_in_dataloader", True
    ):
        fail(
            "--reset-attention-mask needs the attention mask that --no-create-attention-mask-in-dataloader "
            "turns off; drop one of them"
        )
