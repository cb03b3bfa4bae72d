"""The runtime: cached block decoding == the slow reference decoder; AR == transformers' generate;
NFE accounting; per-row EOS; batch == rows alone; invariants under random options (hypothesis); the GPU
loop == the CPU loop."""

import copy
from dataclasses import replace as replace_opts

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bard_deploy.checkpoint import load_model
from bard_deploy.config import ModelConfig
from bard_deploy.errors import ConfigError, RuntimeInputError
from bard_deploy.runtimes.backend import TorchBackend
from bard_deploy.runtimes.decode import DecodeOptions, PromptBatch, generate_ar, generate_bard
from bard_deploy.runtimes.reference import reference_generate
from bard_deploy.vlm import BardVLM
from tiny import IMG, MASK_ID, VOCAB, hf_qwen3_vl, image_inputs, image_prompt, qwen3_vl_config

TRAINED_B = 4
SCALE = 120.0  # head scale of the peaked model: confidences spread over (0, 1)


def peaked_model(prompt_attention="causal", seed=0):
    """A random tiny BARD model whose head is scaled up, so confidences spread over (0, 1) and thresholds
    matter (a plain random model is uniformly unsure)."""
    torch.manual_seed(seed)
    cfg = ModelConfig.from_dict(qwen3_vl_config().to_dict()).with_bard(
        mask_token_id=MASK_ID, block_size=TRAINED_B, prompt_attention=prompt_attention, noise="mix")  # may revise
    m = BardVLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        m.lm_head.weight.mul_(SCALE)
    return m


@pytest.fixture(scope="module")
def model():
    return peaked_model()


def prompts(with_image: bool, batch: int = 1):
    pv, grid, n = image_inputs()
    texts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]][:batch]
    if not with_image:
        return PromptBatch.from_rows(texts)
    rows = [image_prompt(n, t[:2], t[2:]) for t in texts]
    pvs = torch.cat([image_inputs(seed=i)[0] for i in range(batch)])
    return PromptBatch.from_rows(rows, pvs, grid.repeat(batch, 1))


def opts(**kw):
    return DecodeOptions(allow_block_size_mismatch=True, **{"max_new_tokens": 16, **kw})


@pytest.mark.parametrize("block_size", [2, 4, 8])
@pytest.mark.parametrize("threshold", [None, 0.6, 0.9], ids=["static", "t0.6", "t0.9"])
@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_cached_equals_reference(model, block_size, threshold, with_image):
    batch = prompts(with_image, batch=2)
    o = opts(block_size=block_size, threshold=threshold)
    got = generate_bard(TorchBackend(model), batch, o, eos_ids=[])
    want = reference_generate(model, batch, o, eos_ids=[])
    assert got.token_ids == want
    assert all(len(r) == 16 for r in got.token_ids)


@pytest.mark.parametrize("prompt_attention", ["causal", "block"])
def test_cached_equals_reference_with_eos_and_revision(prompt_attention):
    m = peaked_model(prompt_attention)
    batch = prompts(True, batch=2)
    o = opts(threshold=0.5, edit_threshold=0.6, max_new_tokens=24)
    # pick as EOS a token row 0 emits in its 2nd block, so rows stop at different blocks
    free = generate_bard(TorchBackend(m), batch, o, eos_ids=[])
    eos = [free.token_ids[0][5]]
    got = generate_bard(TorchBackend(m), batch, o, eos_ids=eos)
    assert got.token_ids == reference_generate(m, batch, o, eos_ids=eos)
    assert got.token_ids[0][-1] == eos[0] and len(got.token_ids[0]) <= 6


def test_static_schedule_is_one_token_per_step(model):
    """threshold=None: exactly min_commit tokens per step, so a block of B takes B steps."""
    g = generate_bard(TorchBackend(model), prompts(False), opts(threshold=None, block_size=4), eos_ids=[])
    assert g.stats.steps_per_block == [4, 4, 4, 4]
    g2 = generate_bard(TorchBackend(model), prompts(False), opts(threshold=None, block_size=4, min_commit=2),
                       eos_ids=[])
    assert g2.stats.steps_per_block == [2, 2, 2, 2]


