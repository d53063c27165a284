"""Token dispatchers: bring each token to the ranks of its experts, sorted by local expert, and bring the
experts' outputs back, summed per token in the original order ("allgather" and "alltoall", Megatron's)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_lite.core.tensor_parallel.mappings import (
    _gather_first,
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron_lite.core.transformer.moe.moe_utils import permute, unpermute
from megatron_lite.core.transformer.moe.parallel import (
    ExpertParallelState,
    all_to_all,
    gather_variable,
    reduce_scatter_variable,
)


class MoEAllGatherTokenDispatcher:
    """Gather every token of the expert-TP x EP group on each of its ranks, keep those routed to local
    experts, and reduce-scatter the outputs back (each rank's sum covers its experts and ETP slice)."""

    def __init__(self, num_experts: int, local_expert_indices: list[int], ep: ExpertParallelState) -> None:
        self.num_experts = num_experts
        self.lo, self.hi = local_expert_indices[0], local_expert_indices[-1] + 1
        self.group = ep.tp_ep_group if ep.tp_ep_size > 1 else None

    def dispatch(
        self, hidden: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor
    ) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """hidden [t, h], probs and routing_map [t, E] -> (tokens by local expert [n, h], counts, probs [n])."""
        if self.group is not None:
            with torch.no_grad():
                routing_map = _gather_first(routing_map.to(torch.int32), self.group).bool()
            probs = gather_from_sequence_parallel_region(probs, self.group)
            hidden = gather_from_sequence_parallel_region(hidden, self.group)
        local_map = routing_map[:, self.lo : self.hi].contiguous()
        local_probs = probs[:, self.lo : self.hi]
        self.num_tokens = hidden.shape[0]
        permuted, self.sorted_indices = permute(hidden, local_map)
        permuted_probs = local_probs.t().contiguous().masked_select(local_map.t().contiguous())
        self.probs_dtype = probs.dtype
        return permuted, local_map.sum(dim=0).tolist(), permuted_probs

    def combine(self, expert_output: torch.Tensor) -> torch.Tensor:
        """[n, h] -> [t, h]: each token's outputs summed over its experts (and ranks)."""
        out = unpermute(expert_output, self.sorted_indices, self.num_tokens)
        if self.group is not None:
            dtype = out.dtype
            out = reduce_scatter_to_sequence_parallel_region(out.to(self.probs_dtype), self.group).to(dtype)
        return out


class MoEAlltoAllTokenDispatcher:
    """Send each token only to the EP rank of its expert (all-to-all over the EP group), then gather over
    the expert-TP group; the outputs return the same way (reduce-scatter over ETP, all-to-all back).

    Every rank of the tp_ep group first learns all ranks' per-expert counts c[etp t, ep j, expert], which
    fix every split size; received tokens arrive as [etp source][ep source][local expert] and are
    reordered to [local expert][etp source][ep source] for the experts.
    """

    def __init__(self, num_experts: int, local_expert_indices: list[int], ep: ExpertParallelState) -> None:
        self.num_experts = num_experts
        self.local = local_expert_indices
        self.ep = ep

    def dispatch(
        self, hidden: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor
    ) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        ep = self.ep
        self.num_tokens = hidden.shape[0]
        permuted, self.sorted_indices = permute(hidden, routing_map)
        permuted_probs = probs.t().contiguous().masked_select(routing_map.t().contiguous())
        counts = routing_map.sum(dim=0).to(torch.int64)  # [E]
        if ep.tp_ep_size == 1:
            return permuted, counts.tolist(), permuted_probs
        gathered = [torch.empty_like(counts) for _ in range(ep.tp_ep_size)]
        dist.all_gather(gathered, counts, group=ep.tp_ep_group)
        # tp_ep group rank g = etp rank + etp * ep rank (Megatron's layout): c[t, j, e].
        c = torch.stack(gathered).view(ep.ep_size, ep.etp_size, self.num_experts).transpose(0, 1)
        lo, n_local = self.local[0], len(self.local)
        mine = c[ep.etp_rank, ep.ep_rank].view(ep.ep_size, n_local)  # what this rank sends, by EP rank
        local_counts = c[:, :, lo : lo + n_local]  # [etp, ep, local expert]: what the local experts get
        self.send_splits = mine.sum(dim=1).tolist()
        self.recv_splits = local_counts[ep.etp_rank].sum(dim=1).tolist()
        self.etp_sizes = local_counts.sum(dim=(1, 2)).tolist()
        x, p = permuted, permuted_probs
        if ep.ep_size > 1:
            x = all_to_all(x, self.recv_splits, self.send_splits, ep.ep_group)
            p = all_to_all(p, self.recv_splits, self.send_splits, ep.ep_group)
        if ep.etp_size > 1:
            x = gather_variable(x, self.etp_sizes, ep.etp_group)
            p = gather_variable(p, self.etp_sizes, ep.etp_group)
        # Reorder [t][j][e] chunks to [e][t][j].
        sizes = local_counts.reshape(-1)
        starts = torch.cumsum(sizes, 0) - sizes
        order = torch.arange(sizes.numel()).view(local_counts.shape).permute(2, 0, 1).reshape(-1)
        self.order = torch.cat(
            [torch.arange(int(starts[i]), int(starts[i] + sizes[i])) for i in order.tolist()]
            + [torch.zeros(0, dtype=torch.long)]
        ).to(hidden.device)
        return (
            x.index_select(0, self.order),
            local_counts.sum(dim=(0, 1)).tolist(),
            p.index_select(0, self.order),
        )

    def combine(self, expert_output: torch.Tensor) -> torch.Tensor:
        ep = self.ep
        out = expert_output
        if ep.tp_ep_size > 1:
            restored = torch.zeros_like(out).index_copy(0, self.order, out)
            out = restored
            if ep.etp_size > 1:
                out = reduce_scatter_variable(out, self.etp_sizes, ep.etp_group)
            if ep.ep_size > 1:
                out = all_to_all(out, self.send_splits, self.recv_splits, ep.ep_group)
        return unpermute(out, self.sorted_indices, self.num_tokens)
