"""Checks of the multi-latent attention settings (--multi-latent-attention and Megatron's MLA flags)."""

from __future__ import annotations

from typing import Any

from megatron_lite.config.fields import fail


def derive_mla(cfg: Any) -> None:
    """--rope-type for plain attention, and MLA's rules as Megatron's validate_args and MLATransformerConfig
    state them, plus the combinations megatron-lite's MLA does not run."""
    if not cfg.multi_latent_attention:
        if cfg.rope_type not in (None, "rope"):
            fail(
                f"--rope-type {cfg.rope_type} needs --multi-latent-attention: other attention supports only "
                "rope (Megatron asserts it); YaRN for gpt-oss comes with --enable-gpt-oss"
            )
        return
    if cfg.rope_type is None:
        cfg.rope_type = "yarn"  # MLATransformerConfig's default
    if cfg.group_query_attention:
        fail("--group-query-attention and --multi-latent-attention exclude each other (as in Megatron)")
    if cfg.rotary_interleaved:
        fail("--rotary-interleaved does not work with --multi-latent-attention (as in Megatron)")
    rotary_dim = (
        cfg.qk_pos_emb_head_dim
        if cfg.rope_type == "yarn"
        else int(cfg.qk_pos_emb_head_dim * cfg.rotary_percent)
    )
    if rotary_dim <= 0 or rotary_dim % 2 != 0:
        fail(
            f"--qk-pos-emb-head-dim {cfg.qk_pos_emb_head_dim} (x --rotary-percent {cfg.rotary_percent}) gives "
            f"{rotary_dim} RoPE channels; MLA needs a positive even number"
        )
    if cfg.context_parallel_size > 1:
        fail("--multi-latent-attention with --context-parallel-size > 1 is not implemented yet (issue 14)")
    if cfg.window_size is not None or cfg.softmax_type != "vanilla":
        fail(
            "--multi-latent-attention takes neither --window-size nor --softmax-type other than vanilla here"
        )
    if cfg.enable_gpt_oss:
        fail("--enable-gpt-oss sets gpt-oss's attention; it does not combine with --multi-latent-attention")
