"""Block-diffusion attention, built from per-token (kind, block, index) vectors.

Every token carries a kind (prompt, clean = committed response, noisy = being denoised, or pad), a block id
and its sequence index. Training and inference use the same rule (DESIGN.md section 4):

    query \\ key     prompt           clean block c          noisy block n
    ------------+----------------+----------------------+------------------------
    prompt      |  causal (*)    |  never               |  never
    clean  b    |  all           |  c <= b              |  never
    noisy  b    |  all           |  c <  b              |  n == b (bidirectional)
    pad         |  never         |  never               |  never     (and no query sees a pad key)

    (*) "causal": key index <= query index, token by token (models we convert: the prompt K/V then
        equal the source AR model's); "block": key block <= query block over prompt blocks of the decode
        block size cut from index 0 (official Bard-VL checkpoints).

Clean queries never see noisy keys (the reference code lets them: a train/inference mismatch we do not
copy). Prompt and response block ids are never compared with each other, so each may start at 0.

Training packs `[prompt | clean response | noisy response]` and uses the same vectors for queries and
keys; the runtime uses the cache's vectors for the keys and the current canvas's for the queries.
An AR model is the special case "every token is prompt, causal".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD, PROMPT, CLEAN, NOISY = 0, 1, 2, 3


@dataclass(frozen=True)
class Layout:
    """Per-token vectors of a (batch of) sequence(s), each (B, L) int64."""

    kind: torch.Tensor
    block: torch.Tensor
    index: torch.Tensor

    def __getitem__(self, cols: slice) -> Layout:
        return Layout(self.kind[:, cols], self.block[:, cols], self.index[:, cols])

    @property
    def shape(self) -> torch.Size:
        """(B, L), the shape shared by the three vectors."""
        return self.kind.shape

    @staticmethod
    def cat(parts: list[Layout]) -> Layout:
        """Concatenate layouts along the sequence dim (e.g. `[prompt | clean | noisy]`)."""
        return Layout(*(torch.cat([getattr(p, f) for p in parts], dim=1) for f in ("kind", "block", "index")))


def _visible(qk, qb, qi, kk, kb, ki, prompt_attention: str):
    """The table above on broadcastable tensors (dense masks) or 0-d tensors (a FlexAttention mask_mod)."""
    if prompt_attention == "causal":
        prompt_order = ki <= qi
    elif prompt_attention == "block":
        prompt_order = kb <= qb
    else:
        raise ValueError(f"prompt_attention must be 'causal' or 'block', got {prompt_attention!r}")
    q_resp = (qk == CLEAN) | (qk == NOISY)
    return (
        ((qk == PROMPT) & (kk == PROMPT) & prompt_order)      # prompt -> prompt
        | (q_resp & (kk == PROMPT))                           # response -> whole prompt
        | ((qk == CLEAN) & (kk == CLEAN) & (kb <= qb))        # clean -> clean, block-causal
        | ((qk == NOISY) & (kk == CLEAN) & (kb < qb))         # noisy -> earlier clean blocks
        | ((qk == NOISY) & (kk == NOISY) & (kb == qb))        # noisy -> own block, bidirectional
    )


def visibility(q: Layout, k: Layout, prompt_attention: str = "causal") -> torch.Tensor:
    """Bool (B, Tq, Tk): True where query token i may attend to key token j (the table above)."""
    return _visible(q.kind[:, :, None], q.block[:, :, None], q.index[:, :, None],    # (B, Tq, 1)
                    k.kind[:, None, :], k.block[:, None, :], k.index[:, None, :],    # (B, 1, Tk)
                    prompt_attention)


def attention_bias(q: Layout, k: Layout, prompt_attention: str = "causal",
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive (B, 1, Tq, Tk) bias: 0 where visible, finfo(dtype).min where hidden.

    finfo.min rather than -inf: a fully hidden row (a pad query) then softmaxes to a uniform row instead
    of NaN, and exporters and calibrators do not meet infinities.
    """
    vis = visibility(q, k, prompt_attention)
    return torch.zeros(vis.shape, dtype=dtype).masked_fill(~vis, torch.finfo(dtype).min).unsqueeze(1)


