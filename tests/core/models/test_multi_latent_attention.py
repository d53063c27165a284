"""Multi-latent attention against megatron-core 0.16's MLASelfAttention, its KV cache against the full forward,
TP=2 (with and without sequence parallelism) against one process, its softmax scale and its config checks."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "gpt"))  # gpt_helpers, next to the GPT tests

from dist_utils import run_distributed  # noqa: E402
from gpt_helpers import LLAMA_STYLE, batch, make_config, train_and_gather  # noqa: E402

from megatron_lite.core.models.gpt import GPTModel  # noqa: E402
from megatron_lite.core.models.gpt.multi_latent_attention import (  # noqa: E402
    MLASelfAttention,
    mla_softmax_scale,
)
from megatron_lite.core.tensor_parallel import gather_from_tensor_model_parallel_region  # noqa: E402
from megatron_lite.errors import UserError  # noqa: E402
from megatron_lite.parallel_state import initialize_parallel  # noqa: E402
from tests.helpers import run_python  # noqa: E402

HERE = Path(__file__).parent

# DeepSeek-V2-Lite's attention (no query low rank, YaRN factor 40, mscale 0.707) and V3's (a query low rank),
# shrunk to h=32, 4 heads.
_MLA_BASE = dict(
    LLAMA_STYLE,
    group_query_attention=False,
    num_query_groups=1,
    multi_latent_attention=True,
    kv_lora_rank=12,
    qk_head_dim=6,
    qk_pos_emb_head_dim=8,
    v_head_dim=5,
    qk_layernorm=True,
)
V2_LITE = dict(_MLA_BASE, rotary_scaling_factor=40.0, mscale=0.707, mscale_all_dim=0.707)
V3 = dict(V2_LITE, q_lora_rank=10, mscale=1.0, mscale_all_dim=1.0)
PLAIN_ROPE = dict(_MLA_BASE, q_lora_rank=10, qk_layernorm=False, rope_type="rope", rotary_base=500)
CASES = {"v2-lite": V2_LITE, "v3": V3, "plain-rope": PLAIN_ROPE}


def _mcore_kwargs(cfg) -> dict:
    """The MLATransformerConfig of cfg's attention."""
    names = (
        "hidden_size",
        "num_attention_heads",
        "q_lora_rank",
        "kv_lora_rank",
        "qk_head_dim",
        "qk_pos_emb_head_dim",
        "v_head_dim",
        "rope_type",
        "rotary_base",
        "rotary_scaling_factor",
        "mscale",
        "mscale_all_dim",
        "normalization",
        "layernorm_epsilon",
        "qk_layernorm",
    )
    return {"num_layers": 1, **{name: getattr(cfg, name) for name in names}}


