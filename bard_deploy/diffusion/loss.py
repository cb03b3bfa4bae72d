"""Losses computed only where they are taken: the LM head runs on the selected hidden states, over the
vocabulary in chunks (each chunk recomputed in backward), so no (positions x vocab) logits tensor lives at once
when the vocabulary is large.

- `weighted_ce`: the BARD objective, CE at corrupted positions x min(1/t, cap), normalised by each sample's noisy
  length, averaged over samples (returned as a per-sample vector; the caller divides by the global batch).
- `next_token_ce`: the AR objective, per-sample mean CE of the response tokens.
- `topk_kl`: stage-wise distillation, forward KL from the teacher to the student over its top-k + the rest.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_stats(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = (h @ w.T).float()                                           # (M, chunk)
    local = targets.clamp(0, w.shape[0] - 1)
    hit = (targets >= 0) & (targets < w.shape[0])
    target_logit = torch.where(hit, logits.gather(1, local[:, None]).squeeze(1), torch.zeros_like(targets,
                                                                                                  dtype=logits.dtype))
    return torch.logsumexp(logits, dim=-1), target_logit


def chunked_logsumexp_and_target(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 chunk: int = 32768) -> tuple[torch.Tensor, torch.Tensor]:
    """logsumexp over the vocabulary and the target's logit for hidden rows h (M, H), head weight (V, H)."""
    V = weight.shape[0]
    if V <= chunk:
        return _chunk_stats(h, weight, targets)
    lse = torch.full((h.shape[0],), float("-inf"), device=h.device)
    tgt = torch.zeros(h.shape[0], device=h.device)
    for start in range(0, V, chunk):
        w = weight[start:start + chunk]
        c_lse, c_tgt = checkpoint(_chunk_stats, h, w, targets - start, use_reentrant=False)
        lse = torch.logaddexp(lse, c_lse)
        tgt = tgt + c_tgt
    return lse, tgt


def head_weight(model) -> torch.Tensor:
    """The LM head's (V, hidden) weight: the input embedding when the head is tied (`lm_head` is None)."""
    return model.language_model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight


def per_sample_mean(values: torch.Tensor, rows: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """Sum `values` (M,) into their samples (`rows` (M,)), divided by denom (N,) -> (N,)."""
    sums = torch.zeros(denom.shape[0], device=values.device).index_add(0, rows, values)
    return sums / denom.clamp(min=1)


def weighted_ce(model, hidden: torch.Tensor, targets: torch.Tensor, corrupted: torch.Tensor, t: torch.Tensor,
                noisy: torch.Tensor, weight_cap: float) -> tuple[torch.Tensor, dict]:
    """Per-sample BARD loss (N,) and metrics. hidden (N, L, H); targets/corrupted/t/noisy (N, L)."""
    rows, cols = corrupted.nonzero(as_tuple=True)
    lse, tgt = chunked_logsumexp_and_target(hidden[rows, cols], head_weight(model), targets[rows, cols])
    ce = lse - tgt                                                        # (M,)
    w = (1.0 / t[rows, cols]).clamp(max=weight_cap)
    loss = per_sample_mean(ce * w, rows, noisy.sum(1).float())
    return loss, {"ce": float(ce.detach().mean()) if ce.numel() else 0.0, "corrupted": int(rows.numel())}


def next_token_ce(model, hidden: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor
                  ) -> tuple[torch.Tensor, dict]:
    """Per-sample AR loss (N,): mean CE of predicting token i+1 at each loss position i."""
    rows, cols = loss_mask.nonzero(as_tuple=True)
    lse, tgt = chunked_logsumexp_and_target(hidden[rows, cols], head_weight(model), input_ids[rows, cols + 1])
    ce = lse - tgt
    return per_sample_mean(ce, rows, loss_mask.sum(1).float()), {"ce": float(ce.detach().mean())}


def topk_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int = 16,
            temperature: float = 1.0) -> torch.Tensor:
    """(M,) forward KL(teacher || student) over k + 1 categories: the teacher's top-k tokens and "the rest".

    The reference renormalises the teacher over its top-k and compares with the student's full softmax; that
    term is not zero (and its gradient not zero) when student == teacher. Keeping the teacher's leftover mass as
    one bucket makes it a true divergence on the truncated support: >= 0, and 0 with zero gradient exactly when
    the two agree there; the teacher still only contributes its top-k (and its log-normaliser).
    """
    t = teacher_logits.float() / temperature
    s = student_logits.float() / temperature
    top, idx = t.topk(min(k, t.shape[-1]), dim=-1)
    log_q = top - torch.logsumexp(t, dim=-1, keepdim=True)                    # (M, k)
    log_p = s.gather(-1, idx) - torch.logsumexp(s, dim=-1, keepdim=True)      # (M, k)
    q_rest = (1 - log_q.exp().sum(-1)).clamp(min=1e-12)
    p_rest = (1 - log_p.exp().sum(-1)).clamp(min=1e-12)
    return (log_q.exp() * (log_q - log_p)).sum(-1) + q_rest * (q_rest.log() - p_rest.log())