def test_threshold_commits_several_tokens_per_step(model):
    """Not vacuous: on the peaked model a threshold finishes blocks in fewer steps than the static schedule."""
    static = generate_bard(TorchBackend(model), prompts(True), opts(threshold=None), eos_ids=[])
    fast = generate_bard(TorchBackend(model), prompts(True), opts(threshold=0.6), eos_ids=[])
    assert sum(fast.stats.steps_per_block) < sum(static.stats.steps_per_block)
    assert fast.stats.tokens_per_forward > 1.5


def test_nfe_is_steps_plus_one_prefill(model):
    for threshold in (None, 0.2, 0.6):
        g = generate_bard(TorchBackend(model), prompts(True), opts(threshold=threshold), eos_ids=[])
        assert g.stats.nfe == 1 + sum(g.stats.steps_per_block)
        assert len(g.stats.step_s) == sum(g.stats.steps_per_block)
        assert g.stats.tokens_per_forward == pytest.approx(16 / g.stats.nfe)


def test_max_steps_bounds_steps_per_block(model):
    g = generate_bard(TorchBackend(model), prompts(False), opts(threshold=None, block_size=8, max_steps=3),
                      eos_ids=[])
    assert g.stats.steps_per_block == [3, 3]
    assert MASK_ID not in sum(g.token_ids, [])


def test_batch_rows_equal_rows_alone(model):
    batch = prompts(True, batch=2)
    o = opts(threshold=0.4)
    free = generate_bard(TorchBackend(model), batch, o, eos_ids=[])
    eos = [free.token_ids[1][3]]
    together = generate_bard(TorchBackend(model), batch, o, eos_ids=eos).token_ids
    pv, grid, n = image_inputs()
    for i, text in enumerate([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]):
        alone = PromptBatch.from_rows([image_prompt(n, text[:2], text[2:])], image_inputs(seed=i)[0], grid)
        assert generate_bard(TorchBackend(model), alone, o, eos_ids=eos).token_ids[0] == together[i]


def test_block_size_other_than_trained_needs_the_flag(model):
    with pytest.raises(RuntimeInputError, match="block_size=8"):
        generate_bard(TorchBackend(model), prompts(False), DecodeOptions(block_size=8), eos_ids=[])


@pytest.mark.parametrize("bad", [dict(threshold=0.0), dict(threshold=1.5), dict(max_new_tokens=0),
                                 dict(block_size=0), dict(block_size=-4), dict(min_commit=0), dict(max_steps=0),
                                 dict(edit_threshold=2.0), dict(top_p=0.0), dict(temperature=-1.0)])
def test_bad_options_are_typed_errors(model, bad):
    name = next(iter(bad))
    with pytest.raises(RuntimeInputError, match=name):
        generate_bard(TorchBackend(model), prompts(False), opts(**bad), eos_ids=[])


def test_revision_is_refused_on_a_mask_noise_checkpoint():
    """A mask-noise model never learnt to judge a visible token (the measured default rewrites 66 % of right
    ones): edit_threshold on it is a typed error naming the option; the same model recorded as mix decodes."""
    m = peaked_model()
    m.config = replace_opts(m.config, bard=replace_opts(m.config.bard, noise="mask"))
    with pytest.raises(RuntimeInputError, match=r"edit_threshold=0\.6: .*mask-noise"):
        generate_bard(TorchBackend(m), prompts(False), opts(threshold=0.5, edit_threshold=0.6), eos_ids=[])
    generate_bard(TorchBackend(m), prompts(False), opts(threshold=0.5), eos_ids=[])        # no revision: fine


@pytest.mark.parametrize("keep, refused", [(0.0, True), (1.0, False), (None, False)])
def test_revision_needs_the_keep_loss_on_a_mix_noise_checkpoint(keep, refused):
    """Mix noise under the reference's loss (keep weight 0, measured to break ~50 % of right tokens) refuses
    revision like mask noise; a keep loss, or a checkpoint that does not record it (imported), decodes."""
    m = peaked_model()
    m.config = replace_opts(m.config, bard=replace_opts(m.config.bard, mix_keep_weight=keep))
    o = opts(threshold=0.5, edit_threshold=0.6)
    if refused:
        with pytest.raises(RuntimeInputError, match=r"edit_threshold=0\.6: .*mix_keep_weight 0"):
            generate_bard(TorchBackend(m), prompts(False), o, eos_ids=[])
    else:
        generate_bard(TorchBackend(m), prompts(False), o, eos_ids=[])


