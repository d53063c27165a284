"""Routing math of Megatron's MoE: score functions, top-k (group-limited), capacity dropping, the
load-balancing and z losses, and the autograd hook that adds an auxiliary loss's gradient in backward."""

from __future__ import annotations

import math

import torch


def switch_load_balancing_loss_func(
    probs: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    total_num_tokens: int,
    topk: int,
    num_experts: int,
    moe_aux_loss_coeff: float,
) -> torch.Tensor:
    """Switch Transformer / GShard loss  E * sum_i f_i * P_i * coeff, with f_i = tokens_i / (T * topk) and
    P_i = sum_x probs(x, i) / T.  probs [tokens, E] are this rank's; tokens_per_expert and T may cover more
    ranks (sequence parallelism), which makes the per-rank losses sum to the whole batch's."""
    aggregated = probs.sum(dim=0)
    scale = num_experts * moe_aux_loss_coeff / (topk * total_num_tokens * total_num_tokens)
    return torch.sum(aggregated * tokens_per_expert) * scale


def z_loss_func(logits: torch.Tensor, z_loss_coeff: float) -> torch.Tensor:
    """ST-MoE's router z-loss: mean over tokens of logsumexp(logits)^2, times the coefficient."""
    return torch.mean(torch.square(torch.logsumexp(logits, dim=-1))) * z_loss_coeff


