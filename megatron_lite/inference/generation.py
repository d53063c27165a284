"""Autoregressive text generation from a GPTModel: sampling (temperature, top-k, top-p, greedy), KV cache."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from megatron_lite.config import MegatronConfig, pad_vocab_size
from megatron_lite.core.models.gpt import GPTModel, KVCache
from megatron_lite.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron_lite.errors import UserError, fail
from megatron_lite.parallel_state import ParallelState


def generate(
    model: GPTModel,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 0.0,
    greedy: bool = False,
    seed: int | None = None,
    eod: int | None = None,
    use_kv_cache: bool = True,
    on_token: Callable[[int], None] | None = None,
    autocast_dtype: torch.dtype | None = None,
    decode_linear: str = "auto",
) -> list[int]:
    """Continue prompt_ids by up to max_new_tokens tokens; returns the new tokens only.

    Sampling: logits / temperature, then top-k (0 = off), then top-p (nucleus; 0 or 1 = off) on what
    top-k left, as HuggingFace applies both; greedy (or top_k=1) takes the argmax. `seed` makes the
    draw reproducible (sampling runs on CPU, so also across devices). Generation stops after
    max_new_tokens or when `eod` is drawn (eod is neither returned nor passed to on_token).

    Context: the model only knows positions < max_position_embeddings, so the input is the last
    max_position_embeddings tokens. Without a cache the window slides by one each step. With a
    cache, tokens are appended until the window is full; after that every step re-prefills the
    cache from the slid window. A rolling cache would be wrong: every cached key and value depends
    on the absolute positions (and, past the first layer, on the tokens) of the old window. So the
    cached and uncached paths compute the same thing, and past the window the cache saves nothing.

    decode_linear: the matrix-vector product of the cached single-token steps ("auto", "torch",
    "onednn"; see GPTModel.init_kv_cache).

    With tensor parallelism every rank of the TP group calls this with the same arguments; the
    vocab-sharded logits are gathered and TP rank 0's draw is broadcast, so all ranks agree.
    """
    _check_arguments(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, greedy)
    cfg: MegatronConfig = model.config
    device = next(model.parameters()).device
    window = cfg.max_position_embeddings
    generator = torch.Generator(device="cpu")
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    tokens = [int(t) for t in prompt_ids]
    new_tokens: list[int] = []
    cache: KVCache | None = None
    if use_kv_cache and max_new_tokens > 0:
        cache = model.init_kv_cache(1, min(window, len(tokens) + max_new_tokens), decode_linear)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast:
            for _ in range(max_new_tokens):
                logits = _next_token_logits(model, tokens, window, cache, device)
                if greedy:  # argmax where the logits are: no copy of the vocabulary row to the host
                    token = int(torch.argmax(logits).item())
                else:  # on CPU in fp32, so a seed draws the same tokens on every device
                    token = sample_next_token(
                        logits.float().cpu(),
                        temperature=temperature,
                        top_k=top_k,
                        top_p=top_p,
                        generator=generator,
                    )
                token = _agree_across_tp(model, token, device)
                if eod is not None and token == eod:
                    break
                tokens.append(token)
                new_tokens.append(token)
                if on_token is not None:
                    on_token(token)
    finally:
        model.train(was_training)
    return new_tokens


def _check_arguments(
    model: GPTModel,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    greedy: bool,
) -> None:
    if len(prompt_ids) == 0:
        fail("the prompt is empty: generation needs at least one token to continue")
    vocab = model.vocab_size
    bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
    if bad:
        fail(f"prompt token {bad[0]} is outside the model's vocabulary of {vocab}")
    check_sampling_arguments(max_new_tokens, temperature, top_k, top_p, greedy)


def check_sampling_arguments(
    max_new_tokens: int, temperature: float, top_k: int, top_p: float, greedy: bool
) -> None:
    """UserError naming the flag for settings generate() cannot use."""
    if max_new_tokens < 0:
        fail(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if not greedy and not temperature > 0:
        fail(f"--temperature must be > 0, got {temperature}; use --greedy for deterministic decoding")
    if top_k < 0:
        fail(f"--top-k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 <= top_p <= 1.0:
        fail(f"--top-p must be in [0, 1] (0 = off), got {top_p}")


def _next_token_logits(
    model: GPTModel, tokens: list[int], window: int, cache: KVCache | None, device: torch.device
) -> torch.Tensor:
    """Logits [vocab] for the token after `tokens`, on the model's device in its compute dtype, padding
    rows removed. Only the last position is projected to the vocabulary."""
    if cache is None:
        feed = tokens[-window:]
    elif len(tokens) > window or cache.length == 0:
        cache.reset()  # first step, or the window slid: prefill from scratch
        feed = tokens[-window:]
    else:
        feed = tokens[cache.length :]
    last = model(torch.tensor([feed], device=device), kv_cache=cache, last_position_only=True)  # [1, 1, V/tp]
    if model.tp_group is not None:
        last = gather_from_tensor_model_parallel_region(last, model.tp_group)  # [1, 1, V_pad]
    return last[0, 0, : model.vocab_size]


def _agree_across_tp(model: GPTModel, token: int, device: torch.device) -> int:
    """TP ranks sample from identical logits but their generators may differ: TP rank 0 decides."""
    group = model.tp_group
    if group is None:
        return token
    value = torch.tensor([token], dtype=torch.int64, device=device)
    dist.broadcast(value, src=dist.get_global_rank(group, 0), group=group)
    return int(value.item())


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 0.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> int:
    """One token id drawn from fp32 logits [vocab] with the given sampling settings."""
    if greedy:
        return int(torch.argmax(logits).item())
    filtered = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
    probs = torch.softmax(filtered, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def filter_logits(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """logits [vocab] with everything outside the top-k, then outside the top-p nucleus, set to -inf.

    top-k keeps exactly k ids (ties broken by torch.topk). The nucleus is the smallest set of the
    most likely ids whose probabilities sum to at least top_p: an id is kept when the mass of the
    ids ranked above it is still below top_p, so the most likely id is always kept.
    """
    out = logits.clone()
    if 0 < top_k < out.numel():
        keep = torch.zeros_like(out, dtype=torch.bool)
        keep[torch.topk(out, top_k).indices] = True
        out[~keep] = float("-inf")
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(out, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted)
        drop[order] = drop_sorted
        out[drop] = float("-inf")
    return out


def load_model_for_inference(
    load_dir: str, device: str | torch.device = "cpu"
) -> tuple[GPTModel, MegatronConfig, Any]:
    """The model of the latest checkpoint in load_dir on one process, its config and its tokenizer.

    The saved config is reused except for the layout: one process, no TP, and the vocabulary padded
    for TP 1 (checkpoints store the vocabulary rows without the training run's TP padding).
    """
    from megatron_lite.tokenizer import build_tokenizer
    from megatron_lite.training.checkpointing import (
        load_model_weights,
        load_saved_config,
        read_latest_iteration,
    )

    if not os.path.isdir(load_dir):
        fail(f"--load {load_dir}: no such directory; give a checkpoint directory written by --save")
    if read_latest_iteration(load_dir) is None:
        fail(f"--load {load_dir}: no checkpoint in this directory (no latest_checkpointed_iteration.txt)")
    cfg = load_saved_config(load_dir)
    if cfg.tokenizer_type is None:
        fail(
            f"--load {load_dir}: the checkpoint's config names no --tokenizer-type, so text cannot be encoded"
        )
    try:
        # The saved config names the tokenizer's files (--tokenizer-model, --vocab-file/--merge-file)
        # as the training run gave them; say so when they are gone rather than only naming the flag.
        tokenizer = build_tokenizer(cfg)
    except UserError as err:
        fail(f"--load {load_dir}: cannot rebuild the tokenizer the checkpoint was trained with: {err}")
    cfg.tensor_model_parallel_size = 1
    cfg.world_size = 1
    cfg.data_parallel_size = 1
    cfg.sequence_parallel = False
    cfg.padded_vocab_size = pad_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, 1)
    torch_device = torch.device(device)
    model = GPTModel(cfg, ParallelState(device=torch_device))
    load_model_weights(model, load_dir)
    model.eval()
    return model, cfg, tokenizer
