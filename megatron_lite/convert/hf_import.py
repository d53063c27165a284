"""Import a local HuggingFace GPT2LMHeadModel, LlamaForCausalLM, Qwen3ForCausalLM or MistralForCausalLM
directory as a megatron-lite checkpoint."""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import yaml

from megatron_lite.arguments.render import as_flags
from megatron_lite.config import MegatronConfig
from megatron_lite.convert import deepseek, gpt2, llama, mistral, mixtral, qwen2_moe, qwen3, qwen3_moe
from megatron_lite.convert.common import TensorSource, require_hf
from megatron_lite.convert.hf_export import TOKENIZER_CONFIG_KEY
from megatron_lite.errors import fail
from megatron_lite.parallel_state import ParallelState
from megatron_lite.readers import read_json
from megatron_lite.training.checkpointing import VOCAB_PARAM_SUFFIXES, read_latest_iteration, save_checkpoint

FAMILIES = {
    family.MODEL_TYPE: family
    for family in (gpt2, llama, qwen3, mistral, mixtral, qwen3_moe, qwen2_moe, deepseek)
}
# Written next to the checkpoint: the model settings every run that loads it must use (--yaml-cfg).
ARGS_FILENAME = "imported_model.yaml"
MODEL_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "group_query_attention",
    "num_query_groups",
    "kv_channels",
    "ffn_hidden_size",
    "max_position_embeddings",
    "position_embedding_type",
    "rotary_base",
    "use_rope_scaling",
    "rope_scaling_factor",
    "rotary_seq_len_interpolation_factor",
    "window_size",
    "normalization",
    "layernorm_epsilon",
    "qk_layernorm",
    "swiglu",
    "squared_relu",
    "openai_gelu",
    "untie_embeddings_and_output_weights",
    "add_bias_linear",
    "add_qkv_bias",
    "disable_qkv_bias",
    "attention_dropout",
    "hidden_dropout",
    "vocab_size",
    "tokenizer_type",
)
# The MoE settings an imported MoE model needs (Mixtral, Qwen3-MoE, Qwen2-MoE), after MODEL_FIELDS.
MOE_MODEL_FIELDS = (
    "num_experts",
    "moe_ffn_hidden_size",
    "moe_layer_freq",
    "moe_router_topk",
    "moe_router_pre_softmax",
    "moe_router_load_balancing_type",
    "moe_aux_loss_coeff",
    "moe_shared_expert_intermediate_size",
    "moe_shared_expert_gate",
    "moe_router_score_function",
    "moe_router_enable_expert_bias",
    "moe_router_dtype",
    "moe_router_topk_scaling_factor",
    "moe_router_num_groups",
    "moe_router_group_topk",
)
# The multi-latent attention settings of an imported DeepSeek-V3 model.
MLA_MODEL_FIELDS = (
    "multi_latent_attention",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_head_dim",
    "qk_pos_emb_head_dim",
    "v_head_dim",
    "rope_type",
    "rotary_scaling_factor",
    "mscale",
    "mscale_all_dim",
)
# Training settings MegatronConfig requires; the run that loads the checkpoint gives its own.
_PLACEHOLDERS = {"micro_batch_size": 1, "train_iters": 0, "lr": 0.0, "mock_data": True, "no_save_rng": True}


@dataclass
class ImportResult:
    """What import_from_hf wrote, and the flags that rebuild the model for --load/--finetune."""

    architecture: str
    config: MegatronConfig
    save_dir: Path
    args_file: Path
    model_flags: list[str]


