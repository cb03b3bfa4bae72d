"""The Qwen3 text decoder of Qwen3-VL, in plain PyTorch, with HF parameter names.

RMSNorm, interleaved MRoPE (3 position rows: t, h, w), GQA, per-head q/k RMSNorm, SwiGLU, DeepStack
injection after the first layers. No causal assumption anywhere: every structure comes from the
`attention_bias` (additive, boolean, or a FlexAttention BlockMask in GPU training), so the same code serves AR
prefill, block-diffusion training and cached denoising.

The decoder step is a pure function of its inputs (see `TextModel.forward`): embeddings, positions,
attention bias and the past K/V in; hidden states and the *new* tokens' K/V out. Nothing here knows
about ONNX, TensorRT or quantization.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from bard_deploy.config import TextConfig

KV = tuple[torch.Tensor, torch.Tensor]  # (key, value), each (B, kv_heads, T, head_dim)

_compiled_flex = None


def flex_attention_fn():
    """flex_attention, compiled once on CUDA (its fused kernel); eager elsewhere (a slow reference path)."""
    global _compiled_flex
    if not torch.cuda.is_available():
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim with a learned per-channel scale (no bias, no mean removal)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> the same shape: normalised in fp32, cast back, then scaled by `weight`."""
        # Normalise in fp32 whatever the activation dtype (as HF does), scale in the input dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def mrope_rows(head_dim: int, mrope_section: tuple[int, int, int] | None) -> torch.Tensor:
    """Which position row (0=t, 1=h, 2=w) drives each of the head_dim/2 rotary frequencies.

    Qwen3-VL interleaves them: frequency j uses row 1 when j % 3 == 1 and j < 3*section[1], row 2 when
    j % 3 == 2 and j < 3*section[2], row 0 otherwise. Text-only Qwen3 (section None) uses row 0 only.
    """
    rows = torch.zeros(head_dim // 2, dtype=torch.long)
    if mrope_section is not None:
        rows[1:3 * mrope_section[1]:3] = 1
        rows[2:3 * mrope_section[2]:3] = 2
    return rows


def rotary(position_ids: torch.Tensor, inv_freq: torch.Tensor, rows: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, T, head_dim) for position_ids (3, B, T)."""
    # Pick, per frequency, the position of its row: an exact integer selection, so the product below is
    # bit-identical to HF's (row position * inv_freq[j]).
    onehot = F.one_hot(rows, 3).T.to(position_ids.dtype)                          # (3, D/2)
    pos = (position_ids.unsqueeze(-1) * onehot[:, None, None, :]).sum(0)          # (B, T, D/2)
    freqs = pos.float() * inv_freq                                                # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)                                       # (B, T, D)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the halves of the last dim: RoPE's rotation in its cos/sin form."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """GQA self-attention with per-head q/k RMSNorm and MRoPE; all structure comes from the bias (no causal
    assumption), so AR prefill, training and cached denoising share it."""

    def __init__(self, c: TextConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=c.attention_bias)
        self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                past: KV | None, use_sdpa: bool) -> tuple[torch.Tensor, KV]:
        """x (B, T, hidden), cos/sin (B, T, D) -> output (B, T, hidden) and the new tokens' (k, v), each (B, Hkv, T, D).
        `past` (B, Hkv, P, D) is prepended to the keys; `bias` is additive or bool (B, 1, T, P+T), or a BlockMask."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)  # (B, H, T, D)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim)).transpose(1, 2)     # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)                  # (B, Hkv, T, D)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        new = (k, v)  # only the new tokens' K/V leave the step; the runtime owns the cache
        if past is not None:
            k = torch.cat((past[0], k), dim=2)                                   # (B, Hkv, P+T, D)
            v = torch.cat((past[1], v), dim=2)
        if isinstance(bias, BlockMask):  # FlexAttention (training on GPU): GQA natively, no repeat
            a = flex_attention_fn()(q, k, v, block_mask=bias, enable_gqa=self.n_heads != self.n_kv)
            return self.o_proj(a.transpose(1, 2).reshape(B, T, -1)), new
        rep = self.n_heads // self.n_kv                                          # GQA: kv head i serves
        k = k.repeat_interleave(rep, dim=1)                                      # query heads i*rep..
        v = v.repeat_interleave(rep, dim=1)
        if bias.dtype == torch.bool:  # a boolean mask (training: 4x smaller than an additive one)
            if use_sdpa:
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
                return self.o_proj(a.transpose(1, 2).reshape(B, T, -1)), new
            bias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device).masked_fill(~bias, torch.finfo(q.dtype).min)
        if use_sdpa:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        else:
            # MatMul + additive mask + Softmax: the portable form every exporter lowers as written.
            scores = (q @ k.transpose(-1, -2)) * self.head_dim ** -0.5 + bias      # (B, H, T, P+T)
            a = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
        return self.o_proj(a.transpose(1, 2).reshape(B, T, -1)), new


