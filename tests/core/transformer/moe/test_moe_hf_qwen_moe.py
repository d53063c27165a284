"""MoE models <-> HuggingFace Qwen3MoeForCausalLM and Qwen2MoeForCausalLM: the same logits both ways, and
HF's greedy generate writes the tokens tools/generate.py writes (KV cache) on the same weights."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from megatron_lite.arguments import parse_config
from megatron_lite.convert import export_to_hf
from megatron_lite.convert.hf_import import import_from_hf
from megatron_lite.core.models.gpt import GPTModel
from megatron_lite.errors import UserError
from megatron_lite.inference.cli import generate_main
from megatron_lite.inference.generation import load_model_for_inference
from megatron_lite.training.checkpointing import save_checkpoint
from tests.helpers import tiny_flags

transformers = pytest.importorskip("transformers")

VOCAB, EOD = 70, 69  # NullTokenizer --vocab-size 70: text is ids, end-of-document 69
PROMPT = [5, 17, 3, 44, 9, 60]
NEW_TOKENS = 10  # prompt + new tokens within the exported model's --max-position-embeddings 16
LLAMA_LAYOUT = (
    "--position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear "
    "--untie-embeddings-and-output-weights --group-query-attention --num-query-groups 2 "
    "--tokenizer-type NullTokenizer --num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 24 "
    "--moe-aux-loss-coeff 0.01"
)
QWEN3_MOE = f"{LLAMA_LAYOUT} --qk-layernorm"
QWEN2_MOE = (
    f"{LLAMA_LAYOUT} --add-qkv-bias --moe-shared-expert-intermediate-size 40 --moe-shared-expert-gate "
    "--moe-router-pre-softmax"
)
HF_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=24,
    router_aux_loss_coef=0.01,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    eos_token_id=EOD,
    bos_token_id=EOD,
)


def _perturb(model: torch.nn.Module) -> None:
    with torch.no_grad():  # away from init (HF's router starts at zero), so a misplaced tensor shows
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))


def _ours(extra: str) -> GPTModel:
    flags = tiny_flags(micro_batch_size=1, vocab_size=VOCAB, train_iters=1, num_layers=3) + extra.split()
    model = GPTModel(parse_config(flags).finalize(1)).eval()
    _perturb(model)
    return model


def _hf(family: str, **overrides) -> torch.nn.Module:
    """A random transformers {family}ForCausalLM of HF_COMMON's shape."""
    config = getattr(transformers, f"{family}Config")(**{**HF_COMMON, **overrides})
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    _perturb(model)
    return model


def _hf_logits(hf: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids).logits[0]


def _our_logits(model: GPTModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)[0, :, :VOCAB]


def _hf_greedy(hf: torch.nn.Module) -> list[int]:
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([PROMPT]),
            attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=EOD,
            pad_token_id=EOD,
        )
    tokens = out[0, len(PROMPT) :].tolist()
    return tokens[:-1] if tokens and tokens[-1] == EOD else tokens


def _generate_py_greedy(load_dir) -> list[int]:
    """tools/generate.py --greedy (KV cache on) as a user runs it; NullTokenizer prints the ids."""
    out = io.StringIO()
    argv = ["--load", str(load_dir), "--prompt", " ".join(map(str, PROMPT)), "--greedy", "--device", "cpu"]
    with contextlib.redirect_stdout(out):
        assert generate_main([*argv, "--max-new-tokens", str(NEW_TOKENS)]) == 0
    tokens = [int(t) for t in out.getvalue().split()]
    assert tokens[: len(PROMPT)] == PROMPT
    return tokens[len(PROMPT) :]


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(5))


# ---- HF -> megatron-lite -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, overrides, expected",
    [
        # norm_topk_prob False: top-k of the full softmax, unnormalised = --moe-router-pre-softmax.
        pytest.param(
            "Qwen3Moe",
            dict(head_dim=8, norm_topk_prob=False, mlp_only_layers=[1]),
            dict(qk_layernorm=True, moe_router_pre_softmax=True, moe_layer_freq=[1, 0, 1]),
            id="qwen3_moe",
        ),
        # Qwen2-MoE: sigmoid-gated shared expert, q/k/v biases, renormalised top-k, every other layer MoE.
        pytest.param(
            "Qwen2Moe",
            dict(norm_topk_prob=True, decoder_sparse_step=2, shared_expert_intermediate_size=40),
            dict(moe_shared_expert_gate=True, add_qkv_bias=True, moe_layer_freq=[0, 1, 0]),
            id="qwen2_moe",
        ),
    ],
)
def test_import_gives_hf_logits_and_greedy_tokens(tmp_path, family, overrides, expected):
    torch.manual_seed(0)
    hf = _hf(family, **overrides)
    hf.save_pretrained(str(tmp_path / "hf"))
    result = import_from_hf(tmp_path / "hf", tmp_path / "ckpt", tokenizer_type="NullTokenizer")
    cfg = result.config
    assert result.architecture == f"{family}ForCausalLM"
    assert (cfg.num_experts, cfg.moe_router_topk, cfg.moe_ffn_hidden_size, cfg.ffn_hidden_size) == (
        4,
        2,
        24,
        40,
    )
    assert cfg.moe_aux_loss_coeff == pytest.approx(0.01)
    assert {name: getattr(cfg, name) for name in expected} == expected
    # The settings file that --yaml-cfg reads names the MoE layout too.
    assert "--num-experts" in result.model_flags and "--moe-layer-freq" in result.model_flags

    model, _, _ = load_model_for_inference(str(tmp_path / "ckpt"))
    ids = _ids()
    theirs, ours = _hf_logits(hf, ids), _our_logits(model, ids)
    assert ours.abs().max() > 1.0
    assert (theirs - ours).abs().max().item() < 1e-4
    ours_tokens = _generate_py_greedy(tmp_path / "ckpt")
    assert ours_tokens == _hf_greedy(hf)
    assert len(ours_tokens) >= 4