def import_from_hf(
    hf_dir: str | os.PathLike, save_dir: str | os.PathLike, *, tokenizer_type: str | None = None
) -> ImportResult:
    """Convert hf_dir (config.json + model.safetensors or pytorch_model.bin) into a checkpoint at iteration 0.

    The checkpoint is written from one process, so it loads at any TP/DP size. It holds the weights
    and a config built from the HF config (training settings are placeholders), no optimizer or RNG
    state: continue with --finetune. The tokenizer is --tokenizer-type, else the one an export
    recorded, else GPT-2 BPE when the directory holds GPT-2's vocab.json/merges.txt, else none.
    """
    transformers, safetensors_torch = require_hf()
    hf_dir, save_dir = Path(hf_dir), Path(save_dir)
    family = _family_of(hf_dir)
    if read_latest_iteration(save_dir) is not None:
        fail(f"--save {save_dir} already holds a checkpoint; give a new directory")
    hf_config = _read_hf_config(hf_dir, transformers)
    values = family.config_from_hf(hf_config)
    values["tokenizer_type"] = _resolve_tokenizer(tokenizer_type, hf_dir, hf_config, values["vocab_size"])
    cfg = MegatronConfig(**values, **_PLACEHOLDERS).finalize(1)

    src = TensorSource(
        family.strip_prefixes(_read_hf_weights(hf_dir, safetensors_torch)), f"--hf-dir {hf_dir}"
    )
    options = getattr(family, "weight_options", lambda _: {})(hf_config)  # e.g. DeepSeek's rope layout
    tensors = family.weights_from_hf(src, cfg, **options)
    _check_all_used(src)
    model = _build_model(cfg, tensors)
    save_checkpoint(save_dir, 0, model, None, None, cfg, ParallelState(), consumed_train_samples=0)
    args_file = save_dir / ARGS_FILENAME
    args_file.write_text(yaml.safe_dump(model_settings(cfg), sort_keys=False), encoding="utf-8")
    return ImportResult(family.HF_ARCHITECTURE, cfg, save_dir, args_file, model_flags(cfg))


def model_settings(cfg: MegatronConfig) -> dict[str, Any]:
    """The model settings of cfg that a run loading its checkpoint needs, leaving out the irrelevant ones."""
    settings = {}
    names = MODEL_FIELDS + (MOE_MODEL_FIELDS if cfg.num_experts is not None else ())
    for name in names + (MLA_MODEL_FIELDS if cfg.multi_latent_attention else ()):
        value = getattr(cfg, name)
        if value is None or (name == "num_query_groups" and not cfg.group_query_attention):
            continue
        if name == "rotary_base" and cfg.position_embedding_type != "rope":
            continue
        if name == "rope_scaling_factor" and not cfg.use_rope_scaling:
            continue
        if name == "window_size":
            value = ",".join(map(str, value))  # Megatron's tuple_type spelling, for YAML and flags alike
        if name == "moe_layer_freq" and isinstance(value, list):
            value = 1 if all(value) else "[" + ",".join(map(str, value)) + "]"  # Megatron's list form
        settings[name] = value
    return settings


def model_flags(cfg: MegatronConfig) -> list[str]:
    """model_settings as pretrain_gpt.py flags."""
    return as_flags(model_settings(cfg))


def _family_of(hf_dir: Path) -> ModuleType:
    path = hf_dir / "config.json"
    if not path.is_file():
        fail(f"--hf-dir {hf_dir}: no config.json; give a directory written by save_pretrained")
    model_type = read_json(path, "give a directory written by save_pretrained").get("model_type")
    if model_type not in FAMILIES:
        supported = ", ".join(f"{f.HF_ARCHITECTURE} ({t})" for t, f in FAMILIES.items())
        fail(f"{path}: model_type {model_type!r} is not supported; megatron-lite imports {supported}")
    return FAMILIES[model_type]


def _read_hf_config(hf_dir: Path, transformers: ModuleType) -> Any:
    try:
        return transformers.AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)
    except (ValueError, OSError, TypeError, KeyError) as err:
        reason = str(err).strip().splitlines()[-1].strip() if str(err).strip() else type(err).__name__
        fail(f"{hf_dir / 'config.json'}: transformers cannot read it ({reason})")


def _resolve_tokenizer(requested: str | None, hf_dir: Path, hf_config: Any, vocab_size: int) -> str | None:
    from megatron_lite.tokenizer import BUNDLED_TOKENIZER_TYPES, TOKENIZER_TYPES, build_tokenizer

    if requested is not None:
        name, source = requested, f"--tokenizer-type {requested}"
    elif getattr(hf_config, TOKENIZER_CONFIG_KEY, None):
        name = getattr(hf_config, TOKENIZER_CONFIG_KEY)
        source = f"{hf_dir / 'config.json'} {TOKENIZER_CONFIG_KEY} {name}"
    elif _has_gpt2_bpe_files(hf_dir):
        name, source = "GPT2BPETokenizer", f"GPT-2 BPE files in {hf_dir}"
    else:
        return None
    if name in TOKENIZER_TYPES and name not in BUNDLED_TOKENIZER_TYPES:
        # Its files (--tokenizer-model, --vocab-size) are given when training; nothing to check here.
        return name
    if name not in BUNDLED_TOKENIZER_TYPES:
        fail(
            f"{source}: not a megatron-lite tokenizer; pass --tokenizer-type {' or '.join(BUNDLED_TOKENIZER_TYPES)}"
        )
    tokenizer_vocab = build_tokenizer(name).vocab_size
    if tokenizer_vocab > vocab_size:
        fail(
            f"{source}: the tokenizer has {tokenizer_vocab} ids but the model's vocab_size is {vocab_size}; "
            "pass the --tokenizer-type the model was trained with"
        )
    return name


