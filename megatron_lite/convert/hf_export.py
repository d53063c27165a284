"""Export a megatron-lite checkpoint (saved at any TP/DP layout) as a HuggingFace model directory."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from megatron_lite.config import MegatronConfig
from megatron_lite.config.fields import flag_name
from megatron_lite.convert import deepseek, gpt2, llama, mistral, mixtral, qwen2_moe, qwen3, qwen3_moe
from megatron_lite.convert.common import TensorSource, require_hf, sliding_window
from megatron_lite.errors import fail
from megatron_lite.training.checkpointing import (
    iteration_dir_name,
    load_saved_config,
    read_full_tensors,
    read_latest_iteration,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Recorded in config.json so that an import knows which megatron-lite tokenizer the ids belong to.
TOKENIZER_CONFIG_KEY = "megatron_lite_tokenizer_type"
GPT2_SPECIAL_TOKEN = "<|endoftext|>"


@dataclass
class ExportResult:
    """What export_to_hf wrote."""

    architecture: str
    iteration: int
    save_dir: Path
    vocab_size: int
    dtype: str
    tokenizer_type: str | None = None
    tokenizer_files: tuple[str, ...] = ()  # the HF tokenizer files written (none for most classes)


def export_to_hf(
    load_dir: str | os.PathLike,
    save_dir: str | os.PathLike,
    *,
    iteration: int | None = None,
    dtype: str = "float32",
) -> ExportResult:
    """Write checkpoint `iteration` (default: latest) of load_dir as a GPT2LMHeadModel, LlamaForCausalLM,
    Qwen3ForCausalLM (--qk-layernorm) or MistralForCausalLM (--window-size).

    save_dir gets config.json and model.safetensors with the true (unpadded) vocabulary, plus the
    tokenizer files for GPT-2 BPE and HuggingFaceTokenizer (the other classes have none; config.json
    names the class in megatron_lite_tokenizer_type). The directory appears whole or not at all.
    Options the target architecture cannot express raise a UserError naming the option; nothing is
    written then.
    """
    transformers, safetensors_torch = require_hf()
    if dtype not in DTYPES:
        fail(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    load_dir, save_dir = Path(load_dir), Path(save_dir)
    if not load_dir.is_dir():
        fail(f"--load {load_dir}: no such directory; give a checkpoint directory written by --save")
    if iteration is None:
        iteration = read_latest_iteration(load_dir)
        if iteration is None:
            fail(f"--load {load_dir}: no checkpoint in this directory (no latest_checkpointed_iteration.txt)")
    elif not (load_dir / iteration_dir_name(iteration)).is_dir() and not (
        iteration == 0 and (load_dir / "release").is_dir()
    ):
        saved = ", ".join(sorted(p.name for p in load_dir.glob("iter_*") if "." not in p.name)) or "none"
        fail(f"--iteration {iteration}: {load_dir} has no {iteration_dir_name(iteration)} (it has: {saved})")
    if save_dir.exists() and (not save_dir.is_dir() or any(save_dir.iterdir())):
        fail(f"--save-dir {save_dir} exists and is not an empty directory; give a new one")

    cfg = load_saved_config(load_dir, iteration)
    family = _family_of(cfg)
    family.check_exportable(cfg, transformers)
    tokenizer_files = _tokenizer_files(cfg)
    eos = _eos_id(cfg)
    hf_tokenizer = _hf_tokenizer(cfg)

    src = TensorSource(read_full_tensors(load_dir, iteration), f"checkpoint {load_dir} iteration {iteration}")
    weights = family.weights_to_hf(src, cfg)
    if src.unused():
        fail(
            f"{src.where} holds tensors a {family.HF_ARCHITECTURE} has no place for: {', '.join(src.unused())}"
        )
    extra = {TOKENIZER_CONFIG_KEY: cfg.tokenizer_type} if cfg.tokenizer_type else {}
    config = family.hf_config(cfg, transformers, dtype=dtype, eos=eos, extra=extra)
    _write_atomically(
        save_dir,
        lambda tmp: _write(
            tmp, config, weights, DTYPES[dtype], safetensors_torch, cfg, tokenizer_files, hf_tokenizer
        ),
    )
    model_files = {"config.json", "generation_config.json", "model.safetensors"}
    written = tuple(sorted(p.name for p in save_dir.iterdir() if p.name not in model_files))
    return ExportResult(
        family.HF_ARCHITECTURE, iteration, save_dir, cfg.vocab_size, dtype, cfg.tokenizer_type, written
    )


def _family_of(cfg: MegatronConfig) -> ModuleType:
    """The HF architecture a model's norm and position embedding pick (and, for RMSNorm with rope, its q/k
    norms or sliding window); other mixes have none."""
    _refuse_gpt_oss_switches(cfg)
    if getattr(cfg, "multi_latent_attention", False):
        return deepseek  # MLA, dense or MoE: DeepseekV3ForCausalLM (check_exportable says what it lacks)
    pos, norm = cfg.position_embedding_type, cfg.normalization
    if pos == "learned_absolute" and norm == "LayerNorm":
        return gpt2
    if getattr(cfg, "num_experts", None) is not None:
        if pos == "rope" and norm == "RMSNorm":
            # Qwen3-MoE: q/k norms; Qwen2-MoE: a shared expert (and q/k/v biases); Mixtral: neither.
            if cfg.qk_layernorm:
                return qwen3_moe
            return qwen2_moe if cfg.moe_shared_expert_intermediate_size is not None else mixtral
        fail(
            f"cannot export this MoE model: {mixtral.HF_ARCHITECTURE}, {qwen3_moe.HF_ARCHITECTURE} and "
            f"{qwen2_moe.HF_ARCHITECTURE}, the HF MoE architectures exported here, are RMSNorm with rope"
        )
    if pos == "rope" and norm == "RMSNorm":
        if cfg.qk_layernorm:
            return qwen3
        return mistral if sliding_window(cfg) is not None else llama
    fail(
        f"cannot export: --normalization {norm} with --position-embedding-type {pos} has no HuggingFace "
        f"equivalent ({gpt2.HF_ARCHITECTURE} is LayerNorm with learned_absolute, {llama.HF_ARCHITECTURE} "
        "is RMSNorm with rope)"
    )


# gpt-oss's switches: of HF's architectures only GptOssForCausalLM has them, and it is not an export target
# (MoE-only, experts in its own fused layout); GPT-2, Llama, Qwen3 and Mistral have none of them.
_GPT_OSS_SWITCHES = {
    "quick_geglu": False,
    "glu_linear_offset": 0.0,
    "activation_func_clamp_value": None,
    "softmax_type": "vanilla",
    "window_attn_skip_freq": None,
    "enable_gpt_oss": False,
}


def _refuse_gpt_oss_switches(cfg: MegatronConfig) -> None:
    for name, default in _GPT_OSS_SWITCHES.items():
        value = getattr(cfg, name, default)
        if value != default:
            shown = "" if isinstance(value, bool) else f" {value}"
            fail(
                f"cannot export: {flag_name(name)}{shown} is set, but none of the HuggingFace architectures "
                "exported here (GPT-2, Llama, Qwen3, Mistral) has it"
            )


def _eos_id(cfg: MegatronConfig) -> int | None:
    """The end-of-document id generation stops at, when the tokenizer is known and inside the vocabulary."""
    if cfg.tokenizer_type is None:
        return None
    from megatron_lite.errors import UserError
    from megatron_lite.tokenizer import build_tokenizer

    try:
        eod = build_tokenizer(cfg).eod
    except UserError as err:
        fail(f"cannot rebuild the tokenizer the checkpoint was trained with: {err}")
    return eod if 0 <= eod < cfg.vocab_size else None


def _hf_tokenizer(cfg: MegatronConfig) -> object | None:
    """The transformers tokenizer of a HuggingFaceTokenizer run, saved with the model as it is (same ids)."""
    if cfg.tokenizer_type != "HuggingFaceTokenizer":
        return None
    from megatron_lite.tokenizer import build_tokenizer

    return build_tokenizer(cfg).tokenizer  # type: ignore[attr-defined]


def _tokenizer_files(cfg: MegatronConfig) -> dict[str, Path]:
    """HF name -> our file for the tokenizer files to copy (GPT-2 BPE only; the byte tokenizer has none)."""
    if cfg.tokenizer_type != "GPT2BPETokenizer":
        return {}
    from megatron_lite.tokenizer.gpt2_bpe import ASSETS

    files = {
        "vocab.json": Path(cfg.vocab_file) if cfg.vocab_file else ASSETS / "encoder.json",
        "merges.txt": Path(cfg.merge_file) if cfg.merge_file else ASSETS / "vocab.bpe",
    }
    for name, path in files.items():
        if not path.is_file():
            flag = "--vocab-file" if name == "vocab.json" else "--merge-file"
            fail(f"{path}: the checkpoint was trained with {flag} {path}, which no longer exists")
    return files


def _write(
    directory: Path,
    config: object,
    weights: dict[str, torch.Tensor],
    dtype: torch.dtype,
    safetensors_torch: ModuleType,
    cfg: MegatronConfig,
    tokenizer_files: dict[str, Path],
    hf_tokenizer: object | None = None,
) -> None:
    config.save_pretrained(directory)
    if hf_tokenizer is not None:
        hf_tokenizer.save_pretrained(str(directory))  # type: ignore[attr-defined]
    # clone(): safetensors refuses tensors that share storage (q, k and v are views of one fused weight).
    tensors = {name: tensor.detach().to(dtype).contiguous().clone() for name, tensor in weights.items()}
    safetensors_torch.save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    if tokenizer_files:
        for name, path in tokenizer_files.items():
            shutil.copyfile(path, directory / name)
        special = {
            "bos_token": GPT2_SPECIAL_TOKEN,
            "eos_token": GPT2_SPECIAL_TOKEN,
            "unk_token": GPT2_SPECIAL_TOKEN,
        }
        tokenizer_config = {
            "tokenizer_class": "GPT2Tokenizer",
            "model_max_length": cfg.max_position_embeddings,
            "add_prefix_space": False,
            "add_bos_token": False,
            **special,
        }
        _write_json(directory / "tokenizer_config.json", tokenizer_config)
        _write_json(directory / "special_tokens_map.json", special)


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def _write_atomically(save_dir: Path, write) -> None:
    """Run write(tmp) in a sibling temporary directory and rename it into place: no half-written model."""
    tmp = save_dir.with_name(f".{save_dir.name}.tmp-{secrets.token_hex(4)}")
    try:
        save_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        write(tmp)
        if save_dir.exists():
            save_dir.rmdir()  # checked empty above; rename() cannot replace it on every platform
        os.rename(tmp, save_dir)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        fail(
            f"cannot write --save-dir {save_dir}: {err.strerror or err}; check it is writable with free space"
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
