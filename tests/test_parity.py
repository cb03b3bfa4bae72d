"""Our decoder, loaded through the production converter, reproduces transformers' logits (fp32, 1e-4)."""

import pytest
import torch

from bard_deploy.checkpoint import load_model
from bard_deploy.diffusion.mask import attention_bias, prompt_layout
from tiny import IMG, VEND, VID, VSTART, hf_qwen3, hf_qwen3_vl, image_inputs, image_prompt

TOL = 1e-4


def ours_logits(model, ids, attention_mask, pixel_values=None, grid=None):
    x, ds = model.embed(ids, pixel_values, grid)
    pos, _ = model.positions(ids, grid, attention_mask)
    lay = prompt_layout(attention_mask)
    logits, _ = model.step(x, pos, attention_bias(lay, lay, "causal"), None, ds)
    return logits


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def vl_pair(request, tmp_path_factory):
    hf = hf_qwen3_vl(tie=request.param)
    d = tmp_path_factory.mktemp("vl")
    hf.save_pretrained(d)
    return hf, load_model(d)


@torch.no_grad()
def test_qwen3_vl_image_prompt(vl_pair):
    hf, ours = vl_pair
    pv, grid, n = image_inputs()
    ids = torch.tensor([image_prompt(n, [5, 6, 7], [8, 9, 10, 11, 12])])
    am = torch.ones_like(ids)
    ref = hf(input_ids=ids, attention_mask=am, pixel_values=pv, image_grid_thw=grid,
             mm_token_type_ids=(ids == IMG).int()).logits
    got = ours_logits(ours, ids, am, pv, grid)
    assert (ref - got).abs().max().item() <= TOL
    # The test is not vacuous: MRoPE gives the image 2-D positions, DeepStack features are non-zero,
    # and another image changes the logits.
    pos, delta = ours.positions(ids, grid, am)
    assert not torch.equal(pos[1], pos[2]) and delta.item() < 0
    _, ds = ours.embed(ids, pv, grid)
    assert ds.shape[0] == 2 and ds.abs().sum() > 0
    pv2, _, _ = image_inputs(seed=1)
    assert (ours_logits(ours, ids, am, pv2, grid) - got).abs().max() > 1e-3


@torch.no_grad()
def test_qwen3_vl_text_only(vl_pair):
    hf, ours = vl_pair
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    am = torch.ones_like(ids)
    ref = hf(input_ids=ids, attention_mask=am).logits
    assert (ref - ours_logits(ours, ids, am)).abs().max().item() <= TOL


@torch.no_grad()
def test_qwen3_vl_left_padded_batch(vl_pair):
    """Batch of two prompts of different lengths, left padded, image in both rows."""
    hf, ours = vl_pair
    pv, grid, n = image_inputs()
    rows = [image_prompt(n, [5, 6, 7, 8, 9], [10, 11]), image_prompt(n, [5], [12])]
    L = max(map(len, rows))
    ids = torch.tensor([[0] * (L - len(r)) + r for r in rows])
    am = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    pv2 = torch.cat([pv, image_inputs(seed=3)[0]])
    grid2 = grid.repeat(2, 1)
    ref = hf(input_ids=ids, attention_mask=am, pixel_values=pv2, image_grid_thw=grid2,
             mm_token_type_ids=(ids == IMG).int()).logits
    got = ours_logits(ours, ids, am, pv2, grid2)
    real = am.bool()
    assert (ref[real] - got[real]).abs().max().item() <= TOL


def video_inputs(frames: int = 4, h: int = 64, w: int = 32, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_values_videos and video_grid_thw of random frames, patchified by transformers' own video patchify."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    video = torch.rand(1, frames, 3, h, w, generator=torch.Generator().manual_seed(seed))
    patches, t, gh, gw = Qwen3VLVideoProcessor.patchify(None, video, 16, 2, 2)
    return patches[0], torch.tensor([[t, gh, gw]])


@torch.no_grad()
def test_qwen3_vl_image_and_video_prompt(vl_pair):
    """An image then a video of 2 temporal patches, each patch its own timestamp-separated run of video pads (as
    Qwen3-VL's processor lays it out): our one visual stream (images and videos in the order they appear, a
    video's grid t = its patches) gives transformers' logits, MRoPE and all."""
    hf, ours = vl_pair
    pv, grid, n = image_inputs()
    vv, vgrid = video_inputs()
    per_patch = int(vgrid[0, 1] * vgrid[0, 2]) // 4
    ids = image_prompt(n, [5, 6], [7])
    for stamp in ([20, 21], [22, 23]):                              # "<0.2 seconds>"-like text before each patch
        ids += stamp + [VSTART] + [VID] * per_patch + [VEND]
    ids = torch.tensor([ids + [8, 9]])
    am = torch.ones_like(ids)
    types = (ids == IMG).int() + 2 * (ids == VID).int()
    ref = hf(input_ids=ids, attention_mask=am, pixel_values=pv, image_grid_thw=grid, pixel_values_videos=vv,
             video_grid_thw=vgrid, mm_token_type_ids=types).logits
    got = ours_logits(ours, ids, am, torch.cat([pv, vv]), torch.cat([grid, vgrid]))
    assert vgrid[0, 0] == 2 and (ref - got).abs().max().item() <= TOL
    # not vacuous: the video's second patch matters, and its positions restart the t row per patch
    vv2 = vv.clone()
    vv2[len(vv) // 2:] = torch.rand_like(vv2[len(vv) // 2:])
    assert (ours_logits(ours, ids, am, torch.cat([pv, vv2]), torch.cat([grid, vgrid])) - got).abs().max() > 1e-3


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@torch.no_grad()
def test_qwen3_text_source(tmp_path, tie):
    hf = hf_qwen3(tie=tie)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.config.arch == "qwen3" and ours.visual is None
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])
    am = torch.ones_like(ids)
    ref = hf(input_ids=ids, attention_mask=am).logits
    assert (ref - ours_logits(ours, ids, am)).abs().max().item() <= TOL
