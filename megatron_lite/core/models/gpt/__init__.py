"""The GPT model (Megatron core layout) built from tensor-parallel layers."""

from megatron_lite.core.models.gpt.gpt_model import GPTModel
from megatron_lite.core.models.gpt.kv_cache import KVCache

__all__ = ["GPTModel", "KVCache"]