def _has_gpt2_bpe_files(hf_dir: Path) -> bool:
    """Whether hf_dir's vocab.json/merges.txt are GPT-2's, the files megatron-lite's GPT-2 BPE ships."""
    from megatron_lite.tokenizer.gpt2_bpe import ASSETS

    vocab, merges = hf_dir / "vocab.json", hf_dir / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        return False

    def merge_lines(path: Path) -> list[str]:
        lines = path.read_text(encoding="utf-8").splitlines()
        return [line for line in lines if line.strip() and not line.startswith("#version")]

    try:
        same_vocab = json.loads(vocab.read_text(encoding="utf-8")) == json.loads(
            (ASSETS / "encoder.json").read_text(encoding="utf-8")
        )
        return same_vocab and merge_lines(merges) == merge_lines(ASSETS / "vocab.bpe")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def _read_hf_weights(hf_dir: Path, safetensors_torch: ModuleType) -> dict[str, torch.Tensor]:
    """Every tensor of the model files (safetensors preferred; sharded .index.json files followed), as fp32."""
    for base in ("model.safetensors", "pytorch_model.bin"):
        single, index = hf_dir / base, hf_dir / f"{base}.index.json"
        if single.is_file():
            files = [single]
        elif index.is_file():
            files = _index_files(index)
        else:
            continue
        state: dict[str, torch.Tensor] = {}
        for path in files:
            state.update(_load_weights_file(path, safetensors_torch))
        return {name: t.float() if t.is_floating_point() else t for name, t in state.items()}
    fail(
        f"--hf-dir {hf_dir}: no model.safetensors or pytorch_model.bin (or their .index.json) with the weights"
    )


def _index_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        fail(f"{index} is not a HuggingFace weight index (a JSON object with a weight_map)")
    for name in names:
        if not isinstance(name, str) or Path(name).name != name:
            fail(f"{index} names {name!r}, not a file next to it")
    return [index.parent / name for name in names]


def _load_weights_file(path: Path, safetensors_torch: ModuleType) -> dict[str, torch.Tensor]:
    if not path.is_file():
        fail(f"{path} is missing (named by the weight index next to it)")
    try:
        if path.suffix == ".safetensors":
            state = safetensors_torch.load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as err:
        how = "as safetensors" if path.suffix == ".safetensors" else "with torch.load(weights_only=True)"
        fail(f"cannot read {path} {how} ({type(err).__name__}); it is damaged or not a weights file")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        fail(f"{path} is not a state dict of tensors")
    return state


def _check_all_used(src: TensorSource) -> None:
    """Every HF tensor must have gone into the model, except biases megatron-lite lacks that are zero."""
    dropped = [name for name in src.unused() if not (name.endswith(".bias") and not src.tensors[name].any())]
    if dropped:
        more = f" (and {len(dropped) - 5} more)" if len(dropped) > 5 else ""
        fail(
            f"{src.where} holds tensors megatron-lite's model has no place for: {', '.join(dropped[:5])}{more}"
        )


def _build_model(cfg: MegatronConfig, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A one-process GPTModel holding `tensors` (vocab rows padded with zeros)."""
    from megatron_lite.core.models.gpt import GPTModel

    model = GPTModel(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            value = tensors.pop(name)
            rows = value.shape[0] if name.endswith(VOCAB_PARAM_SUFFIXES) else param.shape[0]
            if tuple(param[:rows].shape) != tuple(value.shape):
                raise RuntimeError(
                    f"converted {name} is {list(value.shape)}, the model's is {list(param.shape)}"
                )
            param[:rows].copy_(value)
            param[rows:].zero_()
        for name, buffer in model.named_buffers():
            if name in tensors:  # persistent state such as the router's expert_bias
                buffer.copy_(tensors.pop(name))
    if tensors:
        raise RuntimeError(f"converted tensors the model does not have: {sorted(tensors)}")
    return model
