"""The decoder step over a KV cache equals a full recompute without cache (prefill, then blocks)."""

import pytest
import torch

from bard_deploy.config import ModelConfig
from bard_deploy.diffusion.mask import CLEAN, NOISY, Layout, attention_bias, prompt_layout, response_layout
from bard_deploy.vlm import BardVLM
from tiny import MASK_ID, image_inputs, image_prompt, qwen3_vl_config

B = 4  # block size


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(qwen3_vl_config().to_dict()).with_bard(mask_token_id=MASK_ID, block_size=B)
    m = BardVLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


def text_positions(index: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Response tokens are text: all three MRoPE rows are index + delta."""
    return (index + delta[:, None]).unsqueeze(0).expand(3, -1, -1)


@pytest.mark.parametrize("prompt_attention", ["causal", "block"])
@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text"])
@torch.no_grad()
def test_cached_blocks_equal_full_recompute(model, prompt_attention, with_image):
    pv, grid, n = image_inputs()
    prompt = image_prompt(n, [5, 6], [7, 8, 9]) if with_image else [5, 6, 7, 8, 9, 10, 11]
    if not with_image:
        pv = grid = None
    ids = torch.tensor([prompt])
    P = ids.shape[1]
    am = torch.ones_like(ids)
    resp = torch.randint(10, 900, (1, 3 * B))             # 2 committed blocks + the clean text of a 3rd
    canvas = resp[:, 2 * B:].clone()
    canvas[:, ::2] = MASK_ID                               # the 3rd block half denoised
    x_p, ds = model.embed(ids, pv, grid)
    pos_p, delta = model.positions(ids, grid, am)
    lay_p = prompt_layout(am, B)
    start = torch.tensor([P])
    clean = response_layout(1, start, 0, 2 * B, B, CLEAN)
    noisy = response_layout(1, start + 2 * B, 2, B, B, NOISY)
    emb = model.language_model.embed_tokens

    # (1) full recompute over [prompt | clean blocks 0, 1 | noisy block 2], no cache
    lay = Layout.cat([lay_p, clean, noisy])
    x = torch.cat([x_p, emb(resp[:, :2 * B]), emb(canvas)], 1)
    pos = torch.cat([pos_p, text_positions(clean.index, delta), text_positions(noisy.index, delta)], 2)
    ds_full = None if ds is None else torch.cat([ds, ds.new_zeros(ds.shape[0], 1, 3 * B, ds.shape[-1])], 2)
    full_logits, full_kv = model.step(x, pos, attention_bias(lay, lay, prompt_attention), None, ds_full)

    # (2) cached: prefill, then block 0 alone, then [finished block 1 | canvas of block 2] in one forward,
    #     the way the runtime commits a block with the first step of the next one.
    def cat_kv(a, b):
        return [(torch.cat([ka, kb], 2), torch.cat([va, vb], 2)) for (ka, va), (kb, vb) in zip(a, b, strict=True)]

    _, kv = model.step(x_p, pos_p, attention_bias(lay_p, lay_p, prompt_attention), None, ds)
    keys = lay_p
    for q_lay, tokens in ((clean[:B], resp[:, :B]), (Layout.cat([clean[B:], noisy]), torch.cat(
            [resp[:, B:2 * B], canvas], 1))):
        keys = Layout.cat([keys, q_lay])
        logits, new = model.step(emb(tokens), text_positions(q_lay.index, delta),
                                 attention_bias(q_lay, keys, prompt_attention), kv)
        kv = cat_kv(kv, new)
    assert (logits[:, -B:] - full_logits[:, -B:]).abs().max().item() <= 1e-5
    for (k1, v1), (k2, v2) in zip(kv, full_kv, strict=True):
        assert (k1 - k2).abs().max().item() <= 1e-5 and (v1 - v2).abs().max().item() <= 1e-5


def test_a_chunked_cache_grows_keeps_its_content_and_hides_its_free_columns():
    from bard_deploy.diffusion.mask import PAD
    from bard_deploy.runtimes.kv import KVCache

    c = KVCache(layers=2, batch=1, kv_heads=2, max_len=20, head_dim=3, chunk=8)
    assert c.capacity == 8
    written = []
    for step in range(4):                                     # 5 columns per commit: grows to 8, 16, then 20
        kv = [(torch.randn(1, 2, 5, 3), torch.randn(1, 2, 5, 3)) for _ in range(2)]
        written.append(kv)
        lay = Layout(torch.full((1, 5), CLEAN), torch.full((1, 5), step), torch.arange(5)[None] + 5 * step)
        c.commit(kv, lay)
        assert c.capacity == min(20, -(-c.length // 8) * 8)
    k0 = torch.cat([kv[0][0] for kv in written], dim=2)
    assert torch.equal(c.past()[0][0], k0)                    # every commit survived the copies of growing
    full = c.padded()[0][0]
    assert full.is_contiguous() and full.shape[2] == c.capacity == 20
    c2 = KVCache(layers=1, batch=1, kv_heads=1, max_len=20, head_dim=1, chunk=8)
    c2.commit([(torch.ones(1, 1, 3, 1),) * 2], Layout(torch.full((1, 3), CLEAN), torch.zeros(1, 3, dtype=torch.long),
                                                      torch.arange(3)[None]))
    q = Layout(torch.full((1, 2), NOISY), torch.ones(1, 2, dtype=torch.long), torch.arange(3, 5)[None])
    keys = c2.keys_layout(q, padded=True)
    assert keys.shape == (1, 8 + 2) and (keys.kind[0, 3:8] == PAD).all()
    bias = attention_bias(q, keys)
    assert (bias[0, 0, :, 3:8] == torch.finfo(torch.float32).min).all()     # the free columns are hidden


def test_the_onnxruntime_loop_hands_over_the_buffer_without_a_copy(tmp_path, monkeypatch):
    """IO-bound decoding (the whole chunked buffer bound where it lies, no per-step copy of the past) gives the
    tokens that unbound decoding (the filled part, made contiguous) and torch give; with a chunked buffer the
    past onnxruntime reads is the cache's own memory."""
    import bard_deploy.runtimes.ort_backend as ort_backend
    from bard_deploy.converters.export import export
    from bard_deploy.data.synthetic import make_sample
    from bard_deploy.embedded import new_checkpoint
    from bard_deploy.iospec import past_key
    from bard_deploy.runtimes.api import Pipeline
    from bard_deploy.runtimes.ort_backend import OrtBackend

    ckpt = new_checkpoint(tmp_path / "b4", bard={"block_size": 4}, hidden=64, layers=2)
    export(ckpt, tmp_path / "ex", log=lambda *a: None)
    s = make_sample(5)
    ref = Pipeline.load(ckpt).generate(s.question, images=[s.image()], max_new_tokens=16).token_ids
    shared, bound = [], {}
    step, bind = OrtBackend.step, ort_backend._bind

    def watched(self, feeds, outputs=None, binding=None):
        out = step(self, feeds, outputs, binding)
        if feeds[past_key(0)].shape[2]:                  # what the request's binding points at now
            shared.append(bound[id(binding.iob), past_key(0)] == feeds[past_key(0)].data_ptr())
        return out

    def recording(binding, name, t, output=False):
        bound[id(binding), name] = t.data_ptr()
        bind(binding, name, t, output)

    monkeypatch.setattr(OrtBackend, "step", watched)
    monkeypatch.setattr(ort_backend, "_bind", recording)
    for chunk in (4, 256, None):                        # 4: the buffer grows during the decode
        monkeypatch.setattr(OrtBackend, "padded_past", chunk)
        shared.clear()
        got = Pipeline.load(tmp_path / "ex").generate(s.question, images=[s.image()], max_new_tokens=16)
        assert got.token_ids == ref, chunk
        assert shared and all(shared) == (chunk is not None), chunk
