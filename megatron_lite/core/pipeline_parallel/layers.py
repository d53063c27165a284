"""Which global transformer layers each pipeline stage (and virtual stage) builds: Megatron's split rules."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PipelineSplit:
    """The numbers Megatron's get_num_layers_to_build reads from the config (plain ints: no config import)."""

    num_layers: int
    pipeline_size: int = 1
    virtual_size: int | None = None  # model chunks per pipeline rank; None: not interleaved
    first_stage_layers: int | None = None  # --decoder-first-pipeline-num-layers
    last_stage_layers: int | None = None  # --decoder-last-pipeline-num-layers
    account_for_embedding: bool = False
    account_for_loss: bool = False

    @classmethod
    def from_config(cls, cfg: object) -> PipelineSplit:
        return cls(
            num_layers=cfg.num_layers,
            pipeline_size=cfg.pipeline_model_parallel_size,
            virtual_size=cfg.virtual_pipeline_model_parallel_size,
            first_stage_layers=cfg.decoder_first_pipeline_num_layers,
            last_stage_layers=cfg.decoder_last_pipeline_num_layers,
            account_for_embedding=cfg.account_for_embedding_in_pipeline_split,
            account_for_loss=cfg.account_for_loss_in_pipeline_split,
        )

    @property
    def uneven(self) -> bool:
        return self.first_stage_layers is not None or self.last_stage_layers is not None

    @property
    def chunks_per_rank(self) -> int:
        return self.virtual_size if self.virtual_size is not None and self.pipeline_size > 1 else 1

    def layers_per_rank(self, pp_rank: int) -> int:
        """Transformer-layer slots of pipeline rank pp_rank over all its chunks, before the embedding/loss
        slots are taken off (Megatron's num_layers_per_pipeline_rank)."""
        p = self.pipeline_size
        if self.uneven:
            first, last = self.first_stage_layers, self.last_stage_layers
            if pp_rank == 0 and first is not None:
                return first
            if pp_rank == p - 1 and last is not None:
                return last
            middle_stages = p - (first is not None) - (last is not None)
            middle_layers = self.num_layers - (first or 0) - (last or 0)
            return middle_layers // middle_stages if middle_stages > 0 else 0
        slots = self.num_layers + self.account_for_embedding + self.account_for_loss
        return slots // p

    def num_layers_to_build(self, pp_rank: int, vp_stage: int = 0) -> int:
        """Megatron's get_num_layers_to_build for (pp_rank, vp_stage)."""
        v = self.chunks_per_rank
        count = self.layers_per_rank(pp_rank) // v
        if self.account_for_embedding and pp_rank == 0 and vp_stage == 0:
            count -= 1
        if self.account_for_loss and pp_rank == self.pipeline_size - 1 and vp_stage == v - 1:
            count -= 1
        return count

    def model_chunk_order(self) -> list[tuple[int, int]]:
        """(vp_stage, pp_rank) of every model chunk in the order its layers come: virtual stage v of rank
        p is global pipeline stage v * P + p (chunk 0 of every rank, then chunk 1, ...)."""
        return [(v, p) for v in range(self.chunks_per_rank) for p in range(self.pipeline_size)]

    def layer_range(self, pp_rank: int, vp_stage: int = 0) -> range:
        """The global layer numbers of chunk (pp_rank, vp_stage): Megatron's offset is the layers of every
        chunk before it in model_chunk_order."""
        offset = 0
        for v, p in self.model_chunk_order():
            if (v, p) == (vp_stage, pp_rank):
                return range(offset, offset + self.num_layers_to_build(p, v))
            offset += self.num_layers_to_build(p, v)
        raise ValueError(f"no model chunk ({pp_rank}, {vp_stage}) in a {self.pipeline_size}-stage pipeline")

    def problem(self) -> str | None:
        """Why this split cannot be built (one line naming the flag), or None."""
        p, n, v = self.pipeline_size, self.num_layers, self.chunks_per_rank
        if self.uneven:
            if self.account_for_embedding or self.account_for_loss:
                return (
                    "--decoder-first/last-pipeline-num-layers cannot be combined with "
                    "--account-for-embedding-in-pipeline-split or --account-for-loss-in-pipeline-split"
                )
            fixed = (self.first_stage_layers or 0) + (self.last_stage_layers or 0)
            middle_stages = p - (self.first_stage_layers is not None) - (self.last_stage_layers is not None)
            if fixed > n or (middle_stages == 0 and fixed != n):
                return (
                    f"--decoder-first/last-pipeline-num-layers ({self.first_stage_layers}, "
                    f"{self.last_stage_layers}) do not add up to --num-layers {n} over "
                    f"--pipeline-model-parallel-size {p} stages"
                )
            if middle_stages > 0 and (n - fixed) % middle_stages != 0:
                return (
                    f"the {n - fixed} layers left by --decoder-first/last-pipeline-num-layers are not "
                    f"divisible by the {middle_stages} middle pipeline stages"
                )
        else:
            slots = n + self.account_for_embedding + self.account_for_loss
            if slots % p != 0:
                counted = "" if slots == n else f" (+ the embedding/loss counted as layers: {slots})"
                return (
                    f"--num-layers {n}{counted} is not divisible by --pipeline-model-parallel-size {p}; "
                    "give --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers for an "
                    "uneven split"
                )
        for rank in range(p):
            if self.layers_per_rank(rank) % v != 0:
                return (
                    f"pipeline stage {rank} has {self.layers_per_rank(rank)} layers, not divisible by its "
                    f"{v} virtual stages (--num-virtual-stages-per-pipeline-rank)"
                )
            for stage in range(v):
                if self.num_layers_to_build(rank, stage) < 0:
                    return (
                        f"pipeline stage {rank}, virtual stage {stage} has no layer left for the "
                        "embedding/loss that --account-for-*-in-pipeline-split puts there"
                    )
        return None
