"""The slow reference decoder: no cache, the whole sequence recomputed at every step.

Obviously correct by construction (one forward over `[prompt | committed blocks | canvas]` under the
DESIGN.md mask), it shares only the per-step rule (`denoise_step`) with the fast runtime; a test shows the two
emit identical tokens (greedy, fp32).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bard_deploy.diffusion.mask import CLEAN, NOISY, Layout, attention_bias, prompt_layout, response_layout
from bard_deploy.runtimes.decode import DecodeOptions, PromptBatch, denoise_step, truncate_at_eos


@torch.inference_mode()
def reference_generate(model, batch: PromptBatch, opts: DecodeOptions, eos_ids: Sequence[int]) -> list[list[int]]:
    """Block-diffusion decoding by full recompute; token ids per row (same truncation as the runtime)."""
    cfg = model.config
    opts = opts.resolved(cfg)
    B_sz, mask_id, pa = opts.block_size, cfg.bard.mask_token_id, cfg.bard.prompt_attention
    rows = batch.input_ids.shape[0]
    x_p, ds_p = model.embed(batch.input_ids, batch.pixel_values, batch.image_grid_thw)
    pos_p, delta = model.positions(batch.input_ids, batch.image_grid_thw, batch.attention_mask)
    lay_p = prompt_layout(batch.attention_mask, B_sz if pa == "block" else None)
    start = batch.lengths
    gen = torch.Generator().manual_seed(opts.seed) if opts.seed is not None else None
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long)
    done = torch.zeros(rows, dtype=torch.bool)
    committed: list[torch.Tensor] = []
    for b in range(-(-opts.max_new_tokens // B_sz)):
        canvas = torch.full((rows, B_sz), mask_id, dtype=torch.long)
        canvas[done] = int(eos[0]) if len(eos) else mask_id
        edits_left = torch.full((rows,), opts.max_edits, dtype=torch.long)
        for s in range(opts.max_steps):
            masked = canvas == mask_id
            if not masked.any():
                break
            resp = torch.cat([*committed, canvas], 1)                                  # (B, (b+1) * B_sz)
            lay = Layout.cat([lay_p, response_layout(rows, start, 0, b * B_sz, B_sz, CLEAN),
                              response_layout(rows, start + b * B_sz, b, B_sz, B_sz, NOISY)])
            n = resp.shape[1]
            x = torch.cat([x_p, model.language_model.embed_tokens(resp)], 1)
            pos = torch.cat([pos_p, (lay.index[:, -n:] + delta[:, None]).unsqueeze(0).expand(3, -1, -1)], 2)
            ds = None if ds_p is None else torch.cat([ds_p, ds_p.new_zeros(ds_p.shape[0], rows, n, ds_p.shape[-1])], 2)
            logits, _ = model.step(x, pos, attention_bias(lay, lay, pa), None, ds)
            canvas, _ = denoise_step(logits[:, -B_sz:], canvas, masked, edits_left, s, opts,
                                     mask_id, gen)
        committed.append(canvas)
        done |= torch.isin(canvas, eos).any(1)
        if bool(done.all()):
            break
    return truncate_at_eos(torch.cat(committed, 1).tolist(), set(eos_ids), opts.max_new_tokens)
