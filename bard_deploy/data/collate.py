"""Collate examples into training batches: the plain causal layout (AR) and the packed block-diffusion layout.

Packed layout of one sample (DESIGN.md sections 4-5), B = block size, R' = response padded with EOS to whole
blocks:

    tokens    [ prompt (P) | clean response (R') | noisy response (R') ]
    kind        PROMPT       CLEAN                  NOISY
    block       i // B (*)   response block j//B    response block j//B    (* only used by "block" prompts)
    index       0 .. P-1     P .. P+R'-1            P .. P+R'-1            (the noisy copy sits on the clean one)
    positions   MRoPE of the prompt, then text positions index + delta, the noisy copy reusing the clean ones

The prompt (and its image) is stored once. Samples of a batch are right padded with kind PAD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bard_deploy.config import ModelConfig
from bard_deploy.data.chat import Example
from bard_deploy.diffusion.mask import CLEAN, NOISY, PAD, PROMPT, Layout
from bard_deploy.vision import rope_index


@dataclass
class TrainBatch:
    """A collated batch of N samples right-padded to L tokens (AR or the packed diffusion layout, see the module
    docstring), as the loss functions take it."""

    input_ids: torch.Tensor          # (N, L) clean tokens (the noisy copy holds the clean targets until corrupted)
    position_ids: torch.Tensor       # (3, N, L)
    layout: Layout                   # (N, L) kind / block / index
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    loss_mask: torch.Tensor          # (N, L) bool: AR, positions whose *next* token is a response token;
    #                                  diffusion, the noisy copy (the noise then picks which are corrupted)
    block_size: int | None = None    # diffusion batches only

    @property
    def num_samples(self) -> int:
        """N, the number of samples in the batch."""
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> TrainBatch:
        """The batch on `device` (the trainer's; a no-op on CPU)."""
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        lay = self.layout
        return TrainBatch(move(self.input_ids), move(self.position_ids),
                          Layout(move(lay.kind), move(lay.block), move(lay.index)), move(self.pixel_values),
                          move(self.image_grid_thw), move(self.loss_mask), self.block_size)


def _prompt_positions(ex: Example, cfg: ModelConfig) -> tuple[torch.Tensor, int]:
    """MRoPE positions (3, P) of the prompt and the delta that continues text positions after it (computed once
    per example and config, then read from `ex.positions`; callers only read the tensor)."""
    key = (cfg.image_token_id, cfg.spatial_merge_size)
    if key not in ex.positions:
        ids = torch.tensor([ex.prompt_ids])
        pos, delta = rope_index(ids, cfg.image_token_id, ex.image_grid_thw, cfg.spatial_merge_size)
        ex.positions[key] = (pos[:, 0], int(delta[0]))
    return ex.positions[key]


def _stack(rows: list[dict], pad_id: int) -> dict:
    """Right-pad per-sample 1-D fields to the longest and stack them."""
    L = max(r["input_ids"].shape[-1] for r in rows)
    out = {}
    pads = {"input_ids": pad_id, "kind": PAD, "block": 0, "index": 0, "position_ids": 0, "loss_mask": False}
    for key, value in pads.items():
        out[key] = torch.stack([torch.nn.functional.pad(r[key], (0, L - r[key].shape[-1]), value=value)
                                for r in rows], dim=-2)
    return out


def _images(examples: list[Example]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    pv = [p for p in (e.pixel_values for e in examples) if p is not None]     # made once per example
    grid = [e.image_grid_thw for e in examples if e.image_grid_thw is not None]
    return (torch.cat(pv), torch.cat(grid)) if pv else (None, None)


def collate_ar(examples: list[Example], cfg: ModelConfig, pad_id: int) -> TrainBatch:
    """`[prompt | response]`, causal: every real token is a PROMPT-kind token (the AR special case)."""
    rows = []
    for ex in examples:
        ids = torch.tensor(ex.prompt_ids + ex.response_ids)
        P, R = len(ex.prompt_ids), len(ex.response_ids)
        pos_p, delta = _prompt_positions(ex, cfg)
        pos = torch.cat([pos_p, (torch.arange(P, P + R) + delta).expand(3, -1)], 1)
        loss = torch.zeros(P + R, dtype=torch.bool)
        loss[P - 1:P + R - 1] = True                       # logits at i predict token i + 1
        rows.append({"input_ids": ids, "kind": torch.full((P + R,), PROMPT), "position_ids": pos,
                     "block": torch.zeros(P + R, dtype=torch.long), "index": torch.arange(P + R), "loss_mask": loss})
    s = _stack(rows, pad_id)
    pv, grid = _images(examples)
    return TrainBatch(s["input_ids"], s["position_ids"], Layout(s["kind"], s["block"], s["index"]), pv, grid,
                      s["loss_mask"])


def collate_diffusion(examples: list[Example], cfg: ModelConfig, block_size: int, pad_id: int, eos_id: int,
                      prompt_attention: str = "causal") -> TrainBatch:
    """The packed `[prompt | clean | noisy]` layout (module docstring)."""
    rows = []
    for ex in examples:
        P = len(ex.prompt_ids)
        R = -(-len(ex.response_ids) // block_size) * block_size
        resp = torch.tensor(ex.response_ids + [eos_id] * (R - len(ex.response_ids)))
        pos_p, delta = _prompt_positions(ex, cfg)
        pos_r = (torch.arange(P, P + R) + delta).expand(3, -1)
        blocks = torch.arange(R) // block_size
        prompt_block = torch.arange(P) // (block_size if prompt_attention == "block" else P)
        rows.append({
            "input_ids": torch.cat([torch.tensor(ex.prompt_ids), resp, resp]),
            "position_ids": torch.cat([pos_p, pos_r, pos_r], 1),
            "kind": torch.cat([torch.full((P,), PROMPT), torch.full((R,), CLEAN), torch.full((R,), NOISY)]),
            "block": torch.cat([prompt_block, blocks, blocks]),
            "index": torch.cat([torch.arange(P), torch.arange(P, P + R), torch.arange(P, P + R)]),
            "loss_mask": torch.cat([torch.zeros(P + R, dtype=torch.bool), torch.ones(R, dtype=torch.bool)]),
        })
    s = _stack(rows, pad_id)
    pv, grid = _images(examples)
    return TrainBatch(s["input_ids"], s["position_ids"], Layout(s["kind"], s["block"], s["index"]), pv, grid,
                      s["loss_mask"], block_size)
