"""The Qwen3-VL vision tower (transformers' implementation: it runs once per image) and MRoPE positions.

`encode_images` turns pixel patches into the merged image embeddings and the DeepStack features;
`rope_index` gives the 3-row MRoPE position ids of a prompt with images, exactly as Qwen3-VL does.
"""

from __future__ import annotations

import torch
from torch import nn

from bard_deploy.errors import RuntimeInputError


def build_vision_tower(vision: dict) -> nn.Module:
    """transformers' Qwen3VLVisionModel from an HF `vision_config` dict (no download, no remote code)."""
    from transformers import Qwen3VLVisionConfig, Qwen3VLVisionModel

    cfg = Qwen3VLVisionConfig(**vision)
    cfg._attn_implementation = "sdpa"
    return Qwen3VLVisionModel(cfg)


def encode_images(visual: nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_values (patches, C*tps*ps*ps), grid_thw (images, 3) ->
    image embeds (tokens, hidden) and DeepStack features (n_ds, tokens, hidden)."""
    out = visual(pixel_values.to(visual.dtype), grid_thw=grid_thw, return_dict=True)
    embeds = out.pooler_output                                                   # (tokens, hidden)
    ds = out.deepstack_features
    deepstack = torch.stack(ds) if ds else embeds.new_zeros(0, *embeds.shape)     # (n_ds, tokens, hidden)
    return embeds, deepstack


def grid_inputs(vision: dict, grid_thw: list[int] | torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the vision tower derives from an image's grid (t, h, w) alone, computed by transformers' own helpers
    exactly as `Qwen3VLVisionModel.forward` does: per patch the 4 bilinear taps (indices, fp32 weights) that
    resample the learned square position table, and the (h, w) rotary positions, in the processor's patch order
    (spatial-merge blocks). The vision graph takes them as inputs, so it runs at any grid."""
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

    grid = torch.as_tensor(grid_thw, dtype=torch.long).reshape(1, 3)
    merge = vision.get("spatial_merge_size", 2)
    side = int(vision.get("num_position_embeddings", 2304) ** 0.5)
    indices, weights = get_vision_interpolation_indices_and_weights(grid, num_grid_per_side=side, mode="bilinear",
                                                                    align_corners=True, spatial_merge_size=merge)
    return indices.long(), weights.float(), get_vision_position_ids(grid, merge).long()


def merge_image_features(inputs_embeds: torch.Tensor, input_ids: torch.Tensor, image_token_id: int,
                         feats: torch.Tensor, deepstack: torch.Tensor, video_token_id: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Put visual features where the image-pad (and video-pad) tokens are (row-major over the batch, as HF
    does): images and videos are one stream, in the order they appear.

    inputs_embeds (B, L, hidden), feats (tokens, hidden), deepstack (n_ds, tokens, hidden) ->
    inputs_embeds with the visual rows replaced, and deepstack_embeds (n_ds, B, L, hidden), zero off them.
    """
    where = visual_mask(input_ids, image_token_id, video_token_id).to(inputs_embeds.device)    # (B, L)
    n = int(where.sum())
    if n != feats.shape[0]:
        raise RuntimeInputError(f"prompt has {n} image / video tokens but the inputs give {feats.shape[0]} features",
                                n)
    x = inputs_embeds.masked_scatter(where.unsqueeze(-1), feats.to(inputs_embeds.dtype))
    ds = x.new_zeros(deepstack.shape[0], *x.shape)
    ds[:, where] = deepstack.to(x.dtype)
    return x, ds


def visual_mask(input_ids: torch.Tensor, image_token_id: int | None, video_token_id: int | None) -> torch.Tensor:
    """True where a token is an image or a video pad."""
    where = torch.zeros_like(input_ids, dtype=torch.bool)
    for tok in (image_token_id, video_token_id):
        if tok is not None:
            where |= input_ids == tok
    return where


def image_token_count(grid_thw: torch.Tensor, merge: int) -> list[int]:
    """LM tokens per image: t * h * w / merge^2."""
    return [int(t * h * w) // merge**2 for t, h, w in grid_thw.tolist()]


def frame_grids(grid_thw: torch.Tensor | None) -> list[list[int]]:
    """The LM-side grids of the visual inputs: an image's own (t = 1), a video's split into one (1, h, w) per
    temporal patch (Qwen3-VL separates them by timestamps, so each is a run of its own)."""
    if grid_thw is None:
        return []
    return [[1, h, w] for t, h, w in grid_thw.tolist() for _ in range(t)]


def rope_index(input_ids: torch.Tensor, image_token_id: int | None, grid_thw: torch.Tensor | None,
               merge: int, attention_mask: torch.Tensor | None = None, video_token_id: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """MRoPE position ids (3, B, L) and rope deltas (B,) for a (left-padded) batch of prompts.

    Text tokens advance all three rows together. An image of merged grid (1, h, w), and each temporal patch of a
    video (its own run of video pads), gets rows (start, start + h_idx, start + w_idx) and advances the position
    by max(h, w). Padding gets 0. The delta (max position + 1 - real length) shifts every later text position:
    position = index + delta. `grid_thw` holds images and videos in the order they appear (row-major).
    """
    B, L = input_ids.shape
    pos = torch.zeros(3, B, L, dtype=torch.long)
    deltas = torch.zeros(B, dtype=torch.long)
    grids = frame_grids(grid_thw)
    visual = visual_mask(input_ids, image_token_id, video_token_id)
    g = 0  # next visual run in the batch (numbered row-major, as HF's masked_scatter does)
    for b in range(B):
        keep = torch.ones(L, dtype=torch.bool) if attention_mask is None else attention_mask[b].bool()
        ids, vis = input_ids[b][keep].tolist(), visual[b][keep].tolist()
        rows: list[torch.Tensor] = []
        cur, i = 0, 0
        while i < len(ids):
            if vis[i]:
                if g >= len(grids):
                    raise RuntimeInputError(f"row {b} has more image / video token runs than the inputs give "
                                            f"({len(grids)})", len(grids))
                h, w = grids[g][1] // merge, grids[g][2] // merge
                n = h * w
                if ids[i:i + n] != [ids[i]] * n:
                    raise RuntimeInputError(
                        f"row {b}: visual run {g} needs {n} consecutive image / video tokens at index {i}", n)
                hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
                rows.append(torch.stack([torch.zeros_like(hh), hh, ww]).reshape(3, -1) + cur)
                cur += max(h, w)
                i += n
                g += 1
            else:
                j = i
                while j < len(ids) and not vis[j]:
                    j += 1
                rows.append(torch.arange(cur, cur + j - i).expand(3, -1))
                cur += j - i
                i = j
        if rows:
            row = torch.cat(rows, dim=1)
            pos[:, b, keep] = row
            deltas[b] = int(row.max()) + 1 - len(ids)
    if g != len(grids):
        raise RuntimeInputError(f"{len(grids)} image / video runs given but the prompts hold {g}", len(grids))
    return pos, deltas
