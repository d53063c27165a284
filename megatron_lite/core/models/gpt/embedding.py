"""Input embedding: vocab-parallel word embeddings plus learned absolute positions, then dropout."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.config import MegatronConfig
from megatron_lite.core.tensor_parallel import (
    Dropout,
    VocabParallelEmbedding,
    init_method_normal,
    scatter_to_sequence_parallel_region,
    set_tensor_model_parallel_attributes,
)


class LanguageModelEmbedding(nn.Module):
    """tokens [b, s] -> [s, b, h] ([s/tp, b, h] under sequence parallelism).

    Word embeddings are vocab-parallel (rows past cfg.vocab_size are padding, zero at init).
    Position embeddings exist only for --position-embedding-type learned_absolute and are replicated.
    Under sequence parallelism the shards differ across TP ranks, so their dropout uses the TP stream.
    """

    def __init__(self, cfg: MegatronConfig, tp_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.tp_group = tp_group
        self.sequence_parallel = cfg.sequence_parallel
        init_method = init_method_normal(cfg.init_method_std)
        self.word_embeddings = VocabParallelEmbedding(
            cfg.padded_vocab_size,
            cfg.hidden_size,
            init_method=init_method,
            tp_group=tp_group,
            reduce_scatter_embeddings=cfg.sequence_parallel,
            unpadded_num_embeddings=cfg.vocab_size,
        )
        if cfg.position_embedding_type == "learned_absolute":
            weight = torch.empty(cfg.max_position_embeddings, cfg.hidden_size)
            init_method(weight)
            self.position_embeddings = nn.Embedding(
                cfg.max_position_embeddings, cfg.hidden_size, _weight=weight
            )
            set_tensor_model_parallel_attributes(self.position_embeddings.weight, False)
        else:
            self.position_embeddings = None
        self.embedding_dropout = Dropout(cfg.hidden_dropout, use_model_parallel_rng=cfg.sequence_parallel)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # Looking up the transposed ids yields [s, b, h] already contiguous. A transposed [b, s, h] view
        # would leave the whole residual stream non-contiguous, and every norm would copy its input.
        if self.sequence_parallel:
            words = self.word_embeddings(input_ids)  # [s/tp, b, h]
        else:
            words = self.word_embeddings(input_ids.t())  # [s, b, h]
        if self.position_embeddings is None:
            embeddings = words
        else:
            positions = self.position_embeddings(position_ids.t())  # [s, b, h]
            if self.sequence_parallel:
                positions = scatter_to_sequence_parallel_region(positions, self.tp_group)  # [s/tp, b, h]
            embeddings = words + positions
        return self.embedding_dropout(embeddings)
