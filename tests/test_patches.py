"""The table-driven pixel values (`bard_deploy.patches`) against the image processor, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bard_deploy.data.tokenizer import build_image_processor
from bard_deploy.patches import PatchCache, build_plan


def _processor_values(proc, images):
    out = proc(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


@pytest.mark.parametrize("size", [(96, 96), (64, 128), (160, 96)])
def test_plans_give_the_processors_pixel_values_bit_for_bit(size):
    proc = build_image_processor()
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(3)]
    images.append(Image.new("RGB", size, (128, 128, 128)))
    fast = PatchCache(proc).pixel_values(images)
    want_values, want_grid = _processor_values(proc, images)
    assert fast is not None
    assert fast[0].dtype == want_values.dtype and torch.equal(fast[0], want_values)
    assert torch.equal(fast[1], want_grid)


@pytest.mark.parametrize("size", [(100, 100), (40, 56), (1000, 1000)])
def test_a_size_the_processor_resizes_has_no_plan(size):
    proc = build_image_processor()
    assert build_plan(proc, size[1], size[0]) is None
    assert PatchCache(proc).pixel_values([Image.new("RGB", size)]) is None


def test_a_processor_of_another_kind_has_no_plan():
    class Other:
        def __call__(self, images, return_tensors):
            raise AssertionError("not called")

    assert build_plan(Other(), 96, 96) is None


def test_a_processor_whose_arithmetic_is_not_per_value_has_no_plan():
    proc = build_image_processor()

    class Dithering:                      # adds a position-dependent offset: no table can express it
        patch_size, merge_size, temporal_patch_size, size = (proc.patch_size, proc.merge_size,
                                                             proc.temporal_patch_size, proc.size)

        def __call__(self, images, return_tensors):
            out = proc(images=images, return_tensors=return_tensors)
            values = out["pixel_values"].copy()
            values[:, 0] += 1e-3
            return {"pixel_values": values, "image_grid_thw": out["image_grid_thw"]}

    assert build_plan(Dithering(), 96, 96) is None


def test_a_changed_pixel_budget_is_a_new_plan():
    proc = build_image_processor()
    cache = PatchCache(proc)
    img = Image.new("RGB", (96, 96), (10, 20, 30))
    assert cache.pixel_values([img]) is not None
    proc.size = {"shortest_edge": 192 * 192, "longest_edge": 512 * 512}    # 96 x 96 is now resized up
    assert cache.pixel_values([img]) is None
