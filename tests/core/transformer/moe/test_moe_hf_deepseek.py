"""Multi-latent attention + MoE models <-> HuggingFace DeepseekV3ForCausalLM: the same logits both ways, and
HF's greedy generate writes the tokens tools/generate.py writes (KV cache) on the same weights."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from megatron_lite.arguments import parse_config
from megatron_lite.convert import deepseek, export_to_hf
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
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.7,
    "mscale_all_dim": 0.9,
}
# Three layers, the first dense; 8 experts in 4 groups, 2 groups per token, top-4 (2 per group, HF's rule);
# q lora on; a shared expert; YaRN with mscale.
HF_V3 = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    first_k_dense_replace=1,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=12,
    max_position_embeddings=64,
    rope_parameters=YARN,
    num_mtp_layers=0,
    eos_token_id=EOD,
    bos_token_id=EOD,
)
OURS = (
    "--multi-latent-attention --q-lora-rank 12 --kv-lora-rank 8 --qk-head-dim 8 --qk-pos-emb-head-dim 4 "
    "--v-head-dim 8 --qk-layernorm --norm-epsilon 1e-6 --position-embedding-type rope --normalization RMSNorm "
    "--swiglu --disable-bias-linear --untie-embeddings-and-output-weights --tokenizer-type NullTokenizer "
    "--num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 16 --moe-layer-freq ([0]*1+[1]*2) "
    "--moe-router-score-function sigmoid --moe-shared-expert-intermediate-size 32 "
    "--moe-router-topk-scaling-factor 1.5 --rope-type yarn --rotary-scaling-factor 2 --mscale-all-dim 1"
)


def _perturb(model: torch.nn.Module) -> None:
    with torch.no_grad():  # away from init (HF's router and correction bias start at zero)
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
        for name, buffer in model.named_buffers():
            if name.endswith(("e_score_correction_bias", "expert_bias")):
                buffer.copy_(0.1 * torch.randn_like(buffer))


def _hf(**overrides) -> torch.nn.Module:
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**{**HF_V3, **overrides})).eval()
    _perturb(model)
    return model


def _ours(extra: str) -> GPTModel:
    flags = tiny_flags(micro_batch_size=1, vocab_size=VOCAB, train_iters=1, num_layers=3) + extra.split()
    model = GPTModel(parse_config(flags).finalize(1)).eval()
    _perturb(model)
    return model


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(5))


def _hf_logits(hf: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids).logits[0]


def _our_logits(model: GPTModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)[0, :, :VOCAB]


def _hf_greedy(hf: torch.nn.Module) -> list[int]:
    with torch.no_grad():  # an explicit mask: HF would otherwise mask prompt ids equal to pad_token_id
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


def test_deepseek_v3_import_then_export_keeps_hf_logits_and_greedy_tokens(tmp_path):
    torch.manual_seed(0)
    hf = _hf()
    hf.save_pretrained(str(tmp_path / "hf"))
    result = import_from_hf(tmp_path / "hf", tmp_path / "ckpt", tokenizer_type="NullTokenizer")
    cfg = result.config
    assert result.architecture == "DeepseekV3ForCausalLM"
    expected = dict(
        multi_latent_attention=True,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_head_dim=8,
        qk_pos_emb_head_dim=8,
        v_head_dim=12,
        rope_type="yarn",
        rotary_scaling_factor=4.0,
        mscale=0.7,
        mscale_all_dim=0.9,
        num_experts=8,
        moe_router_topk=4,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=2.5,
        moe_router_num_groups=4,
        moe_router_group_topk=2,
        moe_shared_expert_intermediate_size=16,
        moe_layer_freq=[0, 1, 1],
        ffn_hidden_size=48,
    )
    assert {name: getattr(cfg, name) for name in expected} == expected
    assert (
        "--multi-latent-attention" in result.model_flags and "--moe-router-num-groups" in result.model_flags
    )

    model, _, _ = load_model_for_inference(str(tmp_path / "ckpt"))
    torch.testing.assert_close(
        model.decoder.layers[1].mlp.router.expert_bias, hf.model.layers[1].mlp.gate.e_score_correction_bias
    )
    ids = _ids()
    theirs, ours = _hf_logits(hf, ids), _our_logits(model, ids)
    assert ours.abs().max() > 1.0
    assert (theirs - ours).abs().max().item() < 1e-4
    ours_tokens = _generate_py_greedy(tmp_path / "ckpt")
    assert ours_tokens == _hf_greedy(hf) and len(ours_tokens) >= 4

    # And back: the exported directory is the same DeepseekV3ForCausalLM.
    assert export_to_hf(tmp_path / "ckpt", tmp_path / "back").architecture == "DeepseekV3ForCausalLM"
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"), local_files_only=True)
    keys = ("n_group", "topk_group", "first_k_dense_replace", "routed_scaling_factor", "n_shared_experts")
    assert {k: getattr(again.config, k) for k in keys} == {k: getattr(hf.config, k) for k in keys}
    assert (_hf_logits(again.eval(), ids) - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    "overrides",
    [
        # HF rotating its rope rows as stored (half against half): the import interleaves them.
        pytest.param(
            dict(rope_interleave=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
            id="rope_not_interleaved",
        ),
        # No q lora (linear_q_proj), no group limit, no shared expert, top-1 (no renormalisation).
        pytest.param(
            dict(q_lora_rank=None, n_group=1, topk_group=1, n_shared_experts=0, num_experts_per_tok=1,
                 norm_topk_prob=False, routed_scaling_factor=1.0, first_k_dense_replace=0),
            id="plain_routing",
        ),
    ],
)  # fmt: skip
def test_deepseek_v3_import_variants_keep_the_logits(tmp_path, overrides):
    torch.manual_seed(1)
    hf = _hf(**overrides)
    hf.save_pretrained(str(tmp_path / "hf"))
    import_from_hf(tmp_path / "hf", tmp_path / "ckpt", tokenizer_type="NullTokenizer")
    model, _, _ = load_model_for_inference(str(tmp_path / "ckpt"))
    ids = _ids()
    assert (_hf_logits(hf, ids) - _our_logits(model, ids)).abs().max().item() < 1e-4


def test_export_of_a_trained_mla_moe_model_gives_its_logits_and_greedy_tokens(tmp_path):
    torch.manual_seed(0)
    model = _ours(OURS)  # trained without --moe-router-enable-expert-bias: HF's correction bias is zero
    save_checkpoint(tmp_path / "ckpt", 3, model, None, None, model.config, None, consumed_train_samples=0)
    export_to_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    config = hf.config
    assert (config.first_k_dense_replace, config.n_shared_experts, config.routed_scaling_factor) == (
        1,
        2,
        1.5,
    )
    assert config.rope_parameters["rope_type"] == "yarn" and config.rope_interleave
    ids = _ids()
    theirs, ours = _hf_logits(hf, ids), _our_logits(model, ids)
    assert ours.abs().max() > 1.0
    assert (theirs - ours).abs().max().item() < 1e-4
    assert _generate_py_greedy(tmp_path / "ckpt") == _hf_greedy(hf)


def test_dense_mla_model_exports_as_all_dense_layers_and_imports_back_dense(tmp_path):
    torch.manual_seed(2)
    model = _ours(OURS.split("--num-experts")[0])  # no MoE flags: every layer dense
    save_checkpoint(tmp_path / "ckpt", 1, model, None, None, model.config, None, consumed_train_samples=0)
    export_to_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    assert hf.config.first_k_dense_replace == 3
    ids = _ids()
    assert (_hf_logits(hf, ids) - _our_logits(model, ids)).abs().max().item() < 1e-4
    assert import_from_hf(tmp_path / "hf", tmp_path / "back").config.num_experts is None


@pytest.mark.parametrize(
    "change, message",
    [
        ("--moe-router-score-function softmax", "router is sigmoid"),
        ("--moe-layer-freq [0,1,0]", "first first_k_dense_replace"),
        ("--moe-router-num-groups 2 --moe-router-group-topk 2", "2 x --moe-router-group-topk"),
        ("--norm-epsilon 1e-5", "latent norms use 1e-06"),
        ("--moe-shared-expert-gate", "ungated"),
    ],
)
def test_export_refuses_what_deepseek_v3_cannot_express(change, message):
    flags = tiny_flags(micro_batch_size=1, vocab_size=VOCAB, train_iters=1, num_layers=3)
    cfg = parse_config(flags + OURS.split() + change.split()).finalize(1)
    with pytest.raises(UserError, match="cannot export to DeepseekV3ForCausalLM") as err:
        deepseek.check_exportable(cfg, transformers)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(norm_topk_prob=False), "norm_topk_prob False"),
        (dict(n_group=4, topk_group=1), "not 2 x topk_group"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(rms_norm_eps=1e-5), "rms_norm_eps"),
        (dict(rope_parameters={**YARN, "original_max_position_embeddings": 2048}), "original_max_position"),
    ],
)
def test_import_refuses_what_megatron_lite_cannot_compute(overrides, message):
    config = transformers.DeepseekV3Config(**{**HF_V3, **overrides})
    with pytest.raises(UserError, match="cannot import this DeepseekV3ForCausalLM") as err:
        deepseek.config_from_hf(config)
    assert message in str(err.value)
