"""This rank's model chunks (GPTModels with a layer range and pre/post_process) and their stage adapters."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from megatron_lite.core.pipeline_parallel.layers import PipelineSplit
from megatron_lite.parallel_state import ParallelState

# model_provider(cfg, pstate, pre_process=..., post_process=..., layers=...) -> a GPTModel stage
StageProvider = Callable[..., nn.Module]


def build_model_chunks(cfg: object, pstate: ParallelState, provider: StageProvider) -> list[nn.Module]:
    """The model chunks of this pipeline rank, in virtual-stage order: chunk v holds global pipeline stage
    v * P + pp_rank; the embedding is on global stage 0, the final norm and output layer on the last."""
    split = PipelineSplit.from_config(cfg)
    chunks = []
    for v in range(split.chunks_per_rank):
        stage = v * split.pipeline_size + pstate.pp_rank
        chunk = provider(
            cfg,
            pstate,
            pre_process=stage == 0,
            post_process=stage == split.chunks_per_rank * split.pipeline_size - 1,
            layers=split.layer_range(pstate.pp_rank, v),
        )
        # Megatron's mark for --decoupled-lr (parameter names carry a chunk prefix with several chunks).
        if chunk.pre_process:
            chunk.embedding.word_embeddings.weight.is_embedding_or_output_parameter = True
        if chunk.post_process:
            chunk.output_layer.weight.is_embedding_or_output_parameter = True
        chunks.append(chunk)
    return chunks


class StageModule(nn.Module):
    """What torch.distributed.pipelining runs for one chunk: the GPTModel's forward with the previous
    stage's output as its one positional input (the tokens on the first stage), the rest as keywords."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        stage_input: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.model.pre_process:
            return self.model(
                stage_input, position_ids=position_ids, attention_mask=attention_mask, labels=labels
            )
        return self.model(
            None,
            position_ids=position_ids,
            attention_mask=attention_mask,
            labels=labels,
            decoder_input=stage_input,
        )
