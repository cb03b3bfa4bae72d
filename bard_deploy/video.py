"""Video as a list of frames, the way Qwen3-VL's video processor turns it into patches and prompt text.

transformers' `Qwen3VLVideoProcessor` needs torchvision (absent here: its PyPI build does not load beside the
CPU torch), so this module reproduces it around transformers' own pieces: its `smart_resize` (one size for every
frame, within a budget of pixels over *all* frames), its `patchify` (pairs of frames into temporal patches, the
last frame repeated for an odd count) and the processor's timestamps (`<t seconds>` before each temporal patch).
Only the resampling differs: PIL's bicubic here, torchvision's bicubic there (both antialiased; a pixel may
differ by a rounding step).

The frames are already sampled (decoding a video file is the caller's business): `fps` is their rate, used for
the timestamps only. The budget and normalisation come from the checkpoint's `video_preprocessor_config.json`
when it has one, else from transformers' Qwen3-VL video defaults and the image processor's patch sizes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bard_deploy.errors import DataError

VIDEO_CONFIG = "video_preprocessor_config.json"


@dataclass(frozen=True)
class VideoInput:
    """A video part of a message after loading: its frames (RGB, one size) and their rate in frames per second."""

    frames: tuple[Image.Image, ...]
    fps: float


@dataclass(frozen=True)
class EncodedVideo:
    """A video's patches (t * h * w, C * tps * ps * ps), its grid [t, h, w] and the timestamp (seconds) of each
    temporal patch."""

    pixel_values: torch.Tensor
    grid: list[int]
    timestamps: list[float]


class VideoProcessor:
    """Frames -> patches, grid and timestamps, as transformers' Qwen3VLVideoProcessor does (see the module)."""

    def __init__(self, patch_size: int, temporal_patch_size: int, merge_size: int, min_pixels: int,
                 max_pixels: int, mean: list[float], std: list[float], min_frames: int = 2,
                 max_frames: int = 768):
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
        self.min_frames, self.max_frames = min_frames, max_frames

    @classmethod
    def for_directory(cls, directory: str | Path, image_processor) -> VideoProcessor:
        """The video processor of a checkpoint or export: its video_preprocessor_config.json, else transformers'
        Qwen3-VL video budget with the image processor's patch sizes and normalisation."""
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor as Defaults

        path = Path(directory) / VIDEO_CONFIG
        cfg: dict = {}
        if path.is_file():
            try:
                cfg = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise DataError(f"{path}: {e}", str(path)) from e
        size = cfg.get("size") or Defaults.size
        p = image_processor
        return cls(int(cfg.get("patch_size", p.patch_size)), int(cfg.get("temporal_patch_size", p.temporal_patch_size)),
                   int(cfg.get("merge_size", p.merge_size)), int(size["shortest_edge"]), int(size["longest_edge"]),
                   list(cfg.get("image_mean", p.image_mean)), list(cfg.get("image_std", p.image_std)),
                   max_frames=int(cfg.get("max_frames", Defaults.max_frames)))

    def __call__(self, video: VideoInput) -> EncodedVideo:
        """The patches, grid and timestamps of one video; a DataError naming what is wrong with it."""
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor, smart_resize

        frames, n = video.frames, len(video.frames)
        if not self.min_frames <= n <= self.max_frames:
            raise DataError(f"a video needs {self.min_frames} to {self.max_frames} frames, got {n}", n)
        sizes = {im.size for im in frames}
        if len(sizes) != 1:
            raise DataError(f"a video's frames must share one size, got {sorted(sizes)}", sorted(sizes))
        (w, h), = sizes
        unit = self.patch_size * self.merge_size
        try:
            rh, rw = smart_resize(n, h, w, temporal_factor=self.temporal_patch_size, factor=unit,
                                  min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        except ValueError as e:
            raise DataError(f"video frames of {w}x{h} refused by the video processor: {e}", f"{w}x{h}") from e
        arrays = []
        for im in frames:
            im = im if (im.width, im.height) == (rw, rh) else im.resize((rw, rh), Image.Resampling.BICUBIC)
            x = np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0
            arrays.append((x - self.mean) / self.std)
        stacked = torch.from_numpy(np.stack(arrays)).unsqueeze(0)              # (1, frames, C, H, W)
        patches, t, gh, gw = Qwen3VLVideoProcessor.patchify(None, stacked, self.patch_size, self.merge_size,
                                                           self.temporal_patch_size)
        return EncodedVideo(patches[0].contiguous(), [t, gh, gw], self.timestamps(n, video.fps))

    def timestamps(self, frames: int, fps: float) -> list[float]:
        """Seconds of each temporal patch: the mean time of its first and last frame (the processor's rule)."""
        tps = self.temporal_patch_size
        idx = list(range(frames)) + [frames - 1] * (-frames % tps)
        return [(idx[i] + idx[i + tps - 1]) / 2 / fps for i in range(0, len(idx), tps)]


def timestamp_text(seconds: float) -> str:
    """The text Qwen3-VL puts before a temporal patch's tokens."""
    return f"<{seconds:.1f} seconds>"
