"""megatron-core's MLASelfAttention as a reference, run in its own process (CUDA patches, a process group).

Usage: python mcore_mla_reference.py IN.pt OUT.pt. IN holds "cases": each an MLATransformerConfig's kwargs,
weights by megatron-core's names (local spec), an input [s, b, h] and an output gradient. OUT holds, per
case, megatron-core's output, input gradient and weight gradients.
"""

from __future__ import annotations

import os
import socket
import sys
import warnings

import torch

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


class CausalCoreAttention(torch.nn.Module):
    """Core attention for MLA's different key and value head sizes: megatron-core 0.16's local
    DotProductAttention takes no k_channels/v_channels (its MLA needs Transformer Engine's), so this plain
    causal softmax(q k^T * softmax_scale) v stands in, with the scale megatron-core's MLA hands it."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, softmax_scale=None, **kwargs):
        super().__init__()
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask, **kwargs):
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.softmax_scale
        s = scores.shape[-1]
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        out = torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)  # [b, heads, s, dv]
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)


def attention_case(case: dict) -> dict:
    """megatron-core's MLASelfAttention (local spec, unfused RoPE) with the given weights, one step."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import MLATransformerConfig, multi_latent_attention
    from megatron.core.transformer.spec_utils import build_module

    # This environment's megatron-core reports Transformer Engine (HAVE_TE) without its classes (None);
    # the MLA module would pass None to isinstance. The local spec uses none of them.
    multi_latent_attention.HAVE_TE = False

    kwargs = dict(case["config"])
    config = MLATransformerConfig(
        use_cpu_initialization=True,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        add_bias_linear=False,
        **kwargs,
    )
    spec = get_gpt_layer_local_spec(
        qk_layernorm=config.qk_layernorm, multi_latent_attention=True, normalization=config.normalization
    )
    spec.submodules.self_attention.submodules.core_attention = CausalCoreAttention
    attention = build_module(spec.submodules.self_attention, config=config, layer_number=1)
    missing, unexpected = attention.load_state_dict(case["weights"], strict=False)
    missing = [k for k in missing if "_extra_state" not in k]
    assert not missing and not unexpected, (missing, unexpected)
    x = case["input"].clone().requires_grad_(True)
    output, bias = attention(x, attention_mask=None)
    assert bias is None
    output.backward(case["grad"])
    return {
        "output": output.detach(),
        "input_grad": x.grad,
        "grads": {n: p.grad for n, p in attention.named_parameters() if p.grad is not None},
        "softmax_scale": float(attention.softmax_scale),
    }


def main() -> None:
    spec = torch.load(sys.argv[1], weights_only=True)
    _setup()
    torch.save({"cases": [attention_case(c) for c in spec["cases"]]}, sys.argv[2])


if __name__ == "__main__":
    main()
