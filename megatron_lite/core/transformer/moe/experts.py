"""The routed experts of one rank: per-expert MLPs (Megatron's SequentialMLP names), run as a loop or as
one grouped GEMM (torch._grouped_mm), each expert's output scaled by its routing probability."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.core.models.gpt.mlp import activation_func
from megatron_lite.core.tensor_parallel import init_method_normal, scaled_init_method_normal
from megatron_lite.core.tensor_parallel.utils import set_tensor_model_parallel_attributes, split_for_rank


class _ExpertLinear(nn.Module):
    """A plain weight [out, in] (and bias): experts communicate through the dispatcher, never inside."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        for p in self.parameters():
            p.allreduce = False  # Megatron's mark: reduced over the expert data-parallel group, not DP
            p.is_expert = True
            p.tensor_model_parallel = False  # (True when ETP shards it: the checkpoint layout of a TP shard)


class ExpertMLP(nn.Module):
    """One expert: fc2(act(fc1(x)) * p) + b2 * p, as Megatron's MLP with per_token_scale."""

    def __init__(self, fc1: _ExpertLinear, fc2: _ExpertLinear) -> None:
        super().__init__()
        self.linear_fc1 = fc1
        self.linear_fc2 = fc2


class Experts(nn.Module):
    """The num_local_experts experts this rank holds (global indices local_expert_indices), each with
    this expert-TP rank's slice of the ffn dimension (SwiGLU: matching gate and up halves, stride 2).

    Every rank draws the full weights of all experts in global order, so one seed gives the same model
    at any EP/ETP size. forward(tokens sorted by local expert [n, h], tokens_per_expert, probs [n]) ->
    [n, h], partial sums over the expert-TP group when ETP > 1 (the dispatcher reduces them).
    """

    def __init__(
        self, cfg, num_local_experts: int, local_offset: int, etp_rank: int = 0, etp_size: int = 1
    ) -> None:
        super().__init__()
        self.num_local_experts = num_local_experts
        self.activation_func = activation_func(cfg)
        self.glu = cfg.gated_linear_unit
        self.grouped_gemm = cfg.moe_grouped_gemm
        h, ffn = cfg.hidden_size, cfg.moe_ffn_hidden_size
        fc1_out = ffn * (2 if self.glu else 1)
        init1 = init_method_normal(cfg.init_method_std)
        init2 = scaled_init_method_normal(cfg.init_method_std, cfg.num_layers)
        bias = cfg.add_bias_linear
        # Keyed by GLOBAL expert index (Megatron names local_experts.{i} by local index, and its checkpoints
        # by global index): the same parameter name means the same expert at every EP size, so checkpoints
        # reshard between EP sizes like any replicated tensor. At EP 1 the names are Megatron's.
        self.local_experts = nn.ModuleDict()
        shard_over_tp = etp_size > 1  # ETP equals TP here (checked in the config): TP layout attributes
        for expert in range(cfg.num_experts):
            w1 = torch.empty(fc1_out, h)
            init1(w1)
            w2 = torch.empty(h, ffn)
            init2(w2)
            if not local_offset <= expert < local_offset + num_local_experts:
                continue
            w1 = split_for_rank(w1, 0, etp_rank, etp_size, stride=2 if self.glu else 1)
            w2 = split_for_rank(w2, 1, etp_rank, etp_size)
            # Megatron zero-initialises linear biases.
            b1 = torch.zeros(w1.shape[0]) if bias else None
            b2 = torch.zeros(h) if bias else None
            expert_mlp = ExpertMLP(_ExpertLinear(w1, b1), _ExpertLinear(w2, b2))
            if shard_over_tp:
                set_tensor_model_parallel_attributes(
                    expert_mlp.linear_fc1.weight, True, 0, stride=2 if self.glu else 1
                )
                set_tensor_model_parallel_attributes(expert_mlp.linear_fc2.weight, True, 1)
            self.local_experts[str(expert)] = expert_mlp

    def _scaled_activation(self, intermediate: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        dtype = intermediate.dtype
        return (self.activation_func(intermediate) * probs.unsqueeze(-1)).to(dtype)

    def forward(
        self, tokens: torch.Tensor, tokens_per_expert: list[int], probs: torch.Tensor
    ) -> torch.Tensor:
        if self.grouped_gemm and self._grouped_ok(tokens):
            return self._forward_grouped(tokens, tokens_per_expert, probs)
        outputs = []
        for expert, x, p in zip(
            self.local_experts.values(), tokens.split(tokens_per_expert), probs.split(tokens_per_expert)
        ):
            fc1, fc2 = expert.linear_fc1, expert.linear_fc2
            hidden = self._scaled_activation(F.linear(x, fc1.weight, fc1.bias), p)
            out = F.linear(hidden, fc2.weight)
            if fc2.bias is not None:
                out = out + (fc2.bias.unsqueeze(0) * p.unsqueeze(-1)).to(out.dtype)
            outputs.append(out)
        return torch.cat(outputs, dim=0)

    def _grouped_ok(self, tokens: torch.Tensor) -> bool:
        """torch._grouped_mm wants 16-byte aligned rows (sizes a multiple of 4 fp32 / 8 bf16) and no bias."""
        first = next(iter(self.local_experts.values()))
        if first.linear_fc1.bias is not None:
            return False
        align = 16 // tokens.element_size() if not torch.is_autocast_enabled(tokens.device.type) else 8
        w1 = first.linear_fc1.weight
        return all(d % align == 0 for d in (*w1.shape, tokens.shape[-1]))

    def _forward_grouped(
        self, tokens: torch.Tensor, tokens_per_expert: list[int], probs: torch.Tensor
    ) -> torch.Tensor:
        dtype = tokens.dtype
        if torch.is_autocast_enabled(tokens.device.type):
            dtype = torch.get_autocast_dtype(tokens.device.type)
        offs = torch.tensor(tokens_per_expert, device=tokens.device).cumsum(0).to(torch.int32)
        experts = list(self.local_experts.values())
        w1 = torch.stack([e.linear_fc1.weight for e in experts]).to(dtype)  # [E, f, h]
        w2 = torch.stack([e.linear_fc2.weight for e in experts]).to(dtype)  # [E, h, f]
        with torch.autocast(tokens.device.type, enabled=False):
            hidden = _GroupedMM.apply(tokens.to(dtype), w1, offs, tokens_per_expert)
            hidden = self._scaled_activation(hidden, probs)
            return _GroupedMM.apply(hidden, w2, offs, tokens_per_expert)


class _GroupedMM(torch.autograd.Function):
    """y_g = x_g @ w_g^T for each expert g's rows: torch._grouped_mm forward and input gradient; the weight
    gradient loops over the experts (the CPU kernel's backward rejects most shapes)."""

    @staticmethod
    def forward(ctx, x, weight, offs, counts):
        ctx.save_for_backward(x, weight, offs)
        ctx.counts = counts
        return torch._grouped_mm(x, weight.transpose(1, 2).contiguous(), offs=offs)

    @staticmethod
    def backward(ctx, grad):
        x, weight, offs = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = torch._grouped_mm(grad, weight.contiguous(), offs=offs)
        grad_w = torch.stack([g.t().matmul(xi) for g, xi in zip(grad.split(ctx.counts), x.split(ctx.counts))])
        return grad_x, grad_w, None, None
