"""The one KV buffer: preallocated K and V, written only by `commit`.

Shapes: K, V (layers, batch, kv_heads, max_len, head_dim). Rows of a batch share the column count: prompts are
left padded and blocks advance together, so one `length` describes every row; which columns a row may attend
to lives in the per-token layout vectors (`layout`), kept beside the buffer (pad columns are kind PAD).
"""

from __future__ import annotations

import torch

from bard_deploy.diffusion.mask import Layout
from bard_deploy.errors import RuntimeInputError


class KVCache:
    """The preallocated K/V of one request; `commit` appends a step's tokens, nothing else writes."""

    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (layers, batch, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0
        self.layout: Layout | None = None  # (batch, length) vectors of the cached tokens

    def past(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (K, V) views of the filled part, each (batch, kv_heads, length, head_dim)."""
        return [(self.k[i, :, :, :self.length], self.v[i, :, :, :self.length]) for i in range(self.k.shape[0])]

    def keys_layout(self, queries: Layout) -> Layout:
        """Layout of the keys a step sees: the cached tokens followed by the step's own tokens."""
        return queries if self.layout is None else Layout.cat([self.layout, queries])

    def commit(self, new_kv: list[tuple[torch.Tensor, torch.Tensor]], layout: Layout, n: int | None = None) -> None:
        """Append the first `n` (default all) new tokens of a step: their K/V and layout."""
        n = layout.shape[1] if n is None else n
        if self.length + n > self.max_len:
            raise RuntimeInputError(f"KV cache full: {self.length} + {n} tokens > max length {self.max_len}",
                                    self.length + n)
        end = self.length + n
        for i, (k, v) in enumerate(new_kv):
            self.k[i, :, :, self.length:end] = k[:, :, :n]
            self.v[i, :, :, self.length:end] = v[:, :, :n]
        part = layout[:n]
        self.layout = part if self.layout is None else Layout.cat([self.layout, part])
        self.length = end
