"""GPTModel: embedding -> transformer block -> (tied or own) vocab-parallel output layer -> loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.config import MegatronConfig
from megatron_lite.core.models.gpt.decode import DecodePlan
from megatron_lite.core.models.gpt.embedding import LanguageModelEmbedding
from megatron_lite.core.models.gpt.kv_cache import KVCache, select_decode_linear
from megatron_lite.core.models.gpt.mlp import MLP
from megatron_lite.core.models.gpt.rope import RotaryEmbedding, yarn_scaling
from megatron_lite.core.models.gpt.transformer_block import TransformerBlock
from megatron_lite.core.models.gpt.transformer_layer import TransformerLayer
from megatron_lite.core.tensor_parallel import (
    ColumnParallelLinear,
    init_method_normal,
    seed_model_parallel_rng,
    vocab_parallel_cross_entropy,
)
from megatron_lite.core.transformer.moe.parallel import ExpertParallelState, build_expert_parallel_state
from megatron_lite.parallel_state import ParallelState


class GPTModel(nn.Module):
    """A decoder-only transformer with Megatron core's parameter names and tensor parallelism.

    Weights: cfg.seed seeds the default CPU generator for the build only (the caller's RNG state is
    left as it was), and every layer draws its full unsharded weight before keeping its shard, so one
    seed gives the same full model at any TP size. Building also resets the process-wide RNG tracker
    to Megatron's streams for cfg.seed and this TP rank (attention dropout and sequence-parallel dropout
    draw from it); dropout elsewhere uses the default generator, which the caller seeds.

    A pipeline stage is a GPTModel with Megatron's pre_process (it has the embedding), post_process (the
    final norm and output layer) and the global numbers of its transformer layers; it draws the weights
    of the pieces it leaves out too, so each piece it keeps has the whole model's initial weights. On a
    last stage without the embedding, tied embeddings get an output-layer weight of their own that starts
    as the word embeddings (Megatron marks it `shared`; its gradient is summed with the first stage's).
    """

    def __init__(
        self,
        cfg: MegatronConfig,
        pstate: ParallelState | None = None,
        *,
        pre_process: bool = True,
        post_process: bool = True,
        layers: range | None = None,
    ) -> None:
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
        self.pre_process, self.post_process = pre_process, post_process
        # Expert groups (collective to build; the trivial state without --num-experts or on one process).
        self.expert_parallel = (
            build_expert_parallel_state(cfg, pstate) if cfg.num_experts is not None else ExpertParallelState()
        )

        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(cfg.seed)
            embedding = LanguageModelEmbedding(cfg, self.tp_group)
            self.embedding = embedding if pre_process else None
            self.rotary_pos_emb = (
                RotaryEmbedding(
                    cfg.kv_channels,
                    cfg.rotary_percent,
                    cfg.rotary_base,
                    rotary_interleaved=cfg.rotary_interleaved,
                    seq_len_interpolation_factor=cfg.rotary_seq_len_interpolation_factor,
                    rope_scaling=cfg.use_rope_scaling,
                    rope_scaling_factor=cfg.rope_scaling_factor,
                    yarn=yarn_scaling(cfg),
                )
                # MLA rotates its own RoPE channels (Megatron's GPTModel builds none for it either).
                if cfg.position_embedding_type == "rope" and not cfg.multi_latent_attention
                else None
            )
            self.decoder = TransformerBlock(
                cfg, self.tp_group, layers=layers, post_layer_norm=post_process, ep=self.expert_parallel
            )
            own_output_weight = not self.share_embeddings_and_output_weights or not pre_process
            output_layer = ColumnParallelLinear(
                cfg.hidden_size,
                cfg.padded_vocab_size,
                init_method=init_method_normal(cfg.init_method_std),
                bias=False,
                gather_output=False,
                tp_group=self.tp_group,
                sequence_parallel=cfg.sequence_parallel,
                unpadded_output_size=cfg.vocab_size,
                skip_weight_param_allocation=not own_output_weight,
            )
            self.output_layer = output_layer if post_process else None
        if post_process and self.share_embeddings_and_output_weights and not pre_process:
            with torch.no_grad():
                output_layer.weight.copy_(embedding.word_embeddings.weight)
            output_layer.weight.shared = True
            output_layer.weight.shared_embedding = True
        seed_model_parallel_rng(cfg.seed, pstate.tp_rank)
        # DecodePlan writes out these classes' forward; anything else decodes through the modules.
        self._stock_layers = (
            type(self.embedding) is LanguageModelEmbedding
            and type(self.decoder) is TransformerBlock
            and not cfg.multi_latent_attention
            and all(
                type(layer) is TransformerLayer and type(layer.mlp) is MLP for layer in self.decoder.layers
            )
        )
        if pstate.device.type != "cpu":
            self.to(pstate.device)

    def shared_embedding_or_output_weight(self) -> torch.Tensor | None:
        """The output projection's weight [V/tp, h]: the word embedding's when tied (on a stage that has
        it), else the output layer's; None on a middle pipeline stage."""
        if self.share_embeddings_and_output_weights and self.pre_process:
            return self.embedding.word_embeddings.weight
        return self.output_layer.weight if self.post_process else None

    def init_kv_cache(self, batch_size: int, max_seq_len: int, decode_linear: str = "auto") -> KVCache:
        """An empty KV cache for up to max_seq_len positions of batch_size sequences.

        decode_linear picks the matrix-vector product of single-token steps: "auto", "torch" (F.linear)
        or "onednn" (see select_decode_linear).
        """
        cfg = self.config
        if cfg.position_embedding_type == "learned_absolute" and max_seq_len > cfg.max_position_embeddings:
            raise ValueError(
                f"max_seq_len {max_seq_len} exceeds --max-position-embeddings {cfg.max_position_embeddings}"
            )
        # TP steps take the general path, which uses F.linear.
        policy = "torch" if self.tp_group is not None else decode_linear
        attention = self.decoder.layers[0].self_attention
        sample = getattr(attention, "linear_qkv", attention.linear_proj).weight.detach()
        return KVCache(cfg.num_layers, batch_size, max_seq_len, select_decode_linear(sample, policy))

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        *,
        last_position_only: bool = False,
        decoder_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens [b, s] -> per-token loss [b, s] fp32 if labels are given, else logits [b, s, V_pad/tp].

        attention_mask [b, 1, s, s] bool, True = masked (combined with the causal mask). With kv_cache,
        the tokens continue the cached ones: positions start at kv_cache.length, a mask (rarely needed)
        is [b, 1, s, cached + s], and logits (or loss) cover the new tokens only.

        last_position_only (for generation, without labels): logits [b, 1, V_pad/tp] of the last position
        alone. Decoding needs only those, and the output layer is then one row instead of s (for a 50k
        vocabulary and a long prompt, as much work as the rest of the model).

        A pipeline stage without pre_process takes the previous stage's hidden states as decoder_input
        [s, b, h] (tokens may be None; position_ids are then required); one without post_process returns
        its hidden states.
        """
        if not self.pre_process:
            if decoder_input is None or position_ids is None:
                raise ValueError(
                    "a pipeline stage without the embedding needs decoder_input and position_ids"
                )
            rotary = self.rotary_pos_emb(position_ids) if self.rotary_pos_emb is not None else None
            hidden = self.decoder(decoder_input, attention_mask, rotary)
            return self._postprocess(hidden, labels) if self.post_process else hidden
        if last_position_only and (labels is not None or self.sequence_parallel):
            raise ValueError("last_position_only gives logits: it takes no labels and no --sequence-parallel")
        b, s = tokens.shape
        offset = 0
        if kv_cache is not None:
            if self.sequence_parallel:
                raise ValueError("KV-cache decoding does not support --sequence-parallel; build without it")
            if s == 1 and attention_mask is None and labels is None and self._decodes_lean():
                return self._decode_step(tokens, position_ids, kv_cache)
            offset = kv_cache.length
        if position_ids is None:
            position_ids = torch.arange(offset, offset + s, device=tokens.device).unsqueeze(0).expand(b, s)

        hidden = self.embedding(tokens, position_ids)  # [s, b, h] ([s/tp, b, h] under SP)
        rotary = self.rotary_pos_emb(position_ids) if self.rotary_pos_emb is not None else None
        hidden = self.decoder(hidden, attention_mask, rotary, kv_cache)
        if not self.post_process:
            return hidden
        if last_position_only:
            hidden = hidden[-1:]  # [1, b, h]
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

    def _postprocess(self, hidden: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Output layer (and loss with labels) of a pipeline stage that received its input."""
        logits, _ = self.output_layer(hidden, weight=self.shared_embedding_or_output_weight())
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        loss = vocab_parallel_cross_entropy(logits, labels.t(), self.tp_group, self.vocab_size, inplace=True)
        return loss.t().contiguous()

    def _decodes_lean(self) -> bool:
        """Whether a single-token KV-cache step may take _decode_step (see decode.DecodePlan): inference
        without TP, and the stock layer classes whose computation the plan writes out."""
        return (
            self.tp_group is None and not self.training and not torch.is_grad_enabled() and self._stock_layers
        )

    def _decode_step(
        self, tokens: torch.Tensor, position_ids: torch.Tensor | None, kv_cache: KVCache
    ) -> torch.Tensor:
        """One new token per sequence after the cached ones: tokens [b, 1] -> logits [b, 1, V_pad]."""
        if kv_cache.decode_plan is None:
            kv_cache.decode_plan = DecodePlan(self)
        # autocast casts the inputs of F.linear, but not those of a kernel it does not know.
        autocast = torch.is_autocast_enabled(tokens.device.type)
        linear = F.linear if autocast else kv_cache.decode_linear.linear
        logits = kv_cache.decode_plan.step(tokens, position_ids, kv_cache, linear)  # [1, b, V_pad]
        kv_cache.advance(1)
        return logits.transpose(0, 1).contiguous()  # [b, 1, V_pad]
