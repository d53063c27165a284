"""Run set-up before the trainer exists: the tokenizer and the finalized config, seeds, the default model."""

from __future__ import annotations

import random

import numpy as np
import torch

from megatron_lite.config import MegatronConfig
from megatron_lite.core.models.gpt import GPTModel
from megatron_lite.core.tensor_parallel import model_parallel_manual_seed
from megatron_lite.errors import fail
from megatron_lite.parallel_state import ParallelState
from megatron_lite.tokenizer import TOKENIZER_TYPES, Tokenizer, build_tokenizer


def setup_config(cfg: MegatronConfig, pstate: ParallelState) -> Tokenizer | None:
    """Build the tokenizer, finalize the config for this world and vocabulary, and check the device."""
    if cfg.use_checkpoint_args and cfg.load:
        # Before the tokenizer: the checkpoint's args may name it (Megatron's load_args_from_checkpoint).
        from megatron_lite.training.checkpointing.checkpoint_args import apply_checkpoint_args

        for line in apply_checkpoint_args(cfg):
            if pstate.rank == 0:
                print(line, flush=True)
    tokenizer = None
    if cfg.tokenizer_type is not None or cfg.vocab_file is not None or cfg.merge_file is not None:
        # All the tokenizer settings (--tokenizer-model, --vocab-size, --tiktoken-*); BPE files without a
        # type mean GPT-2 BPE, as in Megatron's GPT examples.
        tokenizer = build_tokenizer(cfg)
    elif not cfg.mock_data:
        fail(
            "--tokenizer-type is required with --data-path: the one the data was preprocessed with "
            f"({', '.join(TOKENIZER_TYPES)})"
        )
    elif cfg.vocab_size is None:
        fail("--mock-data without --tokenizer-type needs --vocab-size, e.g. --vocab-size 50257")
    cfg.finalize(pstate.world_size, tokenizer.vocab_size if tokenizer is not None else None)
    if tokenizer is not None and cfg.vocab_size < tokenizer.vocab_size:
        fail(
            f"--vocab-size {cfg.vocab_size} is smaller than the {tokenizer.name} vocabulary "
            f"({tokenizer.vocab_size}); leave --vocab-size out to use the tokenizer's"
        )
    if cfg.tensor_model_parallel_size != pstate.tp_size:
        fail(
            f"--tensor-model-parallel-size {cfg.tensor_model_parallel_size} does not match the process "
            f"groups (TP size {pstate.tp_size}); pass the same value to initialize_parallel"
        )
    if cfg.pipeline_model_parallel_size != pstate.pp_size:
        fail(
            f"--pipeline-model-parallel-size {cfg.pipeline_model_parallel_size} does not match the process "
            f"groups (PP size {pstate.pp_size}); pass the same value to initialize_parallel"
        )
    if cfg.context_parallel_size != pstate.cp_size:
        fail(
            f"--context-parallel-size {cfg.context_parallel_size} does not match the process "
            f"groups (CP size {pstate.cp_size}); pass the same value to initialize_parallel"
        )
    check_precision(cfg, pstate.device)
    return tokenizer


def check_precision(cfg: MegatronConfig, device: torch.device) -> None:
    """Precision settings the device cannot run. fp16 with dynamic loss scaling runs on CPUs too (torch's CPU
    autocast has float16): slower than bf16 there, but Megatron's fp16 command lines run unchanged."""


def set_random_seed(seed: int, pstate: ParallelState | None = None) -> None:
    """Seed python, numpy and torch with --seed, and the model's RNG tracker streams for this TP rank.

    As Megatron, each pipeline stage offsets the seed by 100 x its rank (its dropout masks differ).
    """
    if pstate is not None:
        seed += 100 * pstate.pp_rank
    random.seed(seed)
    np.random.seed(seed)
    model_parallel_manual_seed(seed, pstate.tp_rank if pstate is not None else 0)


def gpt_model_provider(cfg: MegatronConfig, pstate: ParallelState, **stage) -> torch.nn.Module:
    """The whole GPTModel, or under pipeline parallelism one stage of it (pre_process, post_process,
    layers: Megatron's model_provider arguments)."""
    return GPTModel(cfg, pstate, **stage)


def train_dtype(cfg: MegatronConfig) -> torch.dtype | None:
    if cfg.bf16:
        return torch.bfloat16
    if cfg.fp16:
        return torch.float16
    return None