@pytest.fixture(scope="module")
def mcore(tmp_path_factory):
    """Ours and megatron-core's attention on the same weights, input and output gradient, per case."""
    if importlib.util.find_spec("megatron") is None:
        pytest.skip("needs megatron-core")
    tmp = tmp_path_factory.mktemp("mcore_mla")
    cases, ours = [], []
    for i, overrides in enumerate(CASES.values()):
        cfg = make_config(seq_length=12, init_method_std=0.3, **overrides)  # outputs of order 1
        torch.manual_seed(i)
        attention = MLASelfAttention(cfg, 0)
        with torch.no_grad():  # norms away from 1, so that their gradients and effect are seen
            for name, param in attention.named_parameters():
                if "layernorm" in name:
                    param.uniform_(0.5, 1.5)
        gen = torch.Generator().manual_seed(100 + i)
        x = torch.randn(12, 2, cfg.hidden_size, generator=gen)
        grad = torch.randn(12, 2, cfg.hidden_size, generator=gen)
        weights = {k: v.clone() for k, v in attention.state_dict().items()}
        cases.append({"config": _mcore_kwargs(cfg), "weights": weights, "input": x, "grad": grad})
        x = x.clone().requires_grad_(True)
        out = attention(x)
        out.backward(grad)
        grads = {n: p.grad for n, p in attention.named_parameters()}
        ours.append({"output": out.detach(), "input_grad": x.grad, "grads": grads, "cfg": cfg})
    torch.save({"cases": cases}, tmp / "in.pt")
    proc = run_python([HERE / "mcore_mla_reference.py", tmp / "in.pt", tmp / "out.pt"], tmp, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ours, torch.load(tmp / "out.pt", weights_only=True)["cases"]


@pytest.mark.slow  # megatron-core's import alone takes ~10 s
def test_attention_and_gradients_equal_megatron_core(mcore):
    ours, theirs = mcore
    for name, mine, ref in zip(CASES, ours, theirs):
        assert ref["softmax_scale"] == pytest.approx(mla_softmax_scale(mine["cfg"]), rel=1e-12), name
        torch.testing.assert_close(mine["output"], ref["output"], atol=1e-5, rtol=0, msg=name)
        torch.testing.assert_close(mine["input_grad"], ref["input_grad"], atol=1e-5, rtol=0, msg=name)
        assert set(mine["grads"]) == set(ref["grads"]), name
        for key, grad in ref["grads"].items():
            torch.testing.assert_close(mine["grads"][key], grad, atol=1e-5, rtol=0, msg=f"{name} {key}")


def test_softmax_scale_is_megatrons_formula():
    cfg = make_config(**V2_LITE)
    mscale = 0.1 * 0.707 * math.log(40.0) + 1.0
    assert mla_softmax_scale(cfg) == pytest.approx(mscale**2 / math.sqrt(6 + 8), rel=1e-12)
    assert mla_softmax_scale(make_config(**PLAIN_ROPE)) == pytest.approx(1 / math.sqrt(14), rel=1e-12)


@pytest.mark.parametrize("name", ["v2-lite", "v3"])
def test_kv_cache_decoding_equals_full_forward(name):
    cfg = make_config(**CASES[name])
    model = GPTModel(cfg).eval()
    tokens, _ = batch(cfg)
    with torch.no_grad():
        expected = model(tokens)
        cache = model.init_kv_cache(2, cfg.seq_length)
        steps = [model(tokens[:, :6], kv_cache=cache)]
        steps += [model(tokens[:, t : t + 1], kv_cache=cache) for t in range(6, cfg.seq_length)]
    torch.testing.assert_close(torch.cat(steps, 1), expected, atol=2e-5, rtol=0)


TP_CASES = {
    "v3": V3,
    "v3-sequence-parallel": dict(V3, sequence_parallel=True),
    "v2-lite-sequence-parallel": dict(V2_LITE, sequence_parallel=True),
    "plain-rope": PLAIN_ROPE,
}


def _tp_worker(rank, world_size):
    pstate = initialize_parallel(2, device="cpu")
    results = {}
    for name, overrides in TP_CASES.items():
        cfg = make_config(world_size=2, tensor_model_parallel_size=2, **overrides)
        results[name] = train_and_gather(GPTModel(cfg, pstate), cfg, pstate.tp_group)
    cfg = make_config(world_size=2, tensor_model_parallel_size=2, **V3)
    model = GPTModel(cfg, pstate).eval()
    tokens, _ = batch(cfg)
    with torch.no_grad():
        cache = model.init_kv_cache(2, cfg.seq_length)
        steps = [model(tokens[:, :6], kv_cache=cache)]
        steps += [model(tokens[:, t : t + 1], kv_cache=cache) for t in range(6, cfg.seq_length)]
        results["kv_cache_logits"] = gather_from_tensor_model_parallel_region(
            torch.cat(steps, 1), pstate.tp_group
        )
    return results


def test_tensor_parallel_equals_one_process():
    results = run_distributed(_tp_worker, 2)
    for name, overrides in TP_CASES.items():
        cfg = make_config(**{k: v for k, v in overrides.items() if k != "sequence_parallel"})
        want = train_and_gather(GPTModel(cfg), cfg, None)
        for got in (r[name] for r in results):
            torch.testing.assert_close(got["loss"], want["loss"], atol=1e-5, rtol=0, msg=name)
            torch.testing.assert_close(got["logits"][..., :257], want["logits"], atol=1e-5, rtol=0, msg=name)
            for key, grad in want["grads"].items():
                torch.testing.assert_close(
                    got["grads"][key][: grad.shape[0]], grad, atol=1e-5, rtol=0, msg=key
                )
    cfg = make_config(**V3)
    with torch.no_grad():
        expected = GPTModel(cfg).eval()(batch(cfg)[0])
    torch.testing.assert_close(results[0]["kv_cache_logits"][..., :257], expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(rope_type="yarn"), "--rope-type yarn needs --multi-latent-attention"),
        (dict(V3, group_query_attention=True, num_query_groups=2), "--group-query-attention and"),
        (dict(V3, rotary_interleaved=True), "--rotary-interleaved does not work"),
        (dict(V3, qk_pos_emb_head_dim=7), "--qk-pos-emb-head-dim 7"),
        (dict(V3, kv_lora_rank=0), "--kv-lora-rank"),
    ],
)
def test_bad_mla_settings_are_one_line(overrides, message):
    with pytest.raises(UserError, match=message):
        make_config(**overrides)