def training_mask(layout: Layout, prompt_attention: str = "causal", backend: str = "auto"):
    """The attention mask of a packed training batch (queries = keys = the batch's tokens).

    backend "sdpa": a boolean (N, 1, L, L) tensor; "flex": a FlexAttention `BlockMask` built from the same
    vectors (never materialises L x L per sample; fully hidden tiles are skipped); "auto": flex on CUDA,
    sdpa elsewhere (FlexAttention has no fast CPU path).

    Pad queries get a self-edge: a fully hidden row would make SDPA return NaN there, and NaN values in the
    pad tokens' V would poison every other row through 0 * NaN in the attention matmul.
    """
    if backend == "auto":
        backend = "flex" if layout.kind.is_cuda else "sdpa"
    if backend == "flex":
        return flex_training_mask(layout, prompt_attention)
    if backend != "sdpa":
        raise ValueError(f"mask backend must be 'auto', 'sdpa' or 'flex', got {backend!r}")
    vis = visibility(layout, layout, prompt_attention)
    L = vis.shape[-1]
    vis |= torch.eye(L, dtype=torch.bool, device=vis.device)[None] & (layout.kind == PAD)[:, :, None]
    return vis.unsqueeze(1)


def flex_training_mask(layout: Layout, prompt_attention: str = "causal"):
    """`training_mask` as a FlexAttention BlockMask (same rule, same pad self-edges)."""
    from torch.nn.attention.flex_attention import create_block_mask

    kind, block, index = layout.kind, layout.block, layout.index
    _visible(kind[:1, :1], block[:1, :1], index[:1, :1], kind[:1, :1], block[:1, :1], index[:1, :1],
             prompt_attention)                                   # reject a bad prompt_attention eagerly

    def mask_mod(b, h, q, k):
        return (_visible(kind[b, q], block[b, q], index[b, q], kind[b, k], block[b, k], index[b, k],
                         prompt_attention)
                | ((kind[b, q] == PAD) & (q == k)))

    N, L = kind.shape
    return create_block_mask(mask_mod, N, None, L, L, device=kind.device)


def prompt_layout(attention_mask: torch.Tensor, block_size: int | None = None) -> Layout:
    """Layout of a left-padded prompt batch (attention_mask (B, L), 1 = real token).

    Indices count real tokens from 0 per row; prompt blocks are index // block_size (used only under
    "block" prompt attention); pads get kind PAD.
    """
    real = attention_mask.bool()
    index = (real.long().cumsum(1) - 1).clamp(min=0)
    kind = torch.where(real, PROMPT, PAD)
    block = index // block_size if block_size else torch.zeros_like(index)
    return Layout(kind, block, index)


def response_layout(batch: int, start: torch.Tensor, first_block: int, n_tokens: int, block_size: int,
                    kind: int) -> Layout:
    """Layout of `n_tokens` response tokens of one kind, starting at response block `first_block`;
    `start` (B,) is each row's sequence index of the first of them."""
    off = torch.arange(n_tokens)
    block = (first_block + off // block_size).expand(batch, -1)
    return Layout(torch.full((batch, n_tokens), kind), block, start[:, None] + off)


def training_layout(prompt_len: int, response_len: int, block_size: int) -> Layout:
    """The packed training layout `[prompt | clean response | noisy response]` of one sample (B = 1).

    `response_len` must be a whole number of blocks (the collate pads with EOS). The noisy copy carries the
    same block ids and indices as its clean twin (it sits at the same positions).
    """
    assert response_len % block_size == 0, (response_len, block_size)
    prompt = prompt_layout(torch.ones(1, prompt_len, dtype=torch.long), block_size)
    start = torch.tensor([prompt_len])
    clean = response_layout(1, start, 0, response_len, block_size, CLEAN)
    noisy = response_layout(1, start, 0, response_len, block_size, NOISY)
    return Layout.cat([prompt, clean, noisy])
