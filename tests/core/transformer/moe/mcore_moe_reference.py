"""megatron-core's MoE as a reference, run in its own process (it needs CUDA patches and a process group).

Usage: python mcore_moe_reference.py IN.pt OUT.pt. IN holds "router_cases" (logits and routing options
for megatron.core.transformer.moe.moe_utils) and "layer" (a TransformerConfig's MoE kwargs, weights by
megatron-core's names, an input and an output gradient). OUT holds megatron-core's results for each.
"""

from __future__ import annotations

import os
import socket
import sys
import warnings

import torch
import torch.nn.functional as F

# megatron-core on CPU: it asks for the current CUDA device for buffers; there is none here.
torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]
warnings.filterwarnings("ignore")


def _setup() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234, inference_rng_tracker=True)
    from megatron.core.transformer.moe import moe_utils

    # 0.16.1 without Transformer Engine leaves this name undefined; None selects its torch.mm path.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def router_case(case: dict) -> dict:
    """megatron-core's routing functions on the case's logits."""
    from megatron.core.transformer.moe import moe_utils as mu

    logits, topk, opts = case["logits"], case["topk"], case["opts"]
    probs, routing_map = mu.topk_routing_with_score_function(logits, topk, **opts)
    out = {"probs": probs, "routing_map": routing_map}
    if case.get("capacity_factor") is not None:
        out["drop_probs"], out["drop_map"] = mu.apply_router_token_dropping(
            probs,
            routing_map,
            router_topk=topk,
            capacity_factor=case["capacity_factor"],
            drop_policy=case["drop_policy"],
            pad_to_capacity=case["pad_to_capacity"],
        )
    score_function = opts.get("score_function", "softmax")
    aux_map, scores = mu.compute_routing_scores_for_aux_loss(logits, topk, score_function)
    e = logits.shape[1]
    out["aux_loss"] = mu.switch_load_balancing_loss_func(
        scores, aux_map.sum(0), logits.shape[0], topk, e, 1.0
    )
    seq = case["seq_length"]
    bsz = logits.shape[0] // seq
    seq_scores, seq_map = scores.reshape(seq, -1), aux_map.reshape(seq, -1)
    out["seq_aux_loss"] = (
        mu.switch_load_balancing_loss_func(seq_scores, seq_map.sum(0), seq, topk, e, 1.0) / bsz
    )
    out["z_loss"] = mu.z_loss_func(logits, 1.0)
    return out


def layer_case(case: dict) -> dict:
    """megatron-core's MoELayer (local spec, allgather dispatcher) with the given weights, one step."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.moe import moe_utils as mu
    from megatron.core.transformer.moe.moe_layer import MoELayer

    kwargs = dict(case["config"])
    if kwargs.pop("swiglu", False):
        kwargs.update(gated_linear_unit=True, activation_func=F.silu, bias_activation_fusion=False)
    config = TransformerConfig(use_cpu_initialization=True, moe_token_dispatcher_type="allgather", **kwargs)
    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False)
    layer = MoELayer(config, spec.submodules.mlp.submodules, layer_number=1)
    layer.set_layer_number(1)
    missing, unexpected = layer.load_state_dict(case["weights"], strict=False)
    missing = [k for k in missing if "expert_bias" not in k and "_extra_state" not in k]
    assert not missing and not unexpected, (missing, unexpected)
    layer.train()
    mu.MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    x = case["input"].clone().requires_grad_(True)
    output, _ = layer(x)
    output.backward(case["grad"])
    tracker = mu.get_moe_layer_wise_logging_tracker()
    result = {
        "output": output.detach(),
        "input_grad": x.grad,
        "grads": {n: p.grad for n, p in layer.named_parameters() if p.grad is not None},
        "tracker": {name: entry["values"].clone() for name, entry in tracker.items()},
    }
    mu.clear_aux_losses_tracker()
    return result


def main() -> None:
    spec = torch.load(sys.argv[1], weights_only=False)
    _setup()
    result = {"router_cases": [router_case(c) for c in spec.get("router_cases", [])]}
    if "layers" in spec:
        result["layers"] = [layer_case(c) for c in spec["layers"]]
    torch.save(result, sys.argv[2])


if __name__ == "__main__":
    main()
