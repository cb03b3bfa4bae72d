"""The one KV buffer: preallocated K and V, written only by `commit`.

Shapes: K, V (layers, batch, kv_heads, max_len, head_dim). Rows of a batch share the column count: prompts are
left padded and blocks advance together, so one `length` describes every row; which columns a row may attend
to lives in the per-token layout vectors (`layout`), kept beside the buffer (pad columns are kind PAD).

Two ways to hand the past to a step. `past()`: views of the filled columns, free for torch, but not contiguous
(a prefix along the length axis), so a backend that needs dense arrays (onnxruntime's numpy feeds) copies the
whole past every step (measured at a 2B shape: 142 against 82 ms for the bare graph at past 2048). `padded()`:
the whole allocated buffer per layer, contiguous, handed over as it is; its unfilled columns are kind PAD in
`keys_layout(padded=True)`, so the attention bias hides them and the step sees exactly what `past()` shows.
Such a cache is allocated in chunks (`chunk` columns at a time, copied once when it grows) so the hidden
columns a step attends over stay fewer than `chunk`.
"""

from __future__ import annotations

import torch

from bard_deploy.diffusion.mask import PAD, Layout
from bard_deploy.errors import RuntimeInputError


class KVCache:
    """The preallocated K/V of one request; `commit` appends a step's tokens, nothing else writes."""

    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", chunk: int | None = None):
        self.max_len, self.chunk = max_len, chunk
        capacity = max_len if chunk is None else min(max_len, chunk)
        shape = (layers, batch, kv_heads, capacity, head_dim)
        # zeros, not garbage: hidden columns are multiplied by exactly-zero attention weights, and 0 * NaN is NaN
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        self.layout: Layout | None = None  # (batch, length) vectors of the cached tokens

    @property
    def capacity(self) -> int:
        """Columns allocated now (max_len unless the cache grows in chunks)."""
        return self.k.shape[3]

    def _reserve(self, end: int) -> None:
        """Grow a chunked buffer to hold `end` columns (whole chunks, at most max_len); one copy per growth."""
        if end <= self.capacity:
            return
        new = min(self.max_len, -(-end // self.chunk) * self.chunk)
        for name in ("k", "v"):
            old = getattr(self, name)
            buf = old.new_zeros(*old.shape[:3], new, old.shape[4])
            buf[:, :, :, :self.length] = old[:, :, :, :self.length]
            setattr(self, name, buf)

    def padded(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (K, V): the whole allocated buffer, (batch, kv_heads, capacity, head_dim), contiguous; use
        with `keys_layout(..., padded=True)`."""
        return [(self.k[i], self.v[i]) for i in range(self.k.shape[0])]

    def past(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (K, V) views of the filled part, each (batch, kv_heads, length, head_dim)."""
        return [(self.k[i, :, :, :self.length], self.v[i, :, :, :self.length]) for i in range(self.k.shape[0])]

    def keys_layout(self, queries: Layout, padded: bool = False) -> Layout:
        """Layout of the keys a step sees: the cached tokens (`padded`: then the unfilled columns of the buffer,
        kind PAD, never visible) followed by the step's own tokens."""
        parts = [] if self.layout is None else [self.layout]
        if padded and self.capacity > self.length:
            B, free = queries.shape[0], self.capacity - self.length
            pad = torch.zeros(B, free, dtype=torch.long, device=queries.kind.device)
            parts.append(Layout(pad + PAD, pad, pad))
        return Layout.cat(parts + [queries]) if parts else queries

    def commit(self, new_kv: list[tuple[torch.Tensor, torch.Tensor]], layout: Layout, n: int | None = None) -> None:
        """Append the first `n` (default all) new tokens of a step: their K/V and layout."""
        n = layout.shape[1] if n is None else n
        if self.length + n > self.max_len:
            raise RuntimeInputError(f"KV cache full: {self.length} + {n} tokens > max length {self.max_len}",
                                    self.length + n)
        end = self.length + n
        self._reserve(end)
        for i, (k, v) in enumerate(new_kv):
            self.k[i, :, :, self.length:end] = k[:, :, :n]
            self.v[i, :, :, self.length:end] = v[:, :, :n]
        part = layout[:n]
        self.layout = part if self.layout is None else Layout.cat([self.layout, part])
        self.length = end
