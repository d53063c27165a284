"""The key/value cache for incremental decoding: past keys and values of every layer, and their length."""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer keys and values of the tokens seen so far, [max_seq_len, b, groups/tp, head_dim].

    `length` is the number of cached positions and the position offset of the next tokens. Layers write
    their new keys/values with update(); GPTModel advances the length once all layers have run. Buffers
    are allocated on first use with the dtype and device of the keys (bf16 under autocast). Meant for
    inference under torch.no_grad().
    """

    def __init__(self, num_layers: int, batch_size: int, max_seq_len: int) -> None:
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.length = 0
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer's new key/value [s_new, b, g, d] after the cached ones; return all of them."""
        end = self.length + key.shape[0]
        if end > self.max_seq_len:
            raise ValueError(
                f"KV cache holds {self.max_seq_len} positions; {self.length} cached + {key.shape[0]} new "
                "do not fit (build it with a larger max_seq_len)"
            )
        if key.shape[1] != self.batch_size:
            raise ValueError(f"KV cache was built for batch size {self.batch_size}, got {key.shape[1]}")
        if self.keys[layer] is None:
            shape = (self.max_seq_len, *key.shape[1:])
            self.keys[layer] = torch.zeros(shape, dtype=key.dtype, device=key.device)
            self.values[layer] = torch.zeros(shape, dtype=value.dtype, device=value.device)
        keys, values = self.keys[layer], self.values[layer]
        keys[self.length : end] = key
        values[self.length : end] = value
        return keys[:end], values[:end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def reset(self) -> None:
        """Forget the cached positions (the buffers are kept for reuse)."""
        self.length = 0