def test_prompt_longer_than_context_is_refused(model):
    long = PromptBatch.from_rows([[5] * 4090])
    with pytest.raises(RuntimeInputError, match="context"):
        generate_bard(TorchBackend(model), long, opts(), eos_ids=[])


# ---- the AR baseline against transformers ---------------------------------------------------------

@pytest.fixture(scope="module")
def ar_pair(tmp_path_factory):
    hf = hf_qwen3_vl()
    with torch.no_grad():
        hf.lm_head.weight.mul_(8.0)
    d = tmp_path_factory.mktemp("ar")
    hf.save_pretrained(d)
    return hf, load_model(d)


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_ar_equals_transformers_generate(ar_pair, with_image):
    hf, ours = ar_pair
    batch = prompts(with_image)
    g = generate_ar(TorchBackend(ours), batch, DecodeOptions(max_new_tokens=20), eos_ids=[])
    kw = {}
    if with_image:
        kw = dict(pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                  mm_token_type_ids=(batch.input_ids == IMG).int())
    with torch.no_grad():
        ref = hf.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=20,
                          do_sample=False, eos_token_id=None, pad_token_id=0, **kw)
    assert g.token_ids[0] == ref[0, batch.input_ids.shape[1]:].tolist()
    assert g.stats.nfe == 20 and g.stats.tokens_per_forward == 1.0


def test_ar_stops_at_eos(ar_pair):
    _, ours = ar_pair
    batch = prompts(False)
    free = generate_ar(TorchBackend(ours), batch, DecodeOptions(max_new_tokens=12), eos_ids=[])
    eos = free.token_ids[0][4]
    first = free.token_ids[0].index(eos)
    g = generate_ar(TorchBackend(ours), batch, DecodeOptions(max_new_tokens=12), eos_ids=[eos])
    assert g.token_ids[0] == free.token_ids[0][:first + 1] and g.stats.nfe == first + 1


# ---- invariants under random options --------------------------------------------------------------

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(block_size=st.sampled_from([1, 2, 3, 4, 8]), threshold=st.one_of(st.none(), st.floats(0.05, 1.0)),
       min_commit=st.integers(1, 3), max_steps=st.one_of(st.none(), st.integers(1, 6)),
       max_new=st.integers(1, 13), edit=st.one_of(st.none(), st.floats(0.3, 1.0)),
       temperature=st.sampled_from([0.0, 0.7]), eos_pick=st.integers(0, 12),
       prompt=st.lists(st.integers(10, 900), min_size=1, max_size=9))
def test_invariants(model, block_size, threshold, min_commit, max_steps, max_new, edit, temperature, eos_pick,
                    prompt):
    o = opts(block_size=block_size, threshold=threshold, min_commit=min_commit, max_steps=max_steps,
             max_new_tokens=max_new, edit_threshold=edit, temperature=temperature, seed=1)
    batch = PromptBatch.from_rows([prompt])
    eos = [10 + eos_pick * 70]
    g = generate_bard(TorchBackend(model), batch, o, eos_ids=eos)
    toks = g.token_ids[0]
    assert MASK_ID not in toks                               # no MASK ever emitted
    assert 1 <= len(toks) <= max_new                         # max_new_tokens respected
    assert eos[0] not in toks[:-1]                           # nothing after the first EOS
    assert g.stats.nfe == 1 + sum(g.stats.steps_per_block)
    assert all(s <= (max_steps or block_size) for s in g.stats.steps_per_block)
    if temperature:                                          # sampling is reproducible with a seed
        assert generate_bard(TorchBackend(model), batch, o, eos_ids=eos).token_ids == g.token_ids


# ---- devices -------------------------------------------------------------------------------------------