class MLP(nn.Module):
    """SwiGLU feed-forward: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, c: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., hidden)."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm decoder block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, c: TextConfig):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, bias, past: KV | None, use_sdpa: bool) -> tuple[torch.Tensor, KV]:
        """One layer on x (B, T, hidden): the new hidden states and this layer's new-token K/V
        (see `Attention.forward`)."""
        h, new = self.self_attn(self.input_layernorm(x), cos, sin, bias, past, use_sdpa)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), new


class TextModel(nn.Module):
    """`model.language_model` of Qwen3-VL (or `model` of Qwen3): embed_tokens, layers, norm."""

    def __init__(self, c: TextConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.rotary_tables()
        # "sdpa" is the fast path for torch; exporters switch to the explicit MatMul+Softmax form.
        self.use_sdpa = True
        # Per-layer activation checkpointing (training only; set by the trainer).
        self.checkpoint_layers = False

    def rotary_tables(self) -> None:
        """(Re)compute the rotary buffers from the config: inv_freq (head_dim/2,) fp32 and the MRoPE row of each
        frequency. Called by the constructor, and again on the CPU after a construction on the meta device."""
        c = self.config
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float) / c.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("rope_rows", mrope_rows(c.head_dim, c.mrope_section), persistent=False)

    def forward(
        self,
        inputs_embeds: torch.Tensor,                       # (B, T, hidden)
        position_ids: torch.Tensor,                        # (3, B, T) int64: MRoPE rows t, h, w
        attention_bias: torch.Tensor,                      # (B, 1, T, P+T) additive (0 visible, finfo.min
        #                                                    hidden) or bool (True visible; training)
        past_key_values: list[KV] | tuple[KV, ...] | None = None,   # per layer, each (B, Hkv, P, D)
        deepstack_embeds: torch.Tensor | None = None,      # (n_ds, B, T, hidden), zero at non-visual positions
    ) -> tuple[torch.Tensor, list[KV]]:
        """One decoder step. Returns the final-normed hidden states (B, T, hidden) and the new tokens'
        K/V per layer (each (B, Hkv, T, D)); past K/V are read, never written."""
        assert position_ids.dim() == 3 and position_ids.shape[0] == 3, position_ids.shape
        x = inputs_embeds
        cos, sin = rotary(position_ids, self.inv_freq, self.rope_rows)             # fp32 tables, as HF, then
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)                                # in the activations' dtype
        n_ds = 0 if deepstack_embeds is None else deepstack_embeds.shape[0]
        new_kv: list[KV] = []
        for i, layer in enumerate(self.layers):
            past = past_key_values[i] if past_key_values else None
            if self.checkpoint_layers and self.training:
                x, kv = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, attention_bias, past,
                                                          self.use_sdpa, use_reentrant=False)
            else:
                x, kv = layer(x, cos, sin, attention_bias, past, self.use_sdpa)
            new_kv.append(kv)
            if i < n_ds:
                # DeepStack: vision feature i is added after text layer i (zeros off the image tokens).
                x = x + deepstack_embeds[i].to(x.dtype)
        return self.norm(x), new_kv
