"""Noise for block-diffusion training: per-block stratified times and the `mask` / `mix` priors.

t is the corruption level of a response block (t = 1: everything corrupted). Within one sample the n block
times are stratified, t_i = (u_i + i) / n then permuted, and clamped to [t_min, 1] *after* stratification (the
reference clamps before, so t can reach t_min / n and the 1/t weight explodes).

- `mask`: each noisy token becomes MASK with probability t.
- `mix` (the paper's mixed noise scheduler): with phi = pi t / 2, MASK with probability 1 - cos(phi), a
  uniformly drawn *text* token with probability sin(phi) + cos(phi) - 1, kept otherwise. Uniform noise dominates
  at small t, MASK at large t. One categorical draw per token, vectorised.

Everything draws from an explicit generator, so a training step's noise is a function of its seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bard_deploy.diffusion.mask import NOISY, Layout


@dataclass
class Corruption:
    """What `corrupt` returns: the corrupted inputs, which noisy positions changed (where the loss is taken)
    and each position's block time t (for the min(1/t, cap) weight)."""

    input_ids: torch.Tensor   # (N, L) with the noisy copy corrupted
    corrupted: torch.Tensor   # (N, L) bool: noisy positions whose input differs from the clean target
    t: torch.Tensor           # (N, L) the block time of every noisy position (1 elsewhere)


def block_times(n_blocks: int, t_min: float, gen: torch.Generator) -> torch.Tensor:
    """(n_blocks,) stratified, permuted, clamped to [t_min, 1]."""
    u = torch.rand(n_blocks, generator=gen)
    t = (u + torch.arange(n_blocks)) / n_blocks
    return t[torch.randperm(n_blocks, generator=gen)].clamp(min=t_min, max=1.0)


def mix_probabilities(t: torch.Tensor) -> torch.Tensor:
    """(..., 3): P(MASK), P(uniform text token), P(keep) at time t."""
    phi = math.pi * t / 2
    p_mask = 1 - torch.cos(phi)
    p_unif = torch.sin(phi) + torch.cos(phi) - 1
    return torch.stack([p_mask, p_unif, 1 - p_mask - p_unif], -1).clamp(min=0)


def corrupt(input_ids: torch.Tensor, layout: Layout, prior: str, mask_id: int, text_tokens: torch.Tensor,
            t_min: float, gens: list[torch.Generator]) -> Corruption:
    """Corrupt the noisy copy of a packed batch (the clean copy and the prompt are untouched).

    One generator per sample: a sample's noise depends on its own seed only, not on which micro-batch or
    process it lands in (so 1 and N processes train identically). The noise is drawn on the CPU and moved to
    the batch's device, so a GPU run corrupts exactly as a CPU run does.
    """
    if prior not in ("mask", "mix"):
        raise ValueError(f"noise prior must be 'mask' or 'mix', got {prior!r}")
    device = input_ids.device
    if device.type != "cpu":
        c = corrupt(input_ids.cpu(), Layout(*(v.cpu() for v in (layout.kind, layout.block, layout.index))), prior,
                    mask_id, text_tokens.cpu(), t_min, gens)
        return Corruption(c.input_ids.to(device), c.corrupted.to(device), c.t.to(device))
    noisy = layout.kind == NOISY
    out = input_ids.clone()
    t = torch.ones(input_ids.shape)
    for row, gen in enumerate(gens):                           # per sample: vectorised over its tokens
        cols = noisy[row].nonzero(as_tuple=True)[0]
        if not cols.numel():
            continue
        blocks = layout.block[row, cols]
        t_row = block_times(int(blocks.max()) + 1, t_min, gen)[blocks]          # (n,)
        u = torch.rand(cols.shape, generator=gen)
        picks = torch.randint(len(text_tokens), cols.shape, generator=gen)
        if prior == "mask":
            new = torch.where(u < t_row, mask_id, input_ids[row, cols])
        else:
            p = mix_probabilities(t_row)
            new = torch.where(u < p[:, 0], mask_id,
                              torch.where(u < p[:, 0] + p[:, 1], text_tokens[picks], input_ids[row, cols]))
        out[row, cols] = new
        t[row, cols] = t_row
    return Corruption(out, noisy & (out != input_ids), t)
