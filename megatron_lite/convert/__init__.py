"""HuggingFace interop: megatron-lite checkpoints to GPT-2, Llama, Qwen3 and Mistral directories and back."""

from megatron_lite.convert.hf_export import export_to_hf
from megatron_lite.convert.hf_import import import_from_hf

__all__ = ["export_to_hf", "import_from_hf"]