def test_device_names_are_checked_before_the_model_moves(model):
    with pytest.raises(ConfigError, match="'gpu0' is not a device"):
        TorchBackend(model, device="gpu0")
    with pytest.raises(ConfigError, match="only cpu and cuda"):
        TorchBackend(model, device="meta")
    assert next(model.parameters()).device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            TorchBackend(model, device="cuda")
        assert TorchBackend(model, device="auto").device == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_cuda_decoding_equals_cpu_decoding(with_image, ar_pair):
    """The loop, KV buffer and canvas on the GPU: the same tokens as on the CPU (fp32, greedy; TF32 is off by
    default for fp32 matmuls), for thresholds, the static schedule, revision, batch 2 with EOS, and AR."""
    cpu, gpu = TorchBackend(peaked_model()), TorchBackend(peaked_model(), device="cuda")
    assert next(gpu.model.parameters()).is_cuda
    batch = prompts(with_image, batch=2)
    for o in (opts(threshold=0.6), opts(threshold=None, block_size=8), opts(threshold=0.5, edit_threshold=0.6)):
        want = generate_bard(cpu, batch, o, eos_ids=[])
        eos = [want.token_ids[0][5]]
        for e in ([], eos):
            w, g = generate_bard(cpu, batch, o, eos_ids=e), generate_bard(gpu, batch, o, eos_ids=e)
            assert g.token_ids == w.token_ids and g.stats.steps_per_block == w.stats.steps_per_block
    sampled = generate_bard(gpu, batch, opts(threshold=0.6, temperature=0.8, seed=3), eos_ids=[])
    assert sampled.token_ids == generate_bard(gpu, batch, opts(threshold=0.6, temperature=0.8, seed=3),
                                              eos_ids=[]).token_ids
    _, ours = ar_pair
    ar_cpu = generate_ar(TorchBackend(ours), batch, DecodeOptions(max_new_tokens=12), eos_ids=[])
    ar_gpu = generate_ar(TorchBackend(copy.deepcopy(ours), device="cuda"), batch, DecodeOptions(max_new_tokens=12),
                         eos_ids=[])
    assert ar_gpu.token_ids == ar_cpu.token_ids


@pytest.mark.parametrize("prompt_attention", ["causal", "block"])
@pytest.mark.parametrize("chunk", [None, 8], ids=["filled", "padded"])
@pytest.mark.parametrize("ar", [False, True], ids=["bard", "ar"])
def test_the_incremental_step_bias_equals_the_table_at_every_step(prompt_attention, chunk, ar, monkeypatch):
    """The cache's bias row + the step's own T x T part (reused across the steps of a block) equals
    `attention_bias` over the full key layout, at every step, with left-padded rows and a growing buffer."""
    import bard_deploy.runtimes.decode as decode
    from bard_deploy.diffusion.mask import attention_bias

    m = peaked_model(prompt_attention)
    checked = []
    forward = decode.Session._forward

    def checking(self, x, pos, layout, ds, keep=None):
        padded = self.padded is not None and self.cache.length > 0
        got = self._bias(layout, padded)
        want = attention_bias(layout, self.cache.keys_layout(layout, padded), self.prompt_attention, x.dtype)
        assert torch.equal(got, want), (self.cache.length, layout.shape)
        checked.append(self.cache.length)
        return forward(self, x, pos, layout, ds, keep)

    backend = TorchBackend(m)
    backend.padded_past = chunk
    monkeypatch.setattr(decode.Session, "_forward", checking)
    o = opts(threshold=0.6, max_new_tokens=12)
    (generate_ar if ar else generate_bard)(backend, prompts(True, batch=2), o, eos_ids=[])
    assert len(checked) > 5 and checked[0] == 0 and max(checked) > 8


def test_the_single_most_confident_commit_equals_the_ranking():
    """min_commit=1 takes the arg-max shortcut: the same tokens as the stable ranking it replaces (ties: the first
    position), rows without a masked token commit nothing."""
    from bard_deploy.iospec import Top
    from bard_deploy.runtimes.decode import denoise_step

    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        conf = (torch.randint(0, 4, (3, 8), generator=g) / 4).float()         # many ties
        masked = torch.rand(3, 8, generator=g) < 0.6
        masked[0] = False if trial % 5 == 0 else masked[0]
        canvas = torch.where(masked, MASK_ID, 7)
        top = Top(torch.randint(10, 20, (3, 8), generator=g), conf)
        o = DecodeOptions(threshold=0.9, min_commit=1, block_size=8, max_steps=8)
        got, _ = denoise_step(top, canvas, masked, torch.zeros(3, dtype=torch.long), 0, o, MASK_ID, None)
        commit = masked & (conf >= 0.9)
        ranked = conf.masked_fill(~masked, -1.0).argsort(dim=1, descending=True, stable=True)
        first = torch.arange(8)[None] < masked.sum(1).clamp(max=1)[:, None]
        commit |= torch.zeros_like(masked).scatter(1, ranked, first)
        assert torch.equal(got, torch.where(commit, top.ids, canvas)), trial


