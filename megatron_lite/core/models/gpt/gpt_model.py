"""GPTModel: embedding -> transformer block -> (tied or own) vocab-parallel output layer -> loss."""

from __future__ import annotations

import torch
from torch import nn

from megatron_lite.config import MegatronConfig
from megatron_lite.core.models.gpt.embedding import LanguageModelEmbedding
from megatron_lite.core.models.gpt.kv_cache import KVCache
from megatron_lite.core.models.gpt.rope import RotaryEmbedding
from megatron_lite.core.models.gpt.transformer_block import TransformerBlock
from megatron_lite.core.tensor_parallel import (
    ColumnParallelLinear,
    init_method_normal,
    seed_model_parallel_rng,
    vocab_parallel_cross_entropy,
)
from megatron_lite.parallel_state import ParallelState


class GPTModel(nn.Module):
    """A decoder-only transformer with Megatron core's parameter names and tensor parallelism.

    Weights: cfg.seed seeds the default CPU generator for the build only (the caller's RNG state is
    left as it was), and every layer draws its full unsharded weight before keeping its shard, so one
    seed gives the same full model at any TP size. Building also resets the process-wide RNG tracker
    to Megatron's streams for cfg.seed and this TP rank (attention dropout and sequence-parallel dropout
    draw from it); dropout elsewhere uses the default generator, which the caller seeds.
    """

    def __init__(self, cfg: MegatronConfig, pstate: ParallelState | None = None) -> None:
        super().__init__()
        pstate = pstate if pstate is not None else ParallelState()
        if cfg.padded_vocab_size is None or cfg.vocab_size is None:
            raise ValueError(
                "GPTModel needs a finalized config with a vocabulary: cfg.finalize(world, vocab)"
            )
        if pstate.tp_size != cfg.tensor_model_parallel_size:
            raise ValueError(
                f"the config says --tensor-model-parallel-size {cfg.tensor_model_parallel_size} but the "
                f"parallel state has a TP group of {pstate.tp_size}"
            )
        self.config = cfg
        self.tp_group = pstate.tp_group if pstate.tp_size > 1 else None
        self.vocab_size = cfg.vocab_size
        self.sequence_parallel = cfg.sequence_parallel
        self.share_embeddings_and_output_weights = not cfg.untie_embeddings_and_output_weights

        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(cfg.seed)
            self.embedding = LanguageModelEmbedding(cfg, self.tp_group)
            self.rotary_pos_emb = (
                RotaryEmbedding(cfg.kv_channels, cfg.rotary_percent, cfg.rotary_base)
                if cfg.position_embedding_type == "rope"
                else None
            )
            self.decoder = TransformerBlock(cfg, self.tp_group)
            self.output_layer = ColumnParallelLinear(
                cfg.hidden_size,
                cfg.padded_vocab_size,
                init_method=init_method_normal(cfg.init_method_std),
                bias=False,
                gather_output=False,
                tp_group=self.tp_group,
                sequence_parallel=cfg.sequence_parallel,
                unpadded_output_size=cfg.vocab_size,
                skip_weight_param_allocation=self.share_embeddings_and_output_weights,
            )
        seed_model_parallel_rng(cfg.seed, pstate.tp_rank)
        if pstate.device.type != "cpu":
            self.to(pstate.device)

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        """The output projection's weight [V/tp, h]: the word embedding's when tied."""
        if self.share_embeddings_and_output_weights:
            return self.embedding.word_embeddings.weight
        return self.output_layer.weight

    def init_kv_cache(self, batch_size: int, max_seq_len: int) -> KVCache:
        """An empty KV cache for up to max_seq_len positions of batch_size sequences."""
        cfg = self.config
        if cfg.position_embedding_type == "learned_absolute" and max_seq_len > cfg.max_position_embeddings:
            raise ValueError(
                f"max_seq_len {max_seq_len} exceeds --max-position-embeddings {cfg.max_position_embeddings}"
            )
        return KVCache(cfg.num_layers, batch_size, max_seq_len)

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """tokens [b, s] -> per-token loss [b, s] fp32 if labels are given, else logits [b, s, V_pad/tp].

        attention_mask [b, 1, s, s] bool, True = masked (combined with the causal mask). With kv_cache,
        the tokens continue the cached ones: positions start at kv_cache.length, a mask (rarely needed)
        is [b, 1, s, cached + s], and logits (or loss) cover the new tokens only.
        """
        b, s = tokens.shape
        offset = 0
        if kv_cache is not None:
            if self.sequence_parallel:
                raise ValueError("KV-cache decoding does not support --sequence-parallel; build without it")
            offset = kv_cache.length
        if position_ids is None:
            position_ids = torch.arange(offset, offset + s, device=tokens.device).unsqueeze(0).expand(b, s)

        hidden = self.embedding(tokens, position_ids)  # [s, b, h] ([s/tp, b, h] under SP)
        rotary = self.rotary_pos_emb(position_ids) if self.rotary_pos_emb is not None else None
        hidden = self.decoder(hidden, attention_mask, rotary, kv_cache)
        logits, _ = self.output_layer(hidden, weight=self.shared_embedding_or_output_weight())  # [s, b, V/tp]
        if kv_cache is not None:
            kv_cache.advance(s)

        if labels is None:
            return logits.transpose(0, 1).contiguous()  # [b, s, V/tp]
        # The logits are not used after the loss: it may reuse their memory for softmax and gradient.
        loss = vocab_parallel_cross_entropy(
            logits, labels.t(), self.tp_group, self.vocab_size, inplace=True
        )  # [s, b]
        return loss.t().contiguous()
