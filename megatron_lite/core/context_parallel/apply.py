"""The one place context parallelism enters a model: its attention cores attend across the CP group."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn


def apply_context_parallel(model: nn.Module, cp_group: dist.ProcessGroup | None, comm_type: str) -> int:
    """Point every core attention of `model` (modules with a `context_parallel` slot) at the CP group;
    returns how many. The rest of the model is per token and needs nothing: positions come with the batch."""
    if cp_group is None or dist.get_world_size(cp_group) == 1:
        return 0
    count = 0
    for module in model.modules():
        if hasattr(module, "context_parallel"):
            module.context_parallel = (cp_group, comm_type)
            count += 1
    return count
