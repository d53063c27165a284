"""HF export/import of Megatron's architecture switches: GELU forms, squared ReLU, q/k norms (Qwen3), 1p
norms (folded), interleaved and scaled RoPE, sliding windows (Mistral, Qwen3); logits within 1e-5 in fp32."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from convert_helpers import export_perturbed, our_logits

from megatron_lite.convert import import_from_hf
from megatron_lite.convert.common import config_accepts
from megatron_lite.convert.hf_import import ARGS_FILENAME
from megatron_lite.core.models.gpt import GPTModel
from megatron_lite.training.checkpointing import load_model_weights

transformers = pytest.importorskip("transformers", reason="HuggingFace interop needs the hf extra")

LLAMA_FLAGS = "--normalization RMSNorm --position-embedding-type rope --swiglu"


def _rope_kwargs(params: dict) -> dict:
    """RoPE settings as this transformers version spells them (5.x: rope_parameters; 4.x: theta + scaling)."""
    if config_accepts(transformers.LlamaConfig, "rope_parameters"):
        return {"rope_parameters": params}
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    return {"rope_theta": params["rope_theta"], "rope_scaling": scaling}


# ---- megatron-lite with a switch -> HF -> megatron-lite ---------------------------------------------------

LLAMA_NO_BIAS = f"{LLAMA_FLAGS} --disable-bias-linear --group-query-attention --num-query-groups 2"
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# Megatron's architecture switches: flags, and what the exported config.json must say about them.
SWITCH_VARIANTS = {
    # --apply-layernorm-1p exports its scales 1 + w folded into HF's plain norm weights.
    "gpt2-exact-gelu-1p": ("--apply-layernorm-1p", {"activation_function": "gelu"}),
    "gpt2-openai-gelu": ("--openai-gelu", {"activation_function": "gelu_new"}),
    "gpt2-squared-relu": ("--squared-relu", {"activation_function": "relu2"}),
    "llama-rope-scaling": (
        f"{LLAMA_NO_BIAS} --use-rope-scaling --rope-scaling-factor 4 --rotary-base 1000000 --kv-channels 16",
        {"architectures": ["LlamaForCausalLM"], "rope": LLAMA3_ROPE},
    ),
    "llama-interpolation": (
        f"{LLAMA_NO_BIAS} --rotary-seq-len-interpolation-factor 2",
        {"rope": {"rope_type": "linear", "factor": 2.0}},
    ),
    # Interleaved pairs: q and k rows (biases too) permuted into HF's rotate-half order.
    "llama-interleaved-biases-1p": (
        f"{LLAMA_FLAGS} --rotary-interleaved --apply-layernorm-1p",
        {"architectures": ["LlamaForCausalLM"], "attention_bias": True},
    ),
    "qwen3-qk-layernorm-qkv-bias": (
        f"{LLAMA_NO_BIAS} --qk-layernorm --add-qkv-bias",
        {"architectures": ["Qwen3ForCausalLM"], "attention_bias": True, "use_sliding_window": False},
    ),
    "qwen3-everything": (
        f"{LLAMA_NO_BIAS} --qk-layernorm --apply-layernorm-1p --rotary-interleaved --window-size 4,0 "
        "--use-rope-scaling --rope-scaling-factor 4 --rotary-base 1000000 --kv-channels 16",
        {
            "architectures": ["Qwen3ForCausalLM"],
            "sliding_window": 5,
            "layer_types": ["sliding_attention"] * 2,
        },
    ),
    "mistral-window": (
        f"{LLAMA_NO_BIAS} --window-size 3,0",
        {"architectures": ["MistralForCausalLM"], "sliding_window": 4},
    ),
}
# Reordered q/k channels change the summation order of q.k: equal to float rounding, not bitwise.
REORDERED = ("llama-interleaved-biases-1p", "qwen3-everything")
SWITCH_LOGIT_ATOL = 1e-5


def _exported_config_says(path: Path, expected: dict) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in expected.items():
        if key == "rope":
            rope = config.get("rope_parameters") or config.get("rope_scaling")
            assert {k: rope[k] for k in value} == value
        else:
            assert config[key] == value, key


@pytest.mark.parametrize("variant", list(SWITCH_VARIANTS))
def test_switch_exports_give_hf_our_logits_and_import_back(tmp_path, variant):
    extra, expected_config = SWITCH_VARIANTS[variant]
    model, ids, ours, diff = export_perturbed(tmp_path, extra)
    print(f"{variant}: max |logit diff| HF vs megatron-lite = {diff:.3e}")
    assert diff < SWITCH_LOGIT_ATOL
    assert ours.std().item() > 0.5  # logits spread well beyond the bound
    _exported_config_says(tmp_path / "hf", expected_config)
    result = import_from_hf(tmp_path / "hf", tmp_path / "back")
    back = GPTModel(result.config).eval()
    load_model_weights(back, tmp_path / "back")
    if variant in REORDERED:
        torch.testing.assert_close(our_logits(back, ids), ours, atol=SWITCH_LOGIT_ATOL, rtol=0)
    else:
        assert torch.equal(our_logits(back, ids), ours)


# ---- random HF models with the features -> megatron-lite ----------------------------------------------


def _random_switchhf_model(kind: str):
    """A random HF model using one of the features Megatron's switches map to, its weights spread."""
    torch.manual_seed(4)
    llama_like = dict(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    if kind.startswith("gpt2"):
        activation = kind.removeprefix("gpt2-")
        config = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4)
        config.activation_function = activation
        model = transformers.GPT2LMHeadModel(config)
    elif kind == "qwen3-window-llama3":
        config = transformers.Qwen3Config(
            **llama_like,
            head_dim=16,
            use_sliding_window=True,
            sliding_window=5,
            max_window_layers=0,
            **_rope_kwargs({"rope_theta": 1000000.0, **LLAMA3_ROPE, "factor": 8.0}),
        )
        model = transformers.Qwen3ForCausalLM(config)
    else:
        config = transformers.MistralConfig(
            **llama_like,
            sliding_window=6,
            **_rope_kwargs({"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
        )
        model = transformers.MistralForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return model.eval()


SWITCH_IMPORTS = {
    "gpt2-gelu": dict(openai_gelu=False, squared_relu=False),
    "gpt2-gelu_pytorch_tanh": dict(openai_gelu=True),
    "gpt2-relu2": dict(squared_relu=True, openai_gelu=False),
    "qwen3-window-llama3": dict(
        qk_layernorm=True,
        window_size=(4, 0),
        use_rope_scaling=True,
        rope_scaling_factor=8.0,
        rotary_base=1000000,
    ),
    "mistral-window-linear": dict(
        window_size=(5, 0), rotary_seq_len_interpolation_factor=2, qk_layernorm=False
    ),
}


@pytest.mark.parametrize("kind", list(SWITCH_IMPORTS))
def test_hf_models_with_switch_features_import_with_their_logits(tmp_path, kind):
    hf = _random_switchhf_model(kind)
    hf.save_pretrained(tmp_path / "hf")
    result = import_from_hf(tmp_path / "hf", tmp_path / "ckpt")
    cfg = result.config
    assert {name: getattr(cfg, name) for name in SWITCH_IMPORTS[kind]} == SWITCH_IMPORTS[kind]
    model = GPTModel(cfg).eval()
    load_model_weights(model, tmp_path / "ckpt")
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(6)).tolist()[0]
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
    ours = our_logits(model, ids)
    diff = (theirs - ours).abs().max().item()
    print(f"{kind}: max |logit diff| HF vs megatron-lite = {diff:.3e} (logit std {ours.std():.2f})")
    assert diff < SWITCH_LOGIT_ATOL and ours.std() > 0.5
    # The settings file a run loads the checkpoint with spells them as Megatron's flags.
    settings = yaml.safe_load((tmp_path / "ckpt" / ARGS_FILENAME).read_text())
    if cfg.window_size is not None:
        assert settings["window_size"] == f"{cfg.window_size[0]},0"
        assert f"--window-size {cfg.window_size[0]},0" in " ".join(result.model_flags)