def test_a_session_with_a_given_past_steps_like_one_over_that_past(model):
    """Session.with_past (bench-step's loop timing and replay): its step over the random past equals the model's
    step over the same past given explicitly, every past column visible."""
    from bard_deploy.diffusion.mask import NOISY, Layout, attention_bias, prompt_layout, response_layout
    from bard_deploy.runtimes.decode import Session, Stats

    backend = TorchBackend(model)
    s = Session.with_past(backend, past=9, max_new=4, stats=Stats(), greedy=False)
    assert s.cache.length == 9 and s.start.tolist() == [9]
    tokens = torch.tensor([[5, 6, MASK_ID, MASK_ID]])
    lay = response_layout(1, s.start, 0, 4, 4, NOISY)
    logits = s.step(tokens, lay, keep=4)
    keys = Layout.cat([prompt_layout(torch.ones(1, 9, dtype=torch.long)), lay])
    want, _ = model.step(model.language_model.embed_tokens(tokens), lay.index.unsqueeze(0).expand(3, -1, -1),
                         attention_bias(lay, keys), s.cache.past())
    assert torch.allclose(logits, want, atol=1e-5)


@pytest.mark.parametrize("B,S,shares", [(8, 3, [3, 3, 2]), (4, 2, [2, 2]), (16, 5, [4, 3, 3, 3, 3]), (8, 8, [1] * 8)])
def test_the_even_schedule_commits_the_reference_shares(B, S, shares):
    """schedule="even" (the official generate): static, step s commits exactly its share of the block (base =
    B // S, the first B % S steps one more), the most confident first; the block is done after S steps."""
    from bard_deploy.iospec import Top
    from bard_deploy.runtimes.decode import denoise_step

    o = DecodeOptions.reference(block_size=B, max_steps=S, threshold=None)
    assert [o.commits_at(s) for s in range(S)] == shares
    g = torch.Generator().manual_seed(B * S)
    canvas = torch.full((1, B), MASK_ID)
    for s, share in enumerate(shares):
        masked = canvas == MASK_ID
        conf = torch.rand(1, B, generator=g)
        top = Top(torch.arange(100, 100 + B)[None], conf)
        new, _ = denoise_step(top, canvas, masked, torch.zeros(1, dtype=torch.long), s, o, MASK_ID, None)
        committed = masked & (new != MASK_ID)
        assert int(committed.sum()) == share, (s, share)
        best = conf.masked_fill(~masked, -1).topk(share).indices[0].tolist()
        assert sorted(committed[0].nonzero().squeeze(1).tolist()) == sorted(best)
        canvas = new
    assert MASK_ID not in canvas.tolist()[0]


def test_the_even_schedule_with_a_threshold_commits_all_above_it_or_its_share():
    """With a threshold: every masked token above it, or the step's share by confidence when fewer clear it."""
    from bard_deploy.iospec import Top
    from bard_deploy.runtimes.decode import denoise_step

    o = DecodeOptions.reference(block_size=8, max_steps=3, threshold=0.5)       # shares 3, 3, 2
    ids = torch.arange(100, 108)[None]
    canvas = torch.full((1, 8), MASK_ID)
    conf0 = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.55, 0.1, 0.2, 0.3]])          # 5 clear 0.5 > share 3
    c1, _ = denoise_step(Top(ids, conf0), canvas, canvas == MASK_ID, torch.zeros(1, dtype=torch.long), 0, o,
                         MASK_ID, None)
    assert (c1 != MASK_ID).tolist()[0] == [True] * 5 + [False] * 3
    conf1 = torch.tensor([[0.9, 0.9, 0.9, 0.9, 0.9, 0.51, 0.2, 0.3]])         # 1 clears it < share 3: top 3
    c2, _ = denoise_step(Top(ids, conf1), c1, c1 == MASK_ID, torch.zeros(1, dtype=torch.long), 1, o, MASK_ID, None)
    assert MASK_ID not in c2.tolist()[0]


