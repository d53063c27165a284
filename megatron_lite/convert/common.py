"""Pieces both conversion directions share: the optional HF imports, QKV (de)interleaving, strict tensor use."""

from __future__ import annotations

import inspect
from types import ModuleType
from typing import Any

import torch

from megatron_lite.config import MegatronConfig
from megatron_lite.errors import fail

INSTALL_HINT = "pip install -e .[hf]"


def require_hf() -> tuple[ModuleType, ModuleType]:
    """(transformers, safetensors.torch), or one line saying how to install them: they are an optional extra."""
    missing = []
    modules = {}
    for name in ("transformers", "safetensors.torch"):
        try:
            modules[name] = __import__(name, fromlist=["_"])
        except ImportError:
            missing.append(name.split(".")[0])
    if missing:
        fail(f"HuggingFace conversion needs {' and '.join(missing)} (not installed): {INSTALL_HINT}")
    return modules["transformers"], modules["safetensors.torch"]


def config_accepts(config_class: type, name: str) -> bool:
    """Whether this transformers version's config class takes `name` (fields came and went across versions)."""
    return name in inspect.signature(config_class.__init__).parameters


def make_hf_config(config_class: type, **values: Any) -> Any:
    """A transformers config; its own validation errors become one-line UserErrors."""
    try:
        return config_class(**values)
    except (ValueError, TypeError) as err:
        first_line = str(err).strip().splitlines()[-1].strip()
        fail(f"cannot build a HuggingFace {config_class.__name__}: {first_line}")


def dtype_field(config_class: type) -> str:
    """The config key that records the weights' dtype: `dtype` in transformers >= 4.56, `torch_dtype` before."""
    return "dtype" if config_accepts(config_class, "dtype") else "torch_dtype"


# ---- fused QKV ------------------------------------------------------------------------------------------
# Megatron's linear_qkv rows are grouped per key/value group: [q_1 .. q_{a/g}, k, v] for each of the g
# groups, each block head_dim rows. HF keeps all query heads, then all keys, then all values. Query head
# i belongs to group i // (a/g) in both layouts, so only the row order changes.


def split_qkv(
    fused: torch.Tensor, num_heads: int, num_groups: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's interleaved [(a + 2g) * d, ...] weight or bias -> (q [a*d, ...], k [g*d, ...], v [g*d, ...])."""
    per_group = num_heads // num_groups
    rest = fused.shape[1:]
    grouped = fused.reshape(num_groups, per_group + 2, head_dim, *rest)
    q = grouped[:, :per_group].reshape(num_heads * head_dim, *rest)
    k = grouped[:, per_group].reshape(num_groups * head_dim, *rest)
    v = grouped[:, per_group + 1].reshape(num_groups * head_dim, *rest)
    return q, k, v


def merge_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int, head_dim: int
) -> torch.Tensor:
    """Inverse of split_qkv: separate q, k, v rows -> Megatron's per-group interleaved rows."""
    per_group = num_heads // num_groups
    rest = q.shape[1:]
    grouped = torch.cat(
        (
            q.reshape(num_groups, per_group, head_dim, *rest),
            k.reshape(num_groups, 1, head_dim, *rest),
            v.reshape(num_groups, 1, head_dim, *rest),
        ),
        dim=1,
    )
    return grouped.reshape((num_heads + 2 * num_groups) * head_dim, *rest)


# ---- strict use of a state dict -------------------------------------------------------------------------


class TensorSource:
    """A name -> tensor mapping that records what was taken, so a conversion can prove it used every tensor."""

    def __init__(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        self.tensors = tensors
        self.where = where
        self.taken: set[str] = set()

    def take(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The tensor `name` (which must exist and, when given, have `shape`)."""
        if name not in self.tensors:
            fail(f"{self.where} has no tensor {name}; it does not match its config")
        tensor = self.tensors[name]
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            fail(f"{self.where}: {name} is {list(tensor.shape)}, but its config implies {list(shape)}")
        self.taken.add(name)
        return tensor

    def has(self, name: str) -> bool:
        return name in self.tensors

    def take_bias(self, name: str, size: int, present: bool) -> torch.Tensor:
        """The bias `name` of `size` when the source has it (`present`), else zeros for a target that needs one."""
        return self.take(name, (size,)) if present else zeros_like_bias(size)

    def unused(self) -> list[str]:
        return sorted(set(self.tensors) - self.taken)


def zeros_like_bias(size: int) -> torch.Tensor:
    """A bias the target format requires but the source model does not have: zero is the same function."""
    return torch.zeros(size, dtype=torch.float32)


def output_layer_from_hf(src: TensorSource, cfg: MegatronConfig) -> dict[str, torch.Tensor]:
    """output_layer.weight from lm_head.weight when cfg is untied, else nothing.

    A tied HF model may still store lm_head.weight; HF itself replaces it by the word embeddings on load,
    so it is taken (counted as used) and dropped.
    """
    if cfg.untie_embeddings_and_output_weights:
        return {"output_layer.weight": src.take("lm_head.weight", (cfg.vocab_size, cfg.hidden_size))}
    if src.has("lm_head.weight"):
        src.take("lm_head.weight")
    return {}


def take_norm_scale(src: TensorSource, name: str, size: int, cfg: MegatronConfig) -> torch.Tensor:
    """The factor a norm multiplies by, as HF stores it: the weight, or, under --apply-layernorm-1p (which
    stores w and scales by 1 + w), 1 + w folded in (HF norms have no zero-centred form)."""
    weight = src.take(name, (size,))
    return weight + 1 if cfg.layernorm_zero_centered_gamma else weight


def sliding_window(cfg: MegatronConfig) -> int | None:
    """HF's sliding_window of cfg's --window-size left,0: the keys a query sees, itself included (left + 1)."""
    if cfg.window_size is None or cfg.window_size[0] < 0:
        return None
    return cfg.window_size[0] + 1


def window_size_from_hf(sliding: int | None, target: str) -> tuple[int, int] | None:
    """--window-size of HF's sliding_window (None: full attention)."""
    if sliding is None:
        return None
    if int(sliding) < 1:
        fail(f"{target}: sliding_window {sliding} must be at least 1 (the query itself)")
    return (int(sliding) - 1, 0)
