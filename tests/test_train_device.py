"""The training device paths: FlexAttention block masks, bf16 autocast, device resolution (CPU-checkable parts),
and the CUDA run itself (marked `gpu`, skipped without one)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from bard_deploy.data.chat import encode_example
from bard_deploy.data.collate import collate_diffusion
from bard_deploy.data.synthetic import make_sample
from bard_deploy.data.tokenizer import build_image_processor, build_tokenizer
from bard_deploy.diffusion.mask import PAD, Layout, training_layout, training_mask
from bard_deploy.embedded import embedded_config
from bard_deploy.errors import ConfigError
from bard_deploy.prompting import PromptEncoder
from bard_deploy.train.loop import resolve_device, resolve_precision
from bard_deploy.train.objective import LossSetup, bard_loss, text_token_ids
from bard_deploy.vlm import BardVLM

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _padded_pair(prompt_attention_block: int = 4) -> Layout:
    a = training_layout(5, 8, prompt_attention_block)
    b = training_layout(3, 4, prompt_attention_block)
    pad = a.kind.shape[1] - b.kind.shape[1]
    z = torch.zeros(1, pad, dtype=torch.long)
    b = Layout(torch.cat([b.kind, z + PAD], 1), torch.cat([b.block, z], 1), torch.cat([b.index, z], 1))
    return Layout(*(torch.cat([getattr(a, f), getattr(b, f)]) for f in ("kind", "block", "index")))


@pytest.mark.parametrize("prompt_attention", ["causal", "block"])
def test_flex_block_mask_attends_exactly_like_the_sdpa_mask(prompt_attention):
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    lay = _padded_pair()
    flex = training_mask(lay, prompt_attention, backend="flex")
    dense = training_mask(lay, prompt_attention, backend="sdpa")
    assert isinstance(flex, BlockMask) and dense.dtype == torch.bool
    L = lay.kind.shape[1]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, L, 8, generator=g) for h in (4, 2, 2))
    got = flex_attention(q, k, v, block_mask=flex, enable_gqa=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           attn_mask=dense)
    assert (got - ref).abs().max() < 1e-5


def test_mask_backend_auto_is_sdpa_on_cpu_and_bad_names_are_refused():
    lay = training_layout(3, 4, 4)
    assert training_mask(lay).dtype == torch.bool
    with pytest.raises(ValueError, match="'dense'"):
        training_mask(lay, backend="dense")
    with pytest.raises(ValueError, match="'diagonal'"):
        training_mask(lay, "diagonal", backend="flex")


@pytest.fixture(scope="module")
def tiny_batch():
    tok = build_tokenizer()
    cfg = embedded_config(tok, hidden=32, layers=2, vision_depth=1).with_bard(
        mask_token_id=tok.convert_tokens_to_ids("<|mask|>"), block_size=4)
    enc = PromptEncoder(tok, build_image_processor(), cfg.image_token_id, 2)
    ex = [encode_example(enc, make_sample(i).messages(), 128) for i in range(3)]
    batch = collate_diffusion(ex, cfg, 4, tok.pad_token_id, tok.eos_token_id)
    setup = LossSetup("mix", cfg.bard.mask_token_id, text_token_ids(tok), 0.05, 20.0, "causal")
    torch.manual_seed(0)
    return BardVLM(cfg), batch, setup


def _loss_and_grads(model, batch, setup, **autocast):
    model.zero_grad()
    gens = [torch.Generator().manual_seed(i) for i in range(batch.num_samples)]
    with torch.autocast("cpu", **autocast) if autocast else contextlib.nullcontext():
        per_sample, _ = bard_loss(setup)(model, batch, gens)
    per_sample.sum().backward()
    return per_sample.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_training_loss_through_flex_attention_equals_sdpa(tiny_batch, monkeypatch):
    """The packed training forward gives the same per-sample losses under both mask backends (forward only:
    FlexAttention has no backward on CPU; the CUDA test below checks gradients)."""
    import bard_deploy.train.objective as objective

    model, batch, setup = tiny_batch
    gens = [torch.Generator().manual_seed(i) for i in range(batch.num_samples)]
    with torch.no_grad():
        ref, _ = bard_loss(setup)(model, batch, gens)
        monkeypatch.setattr(objective, "training_mask", lambda lay, pa: training_mask(lay, pa, backend="flex"))
        gens = [torch.Generator().manual_seed(i) for i in range(batch.num_samples)]
        got, _ = bard_loss(setup)(model, batch, gens)
    assert (got - ref).abs().max() < 1e-5


def test_bf16_autocast_step_is_finite_and_close_to_fp32(tiny_batch):
    model, batch, setup = tiny_batch
    ref, _ = _loss_and_grads(model, batch, setup)
    got, grads = _loss_and_grads(model, batch, setup, dtype=torch.bfloat16)
    assert torch.isfinite(got).all() and all(torch.isfinite(g).all() for g in grads.values())
    assert ((got - ref).abs() / ref).max() < 0.05


def test_device_and_precision_resolution():
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ConfigError, match="'fp16'"):
        resolve_precision("fp16", torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_matches_cpu(tiny_batch, tmp_path):
    """Flex block mask + bf16 autocast on CUDA against the fp32 SDPA CPU step: same noise, close loss."""
    model, batch, setup = tiny_batch
    ref, _ = _loss_and_grads(model, batch, setup)
    gpu = BardVLM(model.config)
    gpu.load_state_dict(model.state_dict())
    gpu.cuda()
    cuda_setup = LossSetup(setup.noise, setup.mask_id, setup.text_tokens.cuda(), setup.t_min, setup.weight_cap,
                           setup.prompt_attention)
    gens = [torch.Generator().manual_seed(i) for i in range(batch.num_samples)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, _ = bard_loss(cuda_setup)(gpu, batch.to("cuda"), gens)   # auto mask backend on CUDA: flex
    assert ((got.float().cpu() - ref).abs() / ref).max() < 0.05
    got.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in gpu.parameters() if p.grad is not None)