def test_strict_threshold_and_raw_confidence():
    """At a confidence exactly equal to the threshold ours commits and the strict (reference) rule does not (it
    falls back to its share); with raw confidences a MASK argmax is committed as MASK and re-predicted."""
    from bard_deploy.iospec import Top
    from bard_deploy.runtimes.decode import denoise_step

    ids = torch.tensor([[100, 101]])
    conf = torch.tensor([[0.75, 0.75]])
    canvas = torch.full((1, 2), MASK_ID)
    ours = DecodeOptions(block_size=2, max_steps=2, threshold=0.75)
    strict = DecodeOptions(block_size=2, max_steps=2, threshold=0.75, strict_threshold=True)
    zero = torch.zeros(1, dtype=torch.long)
    assert denoise_step(Top(ids, conf), canvas, canvas == MASK_ID, zero, 0, ours, MASK_ID, None)[0].tolist() == \
        [[100, 101]]
    assert denoise_step(Top(ids, conf), canvas, canvas == MASK_ID, zero, 0, strict, MASK_ID, None)[0].tolist() == \
        [[100, MASK_ID]]
    # position 0: MASK is the raw arg-max (p 0.98), token 5 next; position 1: token 7 (p 0.89). One commit a step.
    logits = torch.zeros(1, 2, VOCAB)
    logits[0, 0, MASK_ID], logits[0, 0, 5], logits[0, 1, 7] = 12.0, 8.0, 9.0
    raw = DecodeOptions.reference(block_size=2, max_steps=2, threshold=None)
    new, _ = denoise_step(logits, canvas, canvas == MASK_ID, zero, 0, raw, MASK_ID, None)
    assert new.tolist() == [[MASK_ID, MASK_ID]]          # the step's one commit went to a MASK: re-predicted next
    ours_raw = replace_opts(raw, suppress_mask=True)
    new, _ = denoise_step(logits, canvas, canvas == MASK_ID, zero, 0, ours_raw, MASK_ID, None)
    assert new.tolist() == [[MASK_ID, 7]]                # MASK suppressed: position 0 is token 5 at p 0.75 < 0.89


@pytest.mark.parametrize("threshold", [None, 0.6])
def test_reference_semantics_decode_equals_the_slow_reference_decoder(model, threshold):
    """The preset through the cached runtime == the full-recompute decoder (same rule), S steps per block when
    static, and the torch backend reads full logits (the fused head suppresses MASK)."""
    o = DecodeOptions.reference(block_size=8, max_steps=3, threshold=threshold, max_new_tokens=16,
                                allow_block_size_mismatch=True)
    batch = prompts(True, batch=2)
    got = generate_bard(TorchBackend(model), batch, o, eos_ids=[])
    assert got.token_ids == reference_generate(model, batch, o, eos_ids=[])
    if threshold is None:
        assert got.stats.steps_per_block == [3, 3]
    with pytest.raises(RuntimeInputError, match="schedule"):
        generate_bard(TorchBackend(model), batch, replace_opts(o, schedule="odd"), eos_ids=[])


def test_statistics_in_the_reference_vocabulary(model):
    """Ours count tokens up to EOS and every forward (prefill included); the reference's count every non-MASK
    token of the decoded blocks (after EOS too) over the denoising passes only."""
    o = opts(threshold=0.6, max_new_tokens=16)
    free = generate_bard(TorchBackend(model), prompts(False), o, eos_ids=[])
    eos = [free.token_ids[0][5]]                                    # EOS in the 2nd block of 4
    g = generate_bard(TorchBackend(model), prompts(False), o, eos_ids=eos)
    ref = g.stats.as_dict()["reference"]
    blocks = len(g.stats.steps_per_block)
    assert g.stats.tokens[0] <= 6 < ref["response_tokens"] == blocks * TRAINED_B
    assert ref["denoising_steps"] == sum(g.stats.steps_per_block) == g.stats.nfe - 1
    assert ref["tokens_per_forward"] == pytest.approx(blocks * TRAINED_B / ref["denoising_steps"], abs=1e-4)
    assert generate_ar(TorchBackend(model), prompts(False), DecodeOptions(max_new_tokens=4), eos_ids=[]
                       ).stats.as_dict()["reference"] is None