# ---- megatron-lite -> HF -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, architecture, hf_values",
    [
        # Megatron's default router (softmax over the top-k logits) = norm_topk_prob; freq 2 -> layer 1 dense.
        pytest.param(
            f"{QWEN3_MOE} --moe-layer-freq 2",
            "Qwen3MoeForCausalLM",
            dict(norm_topk_prob=True, mlp_only_layers=[1], decoder_sparse_step=1),
            id="qwen3_moe",
        ),
        pytest.param(
            QWEN2_MOE,
            "Qwen2MoeForCausalLM",
            dict(norm_topk_prob=False, mlp_only_layers=[], shared_expert_intermediate_size=40, qkv_bias=True),
            id="qwen2_moe",
        ),
    ],
)
def test_export_gives_our_logits_and_greedy_tokens(tmp_path, extra, architecture, hf_values):
    torch.manual_seed(0)
    model = _ours(extra)
    save_checkpoint(tmp_path / "ckpt", 3, model, None, None, model.config, None, consumed_train_samples=0)
    assert export_to_hf(tmp_path / "ckpt", tmp_path / "hf").architecture == architecture
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    assert type(hf).__name__ == architecture
    assert {name: getattr(hf.config, name) for name in hf_values} == hf_values
    assert (hf.config.num_experts, hf.config.num_experts_per_tok, hf.config.moe_intermediate_size) == (
        4,
        2,
        24,
    )
    ids = _ids()
    ours = _our_logits(model, ids)
    assert ours.abs().max() > 1.0
    assert (_hf_logits(hf, ids) - ours).abs().max().item() < 1e-4
    ours_tokens = _generate_py_greedy(tmp_path / "ckpt")
    assert ours_tokens == _hf_greedy(hf)
    assert len(ours_tokens) >= 4

    back = import_from_hf(tmp_path / "hf", tmp_path / "back")
    again, _, _ = load_model_for_inference(str(tmp_path / "back"))
    assert back.config.moe_layer_freq == model.config.moe_layer_freq
    torch.testing.assert_close(_our_logits(again, ids), ours, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "extra, message",
    [
        (f"{QWEN3_MOE} --moe-router-score-function sigmoid", "sigmoid has no Qwen3-MoE equivalent"),
        (f"{QWEN3_MOE} --moe-router-topk-scaling-factor 2.5", "scaling-factor has no Qwen3-MoE equivalent"),
        (f"{QWEN3_MOE} --moe-shared-expert-intermediate-size 40", "Qwen2-MoE has shared experts"),
        (f"{QWEN3_MOE} --moe-expert-capacity-factor 1.0", "token dropping) has no Qwen3-MoE"),
        (QWEN2_MOE.replace("--moe-shared-expert-gate", ""), "without --moe-shared-expert-gate"),
    ],
    ids=["sigmoid", "topk_scaling", "shared_expert_with_qk_norm", "capacity", "ungated_shared_expert"],
)
def test_export_refuses_what_qwen_moe_cannot_express(tmp_path, extra, message):
    model = _ours(extra)
    save_checkpoint(tmp_path / "ckpt", 1, model, None, None, model.config, None, consumed_train_samples=0)
    with pytest.raises(UserError) as err:
        export_to_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "hf").exists()


def test_import_refuses_a_sliding_window(tmp_path):
    hf = _hf("Qwen3Moe", use_sliding_window=True, sliding_window=8)
    hf.save_pretrained(str(tmp_path / "hf"))
    with pytest.raises(UserError, match="cannot import this Qwen3MoeForCausalLM: use_sliding_window"):
        import_from_hf(tmp_path / "hf", tmp_path / "ckpt")
