"""A preallocated KV cache that can be rolled back and compacted (speculative decoding needs both).

Built on transformers' `StaticLayer` (fixed-address tensors that compiled graphs update in place).
Its `StaticCache` would give sliding-window layers a ring buffer, which loses tokens the moment the
window wraps, so a rolled-back or tree-shaped draft could not be undone; here every layer keeps all
positions and the engine's attention mask applies the window instead.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, StaticLayer


class RollbackCache(Cache):
    """One full-length static layer per decoder layer; the write position is shared and movable."""

    def __init__(self, num_layers: int, max_len: int):
        super().__init__(layers=[StaticLayer(max_cache_len=max_len) for _ in range(num_layers)])
        self.max_len = max_len

    @property
    def length(self) -> int:
        layer = self.layers[0]
        return int(layer.cumulative_length) if layer.is_initialized else 0

    @torch.inference_mode()
    def set_length(self, n: int) -> None:
        """Roll back (or forward) to `n` cached tokens; entries at and beyond `n` are dead."""
        if not 0 <= n <= self.max_len:
            raise ValueError(f"cache length {n} outside [0, {self.max_len}]")
        for layer in self.layers:
            layer.cumulative_length.fill_(n)

    @torch.inference_mode()
    def keep(self, slots: list[int], start: int) -> None:
        """Move the entries at absolute `slots` to `start, start+1, ...` and set the length after them.

        Used after tree verification: the accepted branch's tokens sit at scattered slots.
        """
        src = torch.tensor(slots, dtype=torch.long)
        dst = torch.arange(start, start + len(slots))
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys[:, :, dst] = layer.keys[:, :, src]
                layer.values[:, :, dst] = layer.values[:, :, src]
        self.set_length(start + len(slots))
