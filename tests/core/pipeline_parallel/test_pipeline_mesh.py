"""The (pp, dp, tp) mesh follows Megatron's rank order; checked on torch's fake process group (one process)."""

import pytest
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from megatron_lite.errors import UserError
from megatron_lite.parallel_state import destroy_parallel, initialize_parallel


def _state(rank: int, world: int, tp: int, pp: int):
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        s = initialize_parallel(tp, pipeline_model_parallel_size=pp, device="cpu")
        ranks = lambda g: dist.get_process_group_ranks(g) if g is not None else None  # noqa: E731
        return (
            (s.tp_rank, s.dp_rank, s.pp_rank),
            {
                "tp": ranks(s.tp_group),
                "dp": ranks(s.dp_group),
                "pp": ranks(s.pp_group),
                "embedding": ranks(s.embedding_group),
            },
            (s.is_pipeline_first_stage, s.is_pipeline_last_stage),
        )
    finally:
        destroy_parallel()


def test_tp_ranks_adjacent_then_dp_then_pp():
    # Megatron's order with TP=2, DP=2, PP=2: rank = tp + 2 * dp + 4 * pp.
    for rank in range(8):
        coords, groups, _ = _state(rank, 8, tp=2, pp=2)
        assert coords == (rank % 2, (rank // 2) % 2, rank // 4)
        assert groups["tp"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert groups["dp"] == [rank % 2 + 4 * (rank // 4), rank % 2 + 4 * (rank // 4) + 2]
        assert groups["pp"] == [rank % 4, rank % 4 + 4]
        assert groups["embedding"] == [rank % 4, rank % 4 + 4]


def test_embedding_group_joins_first_and_last_stage_only():
    for rank in range(4):
        coords, groups, ends = _state(rank, 4, tp=1, pp=4)
        assert coords == (0, 0, rank) and groups["pp"] == [0, 1, 2, 3]
        assert groups["embedding"] == ([0, 3] if rank in (0, 3) else None)
        assert ends == (rank == 0, rank == 3)


def test_world_not_divisible_by_tp_times_pp():
    dist.init_process_group("fake", rank=0, world_size=6, store=FakeStore())
    try:
        with pytest.raises(
            UserError, match="world size 6 is not divisible by --tensor-model-parallel-size 2 x"
        ):
            initialize_parallel(2, pipeline_model_parallel_size=2, device="cpu")
    finally:
        destroy_parallel()
