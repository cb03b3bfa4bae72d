"""The one KV buffer: preallocated K and V, written only by `commit`.

Shapes: K, V (layers, batch, kv_heads, max_len, head_dim). Rows of a batch share the column count: prompts are
left padded and blocks advance together, so one `length` describes every row; which columns a row may attend
to lives in the per-token layout vectors (`layout`), kept beside the buffer (pad columns are kind PAD).

Two ways to hand the past to a step. `past()`: views of the filled columns, free for torch, but not contiguous
(a prefix along the length axis), so a backend that needs dense arrays (onnxruntime) would copy the whole past
every step (measured at a 2B shape: 142 against 82 ms for the bare graph at past 2048). `padded()`: the whole
allocated buffer per layer, contiguous, handed over as it is; its unfilled columns are kind PAD in
`keys_layout(padded=True)`, so the attention bias hides them and the step sees exactly what `past()` shows.
Such a cache is allocated in chunks (`chunk` columns at a time, copied once when it grows) so the hidden
columns a step attends over stay fewer than `chunk`.

The step's attention bias is built from the cache side incrementally (`step_bias`): every cached column is a
prompt token or a committed token of an earlier block, so a decode step's query (clean, noisy, or the AR
baseline's next prompt token) sees every cached column that is not PAD (DESIGN.md section 4: response queries
see the whole prompt and every earlier clean block; a causal query sees every earlier token). The cache keeps
that per-column bias row, written once per committed column, instead of re-deriving the table over the whole
past each step (at past 8192 a few dozen elementwise passes over a (T, 8192) grid); only the step's own T x T
part is computed from the table. A test checks it against `attention_bias` over `keys_layout` at every step.
"""

from __future__ import annotations

import torch

from bard_deploy.diffusion.mask import PAD, Layout, attention_bias
from bard_deploy.errors import RuntimeInputError

# step-local biases by layout structure (`KVCache._local_bias`), shared by every request of the process (read-only
# tensors; the oldest entry goes first)
LOCAL_BIAS_ENTRIES = 256
_LOCAL_BIAS: dict[str, torch.Tensor] = {}


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
        # the layout vectors of the columns (kind PAD where unfilled), and the bias row a decode step's query
        # sees them with (0: a filled non-pad column; finfo.min: pad or unfilled); on the CPU, like the layouts
        self._kind, self._block, self._index = (torch.zeros(batch, capacity, dtype=torch.long) for _ in range(3))
        self.hidden = torch.finfo(dtype).min
        self._bias_row = torch.full((batch, capacity), self.hidden, dtype=dtype)

    @property
    def capacity(self) -> int:
        """Columns allocated now (max_len unless the cache grows in chunks)."""
        return self.k.shape[3]

    @property
    def layout(self) -> Layout | None:
        """(batch, length) layout vectors of the cached tokens (None while empty)."""
        if self.length == 0:
            return None
        n = self.length
        return Layout(self._kind[:, :n], self._block[:, :n], self._index[:, :n])

    def _reserve(self, end: int) -> None:
        """Grow a chunked buffer to hold `end` columns (whole chunks, at most max_len); one copy per growth."""
        if end <= self.capacity:
            return
        new = min(self.max_len, -(-end // self.chunk) * self.chunk)
        n = self.length
        for name in ("k", "v"):
            old = getattr(self, name)
            buf = old.new_zeros(*old.shape[:3], new, old.shape[4])
            buf[:, :, :, :n] = old[:, :, :, :n]
            setattr(self, name, buf)
        for name, fill in (("_kind", PAD), ("_block", 0), ("_index", 0), ("_bias_row", self.hidden)):
            old = getattr(self, name)
            buf = old.new_full((old.shape[0], new), fill)
            buf[:, :n] = old[:, :n]
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
        n = self.capacity if padded else self.length
        if n == 0:
            return queries
        return Layout.cat([Layout(self._kind[:, :n], self._block[:, :n], self._index[:, :n]), queries])

    def step_bias(self, queries: Layout, prompt_attention: str, padded: bool = False) -> torch.Tensor:
        """The additive bias (B, 1, T, n + T) of a decode step's queries over [the cache's n columns (`padded`:
        all allocated ones, else the filled ones) | the step's own tokens]: equal to `attention_bias(queries,
        keys_layout(queries, padded))` for every query of a decode step (see the module docstring)."""
        n = self.capacity if padded else self.length
        local = self._local_bias(queries, prompt_attention)
        if n == 0:
            return local
        B, T = queries.shape
        return torch.cat([self._bias_row[:, None, None, :n].expand(B, 1, T, n), local], dim=3)

    def _local_bias(self, queries: Layout, prompt_attention: str) -> torch.Tensor:
        """The step tokens' bias among themselves, memoised by their structure: the table compares kinds and
        differences of block ids and indices only, so layouts equal up to a per-row shift of both share it (every
        AR step; the first steps of every later block; the other steps of every block)."""
        dtype = self._bias_row.dtype
        key = repr((prompt_attention, str(dtype), queries.kind.tolist(),
                    (queries.block - queries.block[:, :1]).tolist(), (queries.index - queries.index[:, :1]).tolist()))
        bias = _LOCAL_BIAS.get(key)
        if bias is None:
            bias = attention_bias(queries, queries, prompt_attention, dtype=dtype)
            if len(_LOCAL_BIAS) >= LOCAL_BIAS_ENTRIES:          # bounded: prefills of every length pass by here
                _LOCAL_BIAS.pop(next(iter(_LOCAL_BIAS)))
            _LOCAL_BIAS[key] = bias
        return bias

    def commit(self, new_kv: list[tuple[torch.Tensor, torch.Tensor]], layout: Layout, n: int | None = None) -> None:
        """Append the first `n` (default all) new tokens of a step: their K/V and layout."""
        n = layout.shape[1] if n is None else n
        if self.length + n > self.max_len:
            raise RuntimeInputError(f"KV cache full: {self.length} + {n} tokens > max length {self.max_len}",
                                    self.length + n)
        start, end = self.length, self.length + n
        self._reserve(end)
        if len(new_kv) > 1:              # every layer in one copy (a copy per layer is two Python-level ops each)
            self.k[:, :, :, start:end] = torch.stack([k for k, _ in new_kv])[:, :, :, :n]
            self.v[:, :, :, start:end] = torch.stack([v for _, v in new_kv])[:, :, :, :n]
        else:
            for i, (k, v) in enumerate(new_kv):
                self.k[i, :, :, start:end] = k[:, :, :n]
                self.v[i, :, :, start:end] = v[:, :, :n]
        kind = layout.kind[:, :n]
        self._kind[:, start:end] = kind
        self._block[:, start:end] = layout.block[:, :n]
        self._index[:, start:end] = layout.index[:, :n]
        self._bias_row[:, start:end] = torch.where(kind == PAD, self.hidden, 0.0)
        self.length = end
