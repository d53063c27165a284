"""The MoE layer on one process: grouped GEMM = expert loop, experts by global index, the aux-loss gradient
scale, aux-loss-free bias updates, and the MoE losses in Megatron's log line."""

from __future__ import annotations

import re

import pytest
import torch

from megatron_lite.core.transformer.moe import aux_losses
from megatron_lite.core.transformer.moe.experts import Experts
from megatron_lite.core.transformer.moe.moe_layer import MoELayer
from megatron_lite.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron_lite.core.transformer.moe.training import update_expert_bias
from megatron_lite.training.training import pretrain
from tests.helpers import tiny_config

MOE = dict(
    num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16, swiglu=True, add_bias_linear=False,
    hidden_dropout=0.0, attention_dropout=0.0,
)  # fmt: skip


def _run(layer: MoELayer, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, dict]:
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    out = layer(x)
    out.backward(grad)
    return out.detach(), {"x": x.grad, **{n: p.grad.clone() for n, p in layer.named_parameters()}}


def test_grouped_gemm_equals_expert_loop():
    torch.manual_seed(0)
    x, grad = torch.randn(8, 2, 32), torch.randn(8, 2, 32)
    # A large init std: outputs of order 1, so the tolerance is a relative one.
    loop = MoELayer(tiny_config(**MOE, init_method_std=0.5), 0)
    grouped = MoELayer(tiny_config(**MOE, init_method_std=0.5, moe_grouped_gemm=True), 0)
    grouped.load_state_dict(loop.state_dict())
    out_loop, grads_loop = _run(loop, x, grad)
    out_grouped, grads_grouped = _run(grouped, x, grad)
    assert out_loop.abs().max() > 1.0
    torch.testing.assert_close(out_grouped, out_loop, rtol=0, atol=1e-5)
    for name, g in grads_loop.items():
        torch.testing.assert_close(grads_grouped[name], g, rtol=1e-5, atol=1e-5, msg=name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = grouped(x)
    assert bf16.dtype == torch.bfloat16
    scale = out_loop.abs().max().item()
    torch.testing.assert_close(bf16.float(), out_loop, rtol=0, atol=0.03 * scale)


def test_experts_are_named_and_drawn_by_global_index():
    """An EP rank holding experts 2 and 3 gets exactly the one-process model's experts 2 and 3."""
    cfg = tiny_config(**MOE)
    torch.manual_seed(5)
    full = Experts(cfg, 4, 0)
    torch.manual_seed(5)
    second_half = Experts(cfg, 2, 2)
    assert list(second_half.state_dict()) == [
        k for k in full.state_dict() if k.startswith(("local_experts.2", "local_experts.3"))
    ]
    for name, value in second_half.state_dict().items():
        assert torch.equal(value, full.state_dict()[name])
    # Expert-TP slices: SwiGLU's gate and up halves of the ffn dimension stay paired.
    torch.manual_seed(5)
    half_ffn = Experts(cfg, 4, 0, etp_rank=1, etp_size=2)
    w1 = full.local_experts["0"].linear_fc1.weight
    torch.testing.assert_close(
        half_ffn.local_experts["0"].linear_fc1.weight, torch.cat([w1[8:16], w1[24:32]])
    )


def test_aux_loss_gradient_follows_the_main_loss_scale():
    cfg = tiny_config(**MOE, moe_aux_loss_coeff=0.5, moe_z_loss_coeff=0.1)
    layer = MoELayer(cfg, 0)
    x = torch.randn(8, 2, 32)
    zero = torch.zeros(8, 2, 32)  # no lm-loss gradient: the router's gradient is the aux losses' alone
    grads = []
    for scale in (1.0, 0.25):
        MoEAuxLossAutoScaler.set_loss_scale(scale)
        grads.append(_run(layer, x, zero)[1]["router.weight"])
    MoEAuxLossAutoScaler.set_loss_scale(1.0)
    aux_losses.clear()
    assert grads[0].abs().max() > 1e-4
    torch.testing.assert_close(grads[1], grads[0] * 0.25)


def test_expert_bias_moves_towards_balance():
    cfg = tiny_config(**{**MOE, "add_bias_linear": False}, moe_router_score_function="sigmoid",
                      moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.01)  # fmt: skip
    layer = MoELayer(cfg, 0)
    layer.router.local_tokens_per_expert.copy_(torch.tensor([10.0, 2.0, 4.0, 4.0]))
    update_expert_bias(layer, cfg, None, None)
    torch.testing.assert_close(layer.router.expert_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    assert layer.router.local_tokens_per_expert.sum() == 0


def test_log_line_shows_moe_losses():
    cfg = tiny_config(
        **MOE, moe_aux_loss_coeff=0.01, moe_z_loss_coeff=1e-3, train_iters=2, log_interval=1, global_batch_size=4,
        eval_iters=0, vocab_size=None,
    )  # fmt: skip
    cfg.vocab_size = 257
    result = pretrain(cfg)
    line = result.log_lines[-1]
    values = {k: float(v) for k, v in re.findall(r" (load_balancing_loss|z_loss): (\S+) \|", line)}
    assert set(values) == {"load_balancing_loss", "z_loss"}
    # Switch loss / coeff is 1 for perfectly balanced routing and at most num_experts / topk.
    assert 0.99 < values["load_balancing_loss"] < 2.0
    assert values["z_loss"] > 0


def test_full_recompute_keeps_losses_and_logged_values():
    """Recompute reruns the routers in backward: the curve is unchanged and nothing is logged twice."""

    def run(**extra):
        cfg = tiny_config(
            **MOE, moe_aux_loss_coeff=0.1, moe_z_loss_coeff=1e-2, train_iters=3, log_interval=3,
            global_batch_size=4, eval_iters=0, lr_warmup_iters=0, **extra,
        )  # fmt: skip
        result = pretrain(cfg)
        return [v for _, v in result.losses], result.log_lines[-1].split("lm loss")[1].split("| loss scale")[
            0
        ]

    plain = run()
    recomputed = run(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    assert recomputed == plain


def test_tokens_per_expert_counts_every_routed_token():
    from megatron_lite.core.transformer.moe.training import tokens_per_expert

    layer = MoELayer(tiny_config(**MOE), 0)
    layer(torch.randn(8, 2, 32))
    counts = tokens_per_expert(layer)[0]
    assert counts.shape == (4,) and int(counts.sum()) == 8 * 2 * 2  # tokens x top-k, none dropped


def test_tensorboard_gets_moe_losses_and_per_layer_values(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(
        **MOE, moe_aux_loss_coeff=0.01, moe_z_loss_coeff=1e-3, train_iters=3, log_interval=3, global_batch_size=4,
        eval_iters=0, lr_warmup_iters=0, tensorboard_dir=str(tmp_path), moe_per_layer_logging=True,
    )  # fmt: skip
    result = pretrain(cfg)
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    per_layer = {f"moe/{n}_layer_{i}" for n in ("load_balancing_loss", "z_loss") for i in range(2)}
    assert {"load_balancing_loss", "z_loss"} | per_layer <= tags
    total = [e.value for e in events.Scalars("load_balancing_loss")]
    layers = [[e.value for e in events.Scalars(f"moe/load_balancing_loss_layer_{i}")] for i in range(2)]
    assert len(total) == 3
    for step in range(3):  # the logged value is the mean over the MoE layers
        assert total[step] == pytest.approx((layers[0][step] + layers[1][step]) / 2, rel=1e-6)
    shown = float(re.search(r"load_balancing_loss: (\S+) \|", result.log_lines[-1]).group(1))
    assert shown == pytest.approx(sum(total) / 3, rel=1e-5)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"add_bias_linear": True, "swiglu": False, "moe_layer_freq": "([0]+[1])"},
        {"moe_shared_expert_intermediate_size": 24, "moe_shared_expert_gate": True},
    ],
)
def test_total_and_active_parameter_counts(extra):
    from megatron_lite.core.models.gpt import GPTModel
    from megatron_lite.core.transformer.moe.stats import moe_parameter_counts
    from megatron_lite.model_stats import count_parameters

    cfg = tiny_config(**{**MOE, **extra})
    model = GPTModel(cfg)
    counts = moe_parameter_counts(cfg, count_parameters(cfg).total)
    assert counts.total == sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert counts.routed_experts == experts
    assert counts.total - counts.active == experts // cfg.num_experts * (
        cfg.num_experts - cfg.moe_router_topk
    )
