"""The BARD training objective: block-diffusion CE at the corrupted positions, weighted min(1/t, cap), plus
the optional top-k KL from a frozen teacher (SWD) and the anchor's experimental shift-distillation term."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from bard_deploy.data.collate import TrainBatch
from bard_deploy.diffusion.loss import next_token_ce, per_sample_mean, topk_kl, weighted_ce
from bard_deploy.diffusion.mask import CLEAN, NOISY, PAD, PROMPT, Layout, training_mask
from bard_deploy.diffusion.noise import corrupt
from bard_deploy.train.recipe import ANCHOR_BLOCK
from bard_deploy.vlm import BardVLM


def with_block_size(layout: Layout, block: int, prompt_attention: str) -> Layout:
    """The same packed tokens re-cut into blocks of `block` (the teacher's view): response blocks j // block,
    prompt blocks i // block under block-causal prompts."""
    kind = layout.kind
    resp = (kind == CLEAN) | (kind == NOISY)
    start = torch.where(kind == PROMPT, 1, 0).sum(1, keepdim=True)         # prompt length per sample
    new_block = torch.where(resp, (layout.index - start) // block, layout.block)
    if prompt_attention == "block":
        new_block = torch.where(kind == PROMPT, layout.index // block, new_block)
    return Layout(kind, new_block, layout.index)


@dataclass(frozen=True)
class LossSetup:
    """What one training pass's loss needs; frozen, so a pass derives its own with `dataclasses.replace`."""

    noise: str                               # "mask" or "mix" (see diffusion.noise.corrupt)
    mask_id: int
    text_tokens: torch.Tensor                # ids a `mix` replacement may draw (text_token_ids)
    t_min: float
    weight_cap: float                        # cap of the 1/t weight of the corrupted positions' CE
    prompt_attention: str                    # "causal" or "block"
    teacher: BardVLM | None = None           # the SWD pass's frozen teacher (None: no KL term)
    teacher_is_ar: bool = False              # the teacher is the AR source (the ablation), not the B4 anchor
    distill_lambda: float = 0.5
    topk: int = 16
    temperature: float = 1.0
    shift_teacher: BardVLM | None = None     # the AR source, for the anchor's shift-distillation term
    shift_weight: float = 0.0
    ar_weight: float = 0.0                   # dual mode: weight of the next-token CE on the clean response
    keep_weight: float = 0.0                 # mix noise: weight of the CE at noisy positions left unchanged


def bard_loss(setup: LossSetup) -> Callable:
    """loss_fn(model, batch, gens) -> (per-sample losses [num_samples], float metrics) for the Trainer; `gens`
    holds one torch.Generator per sample, so a sample's noise does not depend on its batch mates."""

    def fn(model, batch: TrainBatch, gens):
        module = getattr(model, "module", model)
        c = corrupt(batch.input_ids, batch.layout, setup.noise, setup.mask_id, setup.text_tokens, setup.t_min, gens)
        h = model(c.input_ids, batch.position_ids, training_mask(batch.layout, setup.prompt_attention),
                  batch.pixel_values, batch.image_grid_thw)
        per_sample, metrics = weighted_ce(module, h, batch.input_ids, c.corrupted, c.t, batch.loss_mask,
                                          setup.weight_cap)
        if setup.noise == "mix" and setup.keep_weight > 0:      # judge every visible token, right ones too
            kept = batch.loss_mask & ~c.corrupted
            keep_ce, _ = weighted_ce(module, h, batch.input_ids, kept, torch.ones_like(c.t), batch.loss_mask, 1.0)
            per_sample = per_sample + setup.keep_weight * keep_ce
            metrics["keep_ce"] = float(keep_ce.detach().mean())
        rows, cols = c.corrupted.nonzero(as_tuple=True)
        scored = batch.loss_mask.sum(1).float()
        if setup.teacher is not None:
            with torch.no_grad():
                t_logits = teacher_logits(setup, batch, c.input_ids, rows, cols)
            s_logits = module.head(h[rows, cols])
            kl = topk_kl(s_logits, t_logits, setup.topk, setup.temperature)
            per_sample = per_sample + setup.distill_lambda * per_sample_mean(kl, rows, scored)
            metrics["kl"] = float(kl.detach().mean()) if kl.numel() else 0.0
        if setup.ar_weight > 0:
            ar_ce = causal_view_ce(model, batch)
            per_sample = per_sample + setup.ar_weight * ar_ce
            metrics["ar_ce"] = float(ar_ce.detach().mean())
        if setup.shift_teacher is not None:
            with torch.no_grad():
                target = ar_hidden_before(setup.shift_teacher, batch, rows, cols)
            gap = 1 - torch.nn.functional.cosine_similarity(h[rows, cols], target, dim=-1)
            per_sample = per_sample + setup.shift_weight * per_sample_mean(gap, rows, scored)
            metrics["shift"] = float(gap.detach().mean()) if gap.numel() else 0.0
        return per_sample, metrics

    return fn


def causal_view_ce(model, batch: TrainBatch) -> torch.Tensor:
    """Per-sample next-token CE of the clean response under the packed batch's causal view (dual mode): the
    prompt and the clean copy as one causal sequence (the AR special case), read over the columns up to the
    longest such prefix (the noisy copy cut off, what is left of it hidden as PAD); each clean token is
    predicted from the position before it, as an AR model decodes."""
    kind = batch.layout.kind
    width = int(((kind == PROMPT) | (kind == CLEAN)).sum(1).max())
    kind = kind[:, :width]
    lay = batch.layout[:width]
    view = Layout(torch.where(kind == CLEAN, PROMPT, torch.where(kind == NOISY, PAD, kind)), lay.block, lay.index)
    h = model(batch.input_ids[:, :width], batch.position_ids[..., :width], training_mask(view, "causal"),
              batch.pixel_values, batch.image_grid_thw)
    predicts = torch.zeros_like(kind, dtype=torch.bool)
    predicts[:, :-1] = kind[:, 1:] == CLEAN                  # the logits at i predict token i + 1
    return next_token_ce(getattr(model, "module", model), h, batch.input_ids[:, :width], predicts)[0]


def teacher_logits(setup: LossSetup, batch: TrainBatch, noisy_ids: torch.Tensor, rows: torch.Tensor,
                   cols: torch.Tensor) -> torch.Tensor:
    """The teacher's logits for the corrupted positions (rows, cols) of the packed batch.

    B4 anchor: the same corrupted sequence under the block-4 mask, read at the same positions (no shift).
    AR source (ablation): the clean prefix, causally; the token at response offset j is read from the logits
    of the position before it (its clean twin's predecessor).
    """
    t = setup.teacher
    if not setup.teacher_is_ar:
        lay = with_block_size(batch.layout, ANCHOR_BLOCK, setup.prompt_attention)
        h = t(noisy_ids, batch.position_ids, training_mask(lay, setup.prompt_attention), batch.pixel_values,
              batch.image_grid_thw)
        return t.head(h[rows, cols])
    return t.head(ar_hidden_before(t, batch, rows, cols))


def ar_hidden_before(ar: BardVLM, batch: TrainBatch, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The AR model's final hidden states that predict the tokens at noisy positions (rows, cols): the clean
    prefix read causally (the noisy copy cut off), at the position before each one's clean twin."""
    lay = batch.layout
    R = (lay.kind == NOISY).sum(1)
    # only [prompt | clean response] is read, as one causal prompt: cut the columns after the longest such prefix
    clean = (lay.kind == PROMPT) | (lay.kind == CLEAN)
    width = int(clean.sum(1).max())
    lay = lay[:width]
    causal = Layout(torch.where(clean[:, :width], PROMPT, 0), lay.block, lay.index)
    h = ar(batch.input_ids[:, :width], batch.position_ids[..., :width], training_mask(causal, "causal"),
           batch.pixel_values, batch.image_grid_thw)
    # noisy position (row, col) -> its clean twin col - R -> the position before it
    return h[rows, cols - R[rows] - 1]


def text_token_ids(tokenizer) -> torch.Tensor:
    """Ids a `mix` replacement may draw: every token but the special ones (chat, vision, mask, pad, ...)."""
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return torch.tensor([i for i in range(len(tokenizer)) if i not in special])
