"""Which tokens of a sequence a context-parallel rank holds: Megatron's load-balanced split into 2C chunks."""

from __future__ import annotations

import torch

from megatron_lite.errors import fail


def check_sequence_split(seq_length: int, cp_size: int) -> None:
    """The sequence must split into 2 * cp_size equal chunks (one line naming the flags otherwise)."""
    if seq_length % (2 * cp_size) != 0:
        fail(
            f"--seq-length {seq_length} is not divisible by 2 x --context-parallel-size {cp_size} "
            f"= {2 * cp_size}: context parallelism splits each sequence into that many equal chunks"
        )


def cp_positions(
    seq_length: int, cp_size: int, cp_rank: int, device: torch.device | None = None
) -> torch.Tensor:
    """Global positions [s / C] of the tokens rank r holds: chunks r and 2C-1-r of the 2C equal chunks.

    Causal attention costs more for later positions; pairing an early chunk with its mirror gives every
    rank the same work (Megatron's get_batch_on_this_cp_rank).
    """
    if cp_size == 1:
        return torch.arange(seq_length, device=device)
    chunk = seq_length // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    mirror = 2 * cp_size - 1 - cp_rank
    second = torch.arange(mirror * chunk, (mirror + 1) * chunk, device=device)
    return torch.cat([first, second])


def split_batch_for_cp(
    batch: dict[str, torch.Tensor], cp_size: int, cp_rank: int, seq_dim: int = 1
) -> dict[str, torch.Tensor]:
    """This rank's slice of every [b, s, ...] tensor of a batch (tokens, labels, loss_mask, position_ids).

    position_ids are made if absent, so each token keeps its global position (RoPE, learned embeddings).
    An attention_mask [b, 1, s, s] is left out: causal masking is rebuilt from global positions.
    """
    if cp_size == 1:
        return batch
    tokens = batch["tokens"]
    seq_length = tokens.shape[seq_dim]
    check_sequence_split(seq_length, cp_size)
    positions = cp_positions(seq_length, cp_size, cp_rank, tokens.device)
    out = {}
    for name, tensor in batch.items():
        if name == "attention_mask":
            continue
        out[name] = tensor.index_select(seq_dim, positions)
    if "position_ids" not in out:
        out["position_ids"] = positions.unsqueeze(0).expand(tokens.shape[0], -1).contiguous()
    return out
