"""Where a run stands (iteration, data position), as restored from a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainProgress:
    """The training position a checkpoint resumes at; all zeros (and no extra state) under --finetune."""

    iteration: int = 0
    consumed_train_samples: int = 0
    skipped_iterations: int = 0
    # Whatever the trainer handed save_checkpoint(extra_state=...), e.g. the loss scaler's state.
    extra_state: dict[str, Any] = field(default_factory=dict)
