"""Noise statistics, loss weights, selective/chunked CE and the distillation KL."""

import math

import pytest
import torch

from bard_deploy.diffusion.loss import chunked_logsumexp_and_target, topk_kl, weighted_ce
from bard_deploy.diffusion.mask import training_layout
from bard_deploy.diffusion.noise import block_times, corrupt, mix_probabilities

MASK = 99


def packed(prompt=5, response=64, block=8, n=1):
    lay = training_layout(prompt, response, block)
    lay = type(lay)(lay.kind.repeat(n, 1), lay.block.repeat(n, 1), lay.index.repeat(n, 1))
    ids = torch.randint(0, 50, (n, prompt + 2 * response))
    ids[:, prompt + response:] = ids[:, prompt:prompt + response]
    return ids, lay


def test_block_times_are_stratified_and_clamped_after():
    g = torch.Generator().manual_seed(0)
    for n in (1, 3, 10, 100):
        t = block_times(n, 0.05, g)
        strata = sorted(t.tolist())
        for i, v in enumerate(strata):   # one time per stratum [i/n, (i+1)/n), then clamped to >= t_min
            assert max(i / n, 0.05) - 1e-6 <= v <= max((i + 1) / n, 0.05) + 1e-6
    assert block_times(100, 0.05, g).min() >= 0.05          # the reference would go down to 0.0005


def test_mask_rate_per_block_matches_t():
    ids, lay = packed(response=4000, block=1000, n=1)
    g = [torch.Generator().manual_seed(1)]
    c = corrupt(ids, lay, "mask", MASK, torch.arange(50), 0.01, g)
    noisy = lay.kind[0] == 3
    for b in range(4):
        sel = noisy & (lay.block[0] == b)
        t = c.t[0, sel][0].item()
        rate = (c.input_ids[0, sel] == MASK).float().mean().item()
        assert abs(rate - t) < 0.04, (b, t, rate)          # 1000 Bernoulli(t) draws: sd <= 0.016
    # the prompt and the clean copy are untouched
    assert torch.equal(c.input_ids[0, ~noisy], ids[0, ~noisy])


def test_mix_category_frequencies_match_the_formulas():
    for t in (0.25, 0.5, 0.9):
        p = mix_probabilities(torch.tensor(t))
        phi = math.pi * t / 2
        assert p[0].item() == pytest.approx(1 - math.cos(phi), abs=1e-6)
        assert p[1].item() == pytest.approx(math.sin(phi) + math.cos(phi) - 1, abs=1e-6)
    ids, lay = packed(prompt=1, response=20000, block=20000)
    text = torch.arange(1000, 1100)   # replacements come from here only
    c = corrupt(ids, lay, "mix", MASK, text, 0.01, [torch.Generator().manual_seed(3)])
    noisy = lay.kind[0] == 3
    t = c.t[0, noisy][0]
    got = c.input_ids[0, noisy]
    p = mix_probabilities(t)
    assert (got == MASK).float().mean().item() == pytest.approx(p[0].item(), abs=0.015)
    assert ((got >= 1000) & (got < 1100)).float().mean().item() == pytest.approx(p[1].item(), abs=0.015)
    assert ((got < 50) & (got == ids[0, noisy])).float().mean().item() == pytest.approx(p[2].item(), abs=0.015)
    assert torch.equal(c.corrupted[0, noisy], got != ids[0, noisy])


def test_noise_depends_on_the_sample_seed_only():
    ids, lay = packed(n=3)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6, 7)]  # noqa: E731
    full = corrupt(ids, lay, "mix", MASK, torch.arange(50), 0.01, gens())
    one = corrupt(ids[1:2], type(lay)(lay.kind[1:2], lay.block[1:2], lay.index[1:2]), "mix", MASK,
                  torch.arange(50), 0.01, gens()[1:2])
    assert torch.equal(full.input_ids[1], one.input_ids[0])


def test_loss_weights_are_finite_for_every_t():
    hidden = torch.randn(1, 8, 4)

    class Head:  # minimal model: tied-free head
        lm_head = torch.nn.Linear(4, 10, bias=False)

    targets = torch.randint(0, 10, (1, 8))
    noisy = torch.ones(1, 8, dtype=torch.bool)
    for t in (1e-9, 1e-3, 0.5, 1.0):
        loss, _ = weighted_ce(Head, hidden, targets, noisy, torch.full((1, 8), t), noisy, weight_cap=100.0)
        assert torch.isfinite(loss).all()
    small, _ = weighted_ce(Head, hidden, targets, noisy, torch.full((1, 8), 1e-9), noisy, weight_cap=100.0)
    one, _ = weighted_ce(Head, hidden, targets, noisy, torch.full((1, 8), 1.0), noisy, weight_cap=100.0)
    assert small.item() == pytest.approx(100 * one.item(), rel=1e-5)   # the cap, not 1e9


def test_chunked_ce_equals_full_ce_and_gradients():
    torch.manual_seed(0)
    h = torch.randn(6, 16, requires_grad=True)
    w = torch.randn(100, 16, requires_grad=True)
    y = torch.randint(0, 100, (6,))
    lse, tgt = chunked_logsumexp_and_target(h, w, y, chunk=7)
    loss = (lse - tgt).sum()
    loss.backward()
    g_h, g_w = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = torch.nn.functional.cross_entropy(h @ w.T, y, reduction="sum")
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(g_h, h.grad, atol=1e-5) and torch.allclose(g_w, w.grad, atol=1e-5)


def test_topk_kl_is_zero_for_identical_models_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    assert topk_kl(logits, logits).abs().max().item() < 1e-5
    other = torch.randn(5, 50)
    assert (topk_kl(other, logits) > 0).all()
    s = logits.clone().requires_grad_(True)
    topk_kl(s, logits).sum().backward()
    assert s.grad.abs().max().item() < 1e-5                     # no pull when the student already agrees