def test_checkpoint_round_trips_under_megatrons_mla_keys(tmp_path):
    """An MLA model with Adam moments saved in Megatron's torch_dist layout loads back exactly (into a model
    from another seed), its latent norms under Transformer Engine's fused names as Megatron-LM stores them."""
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_lite.parallel_state import ParallelState
    from megatron_lite.training.checkpointing import load_checkpoint, load_saved_config, save_checkpoint
    from megatron_lite.training.optimizer import build_optimizer

    cfg = make_config(**V3, save=str(tmp_path), save_interval=1, lr=1e-3)
    model = GPTModel(cfg)
    optimizer = build_optimizer(model, cfg, ParallelState())
    tokens, labels = batch(cfg)
    model(tokens, labels=labels).mean().backward()
    optimizer.step()
    save_checkpoint(tmp_path, 1, model, optimizer, None, cfg, ParallelState(), consumed_train_samples=2)
    keys = set(FileSystemReader(str(tmp_path / "iter_0000001")).read_metadata().state_dict_metadata)
    attention = "decoder.layers.self_attention."
    for stored in ("linear_q_up_proj.layer_norm_weight", "linear_kv_up_proj.layer_norm_weight",
                   "linear_q_down_proj.weight", "linear_kv_down_proj.weight", "linear_kv_up_proj.weight"):  # fmt: skip
        assert attention + stored in keys, stored
    assert "decoder.layers.input_layernorm.weight" in keys
    saved = load_saved_config(tmp_path)
    assert (saved.multi_latent_attention, saved.q_lora_rank, saved.rope_type) == (True, 10, "yarn")

    other = make_config(**dict(V3, seed=99), lr=1e-3)
    restored = GPTModel(other)
    restored_optimizer = build_optimizer(restored, other, ParallelState())
    load_checkpoint(tmp_path, restored, restored_optimizer, None, other, ParallelState())
    for (name, want), got in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(got, want), name
    for param, twin in zip(model.parameters(), restored.parameters()):
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(restored_optimizer.state[twin][moment], optimizer.state[param][moment])


def _megatron_mla_flops(args, batch_size: int) -> float:
    """megatron/training/training.py num_floating_point_operations, its MLA branch and dense SwiGLU MLP
    (no MoE, no MTP), written out as Megatron-LM's main computes it."""
    fwd_bwd, fma, ffn_expansion = 3, 2, 3
    if args.q_lora_rank is None:
        q_term = args.hidden_size * args.num_attention_heads * (args.qk_head_dim + args.qk_pos_emb_head_dim)
    else:
        q_term = args.q_lora_rank * (
            args.hidden_size + args.num_attention_heads * (args.qk_head_dim + args.qk_pos_emb_head_dim) + 1
        )
    self_attn = (
        fwd_bwd
        * fma
        * (
            q_term
            + args.kv_lora_rank
            * (args.hidden_size + args.num_attention_heads * (args.qk_head_dim + args.v_head_dim) + 1)
            + args.hidden_size * args.qk_pos_emb_head_dim
            + (args.num_attention_heads * args.v_head_dim) * args.hidden_size
        )
    )
    core = (
        fwd_bwd
        * fma
        * (
            args.num_attention_heads * (args.qk_head_dim + args.qk_pos_emb_head_dim) / 2
            + args.num_attention_heads * args.v_head_dim / 2
        )
    )
    tokens, squares = batch_size * args.seq_length, batch_size * args.seq_length**2
    return (
        tokens
        * (
            fwd_bwd * fma * args.hidden_size * (args.ffn_hidden_size * ffn_expansion) * args.num_layers
            + self_attn * args.num_layers
            + fwd_bwd * fma * args.hidden_size * args.padded_vocab_size
        )
        + squares * core * args.num_layers
    )


@pytest.mark.parametrize("q_lora_rank", [None, 1536])
def test_flops_are_megatrons_mla_formula(q_lora_rank):
    from megatron_lite.config import MegatronConfig
    from megatron_lite.training.flops import num_floating_point_operations

    # DeepSeek-V2-Lite's attention and dense MLP sizes (27 dense layers), V3's query low rank.
    cfg = MegatronConfig(
        micro_batch_size=1, train_iters=1, lr=1e-4, mock_data=True, num_layers=27, hidden_size=2048,
        num_attention_heads=16, ffn_hidden_size=10944, swiglu=True, seq_length=4096, multi_latent_attention=True,
        q_lora_rank=q_lora_rank, kv_lora_rank=512, qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128,
        qk_layernorm=True, position_embedding_type="rope", normalization="RMSNorm",
    ).finalize(world_size=1, vocab_size=102400)  # fmt: skip
    assert num_floating_point_operations(cfg, 8) == pytest.approx(_megatron_mla_flops(cfg, 8), rel=1e-12)


@pytest.mark.parametrize("name", ["v2-lite", "v3", "plain-rope"])
def test_parameter_count_is_the_models(name):
    from megatron_lite.model_stats import count_parameters

    cfg = make_config(**CASES[name])
    counts = count_parameters(cfg)
    assert counts.total == sum(p.numel() for p in GPTModel(cfg).parameters())


def test_selective_recompute_with_attention_dropout_replays_the_same_gradients():
    from gpt_helpers import full_state

    grads = {}
    for recompute in (False, True):
        cfg = make_config(**V3, attention_dropout=0.2, recompute_activations=recompute)
        model = GPTModel(cfg)
        tokens, labels = batch(cfg)
        torch.manual_seed(0)
        model(tokens, labels=labels).mean().backward()
        grads[recompute] = full_state(model, None, grads=True)
    for key, grad in grads[False].items():
        assert torch.equal(grads[True][key], grad), key