def get_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens each expert may take: ceil(num_tokens / num_experts * capacity_factor)."""
    return math.ceil((num_tokens / num_experts) * capacity_factor)


def group_limited_topk(
    scores: torch.Tensor, topk: int, num_groups: int, group_topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's device/node-limited routing: keep the group_topk groups whose best topk/group_topk
    scores sum highest, then take the top-k experts inside them. Returns (top scores, indices) [t, k]."""
    num_tokens, num_experts = scores.shape
    group_scores = scores.view(num_tokens, num_groups, -1).topk(topk // group_topk, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=group_topk, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = (
        group_mask.unsqueeze(-1)
        .expand(num_tokens, num_groups, num_experts // num_groups)
        .reshape(num_tokens, -1)
    )
    masked = scores.masked_fill(~score_mask.bool(), float("-inf"))
    return torch.topk(masked, k=topk, dim=-1)


def topk_routing_with_score_function(
    logits: torch.Tensor,
    topk: int,
    *,
    use_pre_softmax: bool = False,
    num_groups: int | None = None,
    group_topk: int | None = None,
    scaling_factor: float | None = None,
    score_function: str = "softmax",
    expert_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [t, E] -> (routing probs [t, E], zero off the chosen experts; routing map [t, E] bool).

    softmax: over the top-k logits (default) or over all experts before the top-k (pre-softmax).
    sigmoid: per-expert sigmoid, the top-k chosen on score + expert_bias when given (aux-loss-free
    balancing), and the chosen scores renormalised to sum to 1 when k > 1.
    """
    num_tokens, num_experts = logits.shape

    def topk_of(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if group_topk:
            return group_limited_topk(scores, topk, num_groups, group_topk)
        return torch.topk(scores, k=topk, dim=1)

    if score_function == "softmax":
        if use_pre_softmax:
            scores = torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits)
            probs, top_indices = topk_of(scores)
        else:
            scores, top_indices = topk_of(logits)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).type_as(logits)
    elif score_function == "sigmoid":
        scores = torch.sigmoid(logits.float()).type_as(logits)
        if expert_bias is not None:
            _, top_indices = topk_of(scores + expert_bias)
            scores = torch.gather(scores, dim=1, index=top_indices).type_as(logits)
        else:
            scores, top_indices = topk_of(scores)
        probs = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20) if topk > 1 else scores
    else:
        raise ValueError(f"unknown score function {score_function}")
    if scaling_factor:
        probs = probs * scaling_factor
    routing_probs = torch.zeros_like(logits).scatter(1, top_indices, probs)
    routing_map = torch.zeros_like(logits).int().scatter(1, top_indices, 1).bool()
    return routing_probs, routing_map


def compute_routing_scores_for_aux_loss(
    logits: torch.Tensor, topk: int, score_function: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing map and scores the balancing losses see: a plain top-k over the normalised scores
    (softmax, or sigmoid divided by its sum), independent of groups, bias and dropping."""
    if score_function == "softmax":
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
    else:
        scores = torch.sigmoid(logits)
        scores = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    _, top_indices = torch.topk(scores, k=topk, dim=1)
    routing_map = torch.zeros_like(logits).int().scatter(1, top_indices, 1).bool()
    return routing_map, scores


def apply_router_token_dropping(
    routing_probs: torch.Tensor,
    routing_map: torch.Tensor,
    router_topk: int,
    capacity_factor: float,
    drop_policy: str = "probs",
    pad_to_capacity: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep at most `capacity` tokens per expert: those with the highest probability ("probs") or the
    earliest ("position"); with pad_to_capacity every expert gets exactly `capacity` slots (probability 0
    for the padding)."""
    num_tokens, num_experts = routing_probs.shape
    capacity = get_capacity(num_tokens * router_topk, num_experts, capacity_factor)
    if capacity > num_tokens:
        capacity_mask = torch.ones_like(routing_probs).bool()
    else:
        ranked = routing_probs if drop_policy == "probs" else routing_map.int()
        _, indices = torch.topk(ranked, k=capacity, dim=0, sorted=False)
        capacity_mask = torch.zeros_like(routing_probs).scatter(0, indices, 1).bool()
    final_map = capacity_mask if pad_to_capacity else torch.logical_and(routing_map, capacity_mask)
    return routing_probs * final_map, final_map


class MoEAuxLossAutoScaler(torch.autograd.Function):
    """Identity on `output`; in backward it gives `aux_loss` the gradient main_loss_backward_scale, so an
    auxiliary loss joins the backward pass with the same scale as the language-model loss."""

    main_loss_backward_scale: torch.Tensor | None = None

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (aux_loss,) = ctx.saved_tensors
        scale = MoEAuxLossAutoScaler.main_loss_backward_scale
        if scale is None:
            scale = torch.tensor(1.0, device=aux_loss.device)
        return grad_output, torch.ones_like(aux_loss) * scale.to(aux_loss.device)

    @staticmethod
    def set_loss_scale(scale: torch.Tensor | float) -> None:
        """The factor the trainer applies to this micro batch's lm loss (loss scale / micro batches)."""
        MoEAuxLossAutoScaler.main_loss_backward_scale = torch.as_tensor(scale, dtype=torch.float32)


def permute(tokens: torch.Tensor, routing_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [t, h] and routing map [t, E] -> (tokens grouped by expert, expert-major with token order
    kept inside each expert [sum(map), h]; the source token index of each row)."""
    num_tokens = tokens.shape[0]
    mask = routing_map.bool().t().contiguous()  # [E, t]
    token_indices = torch.arange(num_tokens, device=tokens.device).unsqueeze(0).expand_as(mask)
    sorted_indices = token_indices.masked_select(mask)
    return tokens.index_select(0, sorted_indices), sorted_indices


def unpermute(permuted: torch.Tensor, sorted_indices: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Sum each row of `permuted` back into its source token: [n, h] -> [num_tokens, h]."""
    out = torch.zeros(num_tokens, permuted.shape[-1], dtype=permuted.dtype, device=permuted.device)
    return out.scatter_add(0, sorted_indices.unsqueeze(1).expand(-1, permuted.shape[-1]), permuted)


def get_updated_expert_bias(
    tokens_per_expert: torch.Tensor, expert_bias: torch.Tensor, update_rate: float
) -> torch.Tensor:
    """Aux-loss-free balancing (DeepSeek-V3): raise the bias of experts below the mean load and lower it
    above, by update_rate * sign(mean - load). tokens_per_expert must already cover the whole batch."""
    average = tokens_per_expert.sum(dim=-1, keepdim=True) / tokens_per_expert.shape[-1]
    return expert_bias + torch.sign(average - tokens_per_expert) * update_rate
