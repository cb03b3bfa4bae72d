"""The mask builder matches DESIGN.md section 4's table (hand-checked example + property test)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bard_deploy.diffusion.mask import CLEAN, NOISY, PAD, PROMPT, Layout, attention_bias, training_layout, visibility


def table(qk, qb, qi, kk, kb, ki, prompt_attention):
    """DESIGN.md section 4, transcribed literally, one (query, key) pair at a time."""
    if PAD in (qk, kk):
        return False
    if qk == PROMPT:
        if kk != PROMPT:
            return False
        return ki <= qi if prompt_attention == "causal" else kb <= qb
    if kk == PROMPT:
        return True
    if qk == CLEAN:
        return kk == CLEAN and kb <= qb
    # noisy query
    return (kk == CLEAN and kb < qb) or (kk == NOISY and kb == qb)


def test_training_layout_by_hand():
    # prompt of 3, response of 2 blocks of 2: [p p p | c0 c0 c1 c1 | n0 n0 n1 n1]
    vis = visibility(*[training_layout(3, 4, 2)] * 2, "causal")[0].int()
    expected = torch.tensor([
        # p  p  p  c  c  c  c  n  n  n  n
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # p0
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # p1
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # p2
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],  # c block 0
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0],  # c block 1
        [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0],  # n block 0: prompt + own noisy block
        [1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1],  # n block 1: prompt + clean block 0 + own noisy block
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1],
    ])
    assert torch.equal(vis, expected)
    # block-causal prompt (blocks of 2 from index 0): p0 and p1 see each other, p2 sees all three
    vis_b = visibility(*[training_layout(3, 4, 2)] * 2, "block")[0].int()
    assert vis_b[:3, :3].tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 1]]
    # the training layout: noisy copies share their clean twins' indices and block ids
    lay = training_layout(3, 4, 2)
    assert torch.equal(lay.index[0, 3:7], lay.index[0, 7:]) and torch.equal(lay.block[0, 3:7], lay.block[0, 7:])


token = st.tuples(st.sampled_from([PAD, PROMPT, CLEAN, NOISY]), st.integers(0, 3), st.integers(0, 20))


@settings(max_examples=150, deadline=None)
@given(q=st.lists(token, min_size=1, max_size=12), k=st.lists(token, min_size=1, max_size=12),
       prompt_attention=st.sampled_from(["causal", "block"]))
def test_visibility_matches_table(q, k, prompt_attention):
    def layout(tokens):
        return Layout(*(torch.tensor([[t[i] for t in tokens]]) for i in range(3)))

    got = visibility(layout(q), layout(k), prompt_attention)[0]
    for i, (qk, qb, qi) in enumerate(q):
        for j, (kk, kb, ki) in enumerate(k):
            assert bool(got[i, j]) == table(qk, qb, qi, kk, kb, ki, prompt_attention), (q[i], k[j])


def test_bias_is_additive_and_finite():
    lay = training_layout(2, 4, 4)
    bias = attention_bias(lay, lay)
    assert bias.shape == (1, 1, 10, 10) and torch.isfinite(bias).all()
    assert set(bias.unique().tolist()) == {0.0, torch.finfo(torch.float32).min}
