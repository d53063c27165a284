"""The one source of truth for a run: a typed dataclass of Megatron's settings, validated once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from megatron_lite.config.checkpointing import CheckpointArgs, check_checkpointing
from megatron_lite.config.data import DataArgs
from megatron_lite.config.fields import _f
from megatron_lite.config.logging import LoggingArgs, check_run
from megatron_lite.config.model import ModelArgs, derive_model
from megatron_lite.config.parallel import ParallelArgs, derive_parallel, pad_vocab_size
from megatron_lite.config.profiling import ProfilingArgs, check_profiling
from megatron_lite.config.ranges import check_ranges
from megatron_lite.config.tokenizer import TokenizerArgs
from megatron_lite.config.training import TrainingArgs, derive_training

__all__ = ["MegatronConfig", "config_fields", "pad_vocab_size"]


# Each group of settings lives in its own module; the dataclass bases list them in --help order (a
# dataclass takes its bases' fields from the last base to the first).
@dataclass
class MegatronConfig(
    ProfilingArgs, LoggingArgs, CheckpointArgs, TokenizerArgs, DataArgs, ParallelArgs, TrainingArgs, ModelArgs
):
    """Every setting of a training run; filled from flags and YAML by `arguments.parse_config`."""

    # Megatron-LM flags that megatron-lite accepts without a field of its own (implementation switches and
    # flags at values that change nothing here), as the user gave them: saved so that checkpoints can carry
    # Megatron's whole `args`.
    megatron_args: dict[str, Any] = _f({}, "Megatron-LM flags without a megatron-lite field.", derived=True)
    # One line per implementation switch given: what it maps to here; printed once at start-up.
    startup_notices: list[str] = _f([], "What the Megatron-only flags given map to.", derived=True)
    # Derived by finalize(), not flags.
    world_size: int = _f(1, "Number of processes.", derived=True)
    data_parallel_size: int = _f(1, "world / TP.", derived=True)
    padded_vocab_size: int | None = _f(
        None,
        "Vocabulary rows of the model (default: the tokenizer's vocabulary padded to a multiple of "
        "--make-vocab-size-divisible-by x TP).",
        group="tokenizer",
    )

    @property
    def num_microbatches(self) -> int:
        """Micro batches per optimizer step on each data-parallel rank."""
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def qkv_bias(self) -> bool:
        """Whether the fused QKV projection has a bias."""
        if self.disable_qkv_bias:
            return False
        return self.add_bias_linear or self.add_qkv_bias

    def to_dict(self) -> dict[str, Any]:
        """Plain-data view for checkpoints, TensorBoard and YAML."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MegatronConfig:
        """Rebuild a config saved by to_dict, ignoring keys that a newer or older version lacks."""
        values = dict(values)
        # Checkpoints written before the fields took Megatron's dest names.
        if "norm_epsilon" in values:
            values.setdefault("layernorm_epsilon", values.pop("norm_epsilon"))
        if "disable_bias_linear" in values:
            values.setdefault("add_bias_linear", not values.pop("disable_bias_linear"))
        # Checkpoints written before --openai-gelu existed computed GELU's tanh form, now the flag's meaning.
        if "openai_gelu" not in values and not values.get("swiglu") and not values.get("squared_relu"):
            values["openai_gelu"] = True
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def finalize(self, world_size: int = 1, vocab_size: int | None = None) -> MegatronConfig:
        """Fill derived values and check the whole config once; raises UserError naming the flag."""
        self.world_size = world_size
        check_ranges(self)
        if vocab_size is not None and self.vocab_size is None:
            self.vocab_size = vocab_size
        derive_model(self)
        derive_parallel(self)
        derive_training(self)
        check_run(self)
        check_profiling(self)
        check_checkpointing(self)
        return self


def config_fields() -> list[dataclasses.Field]:
    """The user-settable fields (flags and YAML keys), in declaration order."""
    return [f for f in dataclasses.fields(MegatronConfig) if not f.metadata.get("derived")]
