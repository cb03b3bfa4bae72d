"""Chat messages -> model inputs: the chat template, images (checked), the processor, image-pad expansion.

Shared by the data pipeline (training rows) and the runtime API (prompts), so both encode a conversation
the same way. Images come as a path (confined to a root directory), a `data:` base64 URI, or a PIL image.
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from bard_deploy.errors import DataError
from bard_deploy.patches import PatchCache
from bard_deploy.video import VideoInput, VideoProcessor, timestamp_text
from bard_deploy.vision import image_token_count

MAX_IMAGE_PIXELS = 8192 * 8192     # a larger image is refused before decoding (decompression bombs)
MIN_IMAGE_SIDE = 1


def resolve_image_path(source: str, root: str | Path | None) -> Path:
    """The real path of an image reference, refusing `..`, absolute paths and symlinks that leave `root`."""
    path = Path(source)
    if root is None:
        return path
    root_real = Path(os.path.realpath(root))
    if path.is_absolute():
        raise DataError(f"image path {source!r} is absolute; image paths must be relative to the data root", source)
    real = Path(os.path.realpath(root_real / path))
    if real != root_real and root_real not in real.parents:
        raise DataError(f"image path {source!r} escapes the data root {root}", source)
    return real


def load_image(source: object, root: str | Path | None = None) -> Image.Image:
    """An RGB PIL image from a path, a data URI or a PIL image; every failure is a DataError naming it."""
    if isinstance(source, Image.Image):
        img, name = source, "<PIL image>"
    elif isinstance(source, str) and source.startswith("data:"):
        name = source[:40] + "..."
        try:
            payload = base64.b64decode(source.split(",", 1)[1], validate=True)
        except (IndexError, ValueError) as e:
            raise DataError(f"image {name}: invalid base64 data URI ({e})", name) from e
        img = _open(io.BytesIO(payload), name)
    elif isinstance(source, (str, Path)):
        path = resolve_image_path(str(source), root)
        name = str(source)
        if not path.is_file():
            raise DataError(f"image {name} not found", name)
        img = _open(path, name)
    else:
        raise DataError(f"image must be a path, a data URI or a PIL image, got {type(source).__name__}", source)
    w, h = img.size
    if w < MIN_IMAGE_SIDE or h < MIN_IMAGE_SIDE:
        raise DataError(f"image {name} has zero size ({w}x{h})", name)
    if w * h > MAX_IMAGE_PIXELS:
        raise DataError(f"image {name} has {w * h} pixels, more than the limit {MAX_IMAGE_PIXELS}", name)
    return _to_rgb(img)


def _open(fp, name: str) -> Image.Image:
    try:
        img = Image.open(fp)
        if img.size[0] * img.size[1] > MAX_IMAGE_PIXELS:
            raise DataError(f"image {name} has {img.size[0] * img.size[1]} pixels, more than the limit "
                            f"{MAX_IMAGE_PIXELS}", name)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"image {name} cannot be decoded ({type(e).__name__}: {e})", name) from e
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB for every mode: alpha composited on white, 16-bit and float greyscale rescaled to 8 bits."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        t = torch.from_numpy(np.asarray(img).astype(np.float64).reshape(img.size[1], img.size[0]))
        lo, hi = float(t.min()), float(t.max())
        t = ((t - lo) / (hi - lo) * 255 if hi > lo else torch.zeros_like(t)).round().to(torch.uint8)
        return Image.fromarray(t.numpy(), mode="L").convert("RGB")
    return img.convert("RGB")


def message_parts(messages: list[dict], kind: str) -> list[dict]:
    """The parts of one type ("image", "video") of a conversation, in order."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            out += [p for p in content if isinstance(p, dict) and p.get("type") == kind]
    return out


def message_images(messages: list[dict]) -> list[object]:
    """The image parts of a conversation, in order."""
    return [p.get("image") for p in message_parts(messages, "image")]


DEFAULT_VIDEO_FPS = 2.0     # the rate of pre-sampled frames when a video part gives none (Qwen's sampling rate)


FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def video_frames(directory: str | Path) -> list[str]:
    """The image files of a folder of frames, in file-name order (zero-padded names sort as frames run); a
    DataError for a missing folder or one without frames."""
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"video {d} is not a folder of frames (decode a video file into frames first)", str(d))
    frames = sorted(str(f) for f in d.iterdir() if f.suffix.lower() in FRAME_SUFFIXES and f.is_file())
    if not frames:
        raise DataError(f"video folder {d} holds no frames ({', '.join(FRAME_SUFFIXES)})", str(d))
    return frames


def video_part(video: object) -> dict:
    """A message's video part from a list of frames, or a video part dict as it is."""
    if isinstance(video, dict):
        return {"type": "video", **video}
    return {"type": "video", "video": video}


def load_video(part: dict, root: str | Path | None = None) -> VideoInput:
    """A video part {"type": "video", "video": [frame, ...], "fps": rate}: each frame a path, data URI or PIL
    image (as images are), `fps` the frames' rate (default 2, Qwen's sampling rate); a DataError otherwise."""
    frames, fps = part.get("video"), part.get("fps", DEFAULT_VIDEO_FPS)
    if isinstance(frames, (str, Path)) or not isinstance(frames, (list, tuple)):
        raise DataError("a video part's 'video' must be a list of frames (paths, data URIs or PIL images); decode "
                        "a video file into frames first", type(frames).__name__)
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= 1000:
        raise DataError(f"a video part's fps must be a number in (0, 1000], got {fps!r}", fps)
    return VideoInput(tuple(load_image(f, root) for f in frames), float(fps))


class CompressedImages:
    """A conversation's images kept as lossless PNG bytes and turned into pixel values on use.

    A training set holds every example in memory: as float32 patches a 96 x 96 synthetic image costs 221 KB
    (24 000 of them 5.3 GB), as PNG about 1 KB; a real data set's patches would not fit at all. The processor
    is deterministic and PNG is lossless, so the values are the ones eager encoding gives (tested bitwise).
    """

    def __init__(self, processor, images: list[Image.Image], grid: torch.Tensor, patches: PatchCache | None = None):
        self.processor, self.grid, self.patches = processor, grid, patches
        buffers = []
        for im in images:
            buf = io.BytesIO()
            im.save(buf, format="PNG", compress_level=1)
            buffers.append(buf.getvalue())
        self.png = tuple(buffers)

    @property
    def nbytes(self) -> int:
        """Bytes of PNG held."""
        return sum(len(b) for b in self.png)

    def pixel_values(self) -> torch.Tensor:
        """The processor's pixel values of the images (checked to give the grids the prompt was encoded for)."""
        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in self.png]
        fast = None
        if self.patches is not None and self.patches.processor is self.processor:   # plans are per processor
            fast = self.patches.pixel_values(images)
        if fast is not None:
            values, grid = fast
        else:
            out = self.processor(images=images, return_tensors="pt")
            values, grid = out["pixel_values"], out["image_grid_thw"]
        if not torch.equal(grid, self.grid):
            raise DataError(f"the image processor made grids {grid.tolist()}, the prompt was "
                            f"encoded for {self.grid.tolist()}", self.grid.tolist())
        return values


def predicted_grid(processor, images: list[Image.Image]) -> torch.Tensor | None:
    """The (t, h, w) patch grids a Qwen2-VL-style processor will make, from the image sizes alone (its
    smart_resize rule), or None for a processor this does not know (the caller then runs it)."""
    size = getattr(processor, "size", None)
    try:
        ps, merge = int(processor.patch_size), int(processor.merge_size)
        lo, hi = int(size["shortest_edge"]), int(size["longest_edge"])
    except (AttributeError, KeyError, TypeError):
        return None
    if not getattr(processor, "do_resize", False):
        return None
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    grids = []
    for im in images:
        h, w = smart_resize(im.height, im.width, ps * merge, min_pixels=lo, max_pixels=hi)
        grids.append([1, h // ps, w // ps])
    return torch.tensor(grids, dtype=torch.int64)


def pixel_budget(size: dict, unit: int, min_pixels: int | None, max_pixels: int | None) -> tuple[int, int]:
    """(min, max) pixels of an image processor's budget `size` (its shortest_edge / longest_edge) with the given
    overrides; ValueError naming a bad value (below one image token of `unit` pixels, or min above max)."""
    lo = min_pixels if min_pixels is not None else size.get("shortest_edge", unit)
    hi = max_pixels if max_pixels is not None else size.get("longest_edge", lo)
    for name, value in (("min_pixels", lo), ("max_pixels", hi)):
        if isinstance(value, bool) or not isinstance(value, int) or value < unit:
            raise ValueError(f"{name} must be an integer >= {unit} pixels (one image token), got {value!r}")
    if lo > hi:
        raise ValueError(f"min_pixels {lo} is above max_pixels {hi}")
    return lo, hi


@dataclass
class EncodedPrompt:
    """A conversation encoded for the model: token ids with image pads expanded, and the images' patches."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None      # (patches, C * tps * ps * ps)
    image_grid_thw: torch.Tensor | None    # (images, 3)
    compressed: CompressedImages | None = None   # encode(..., compress_images=True): the images, for later


@dataclass(frozen=True)
class VideoTokens:
    """What expanding a video in a prompt needs: the video processor and the video / vision start / end ids."""

    processor: VideoProcessor
    video_token_id: int
    vision_start_id: int
    vision_end_id: int


def video_tokens(cfg, processor: VideoProcessor | None) -> VideoTokens | None:
    """The VideoTokens of a model config (None without a video processor or the config's video / vision ids)."""
    ids = (cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)
    if processor is None or any(i is None for i in ids):
        return None
    return VideoTokens(processor, *ids)


class PromptEncoder:
    """Tokenizer + image processor (+ video) + the model's image token facts."""

    def __init__(self, tokenizer, processor, image_token_id: int | None, merge: int,
                 video: VideoTokens | None = None):
        self.tokenizer, self.processor = tokenizer, processor
        self.image_token_id, self.merge = image_token_id, merge
        self.video = video
        self.patches = PatchCache(processor) if processor is not None else None   # CompressedImages' fast path

    def set_pixel_budget(self, min_pixels: int | None, max_pixels: int | None) -> None:
        """Resize images into [min_pixels, max_pixels] from now on (the processor's own budget, its own resize
        rule); a DataError naming a bad value."""
        if self.processor is None:
            raise DataError("a pixel budget was given but this model has no image processor", "max_pixels")
        p = self.processor
        unit = (p.patch_size * p.merge_size) ** 2
        try:
            lo, hi = pixel_budget(dict(p.size), unit, min_pixels, max_pixels)
        except ValueError as e:
            raise DataError(str(e), max_pixels if max_pixels is not None else min_pixels) from e
        p.size = {"shortest_edge": lo, "longest_edge": hi}

    def encode(self, messages: list[dict], add_generation_prompt: bool = True,
               image_root: str | Path | None = None, compress_images: bool = False) -> EncodedPrompt:
        """Token ids of the templated conversation with each image pad expanded to its token count.

        compress_images: keep the images (CompressedImages) instead of their pixel values (training sets).
        """
        images = [load_image(src, image_root) for src in message_images(messages)]
        videos = [load_video(p, image_root) for p in message_parts(messages, "video")]
        if videos and compress_images:
            raise DataError("video parts are not supported in training data (decode them as images)", "video")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if videos:
            return self.with_visuals(ids, images, videos)
        return self.with_images(ids, images, compress_images, "the chat template")

    def with_visuals(self, ids: list[int], images: list[Image.Image], videos: list[VideoInput]) -> EncodedPrompt:
        """Token ids with images and videos: each image pad expanded to its tokens, each video (the template's
        <|vision_start|><|video_pad|><|vision_end|>, or a bare pad) replaced by Qwen3-VL's per temporal patch
        "<t seconds><|vision_start|> pads <|vision_end|>"; the patches of both in the order they appear (one
        visual stream; a video's grid has t = its temporal patches)."""
        v = self.video
        if v is None:
            raise DataError("a video was given but this model has no video support (no vision tower, or no video "
                            "token)", "video")
        pads = [i for i, t in enumerate(ids) if t == v.video_token_id]
        if len(pads) != len(videos):
            raise DataError(f"the chat template rendered {len(pads)} video pads for {len(videos)} videos (a "
                            "template without video parts drops them)", len(pads))
        marks = sorted([(i, "image") for i, t in enumerate(ids) if t == self.image_token_id] +
                       [(i, "video") for i in pads])
        if sum(k == "image" for _, k in marks) != len(images):
            raise DataError(f"the chat template rendered image pads for {len(images)} images wrongly", len(images))
        out, values, grids, prev = [], [], [], 0
        image_iter, video_iter = iter(images), iter(videos)
        for pos, kind in marks:
            if kind == "image":
                enc = self.with_images([self.image_token_id], [next(image_iter)])
                out += ids[prev:pos] + enc.input_ids
                values.append(enc.pixel_values)
                grids.append(enc.image_grid_thw)
                prev = pos + 1
                continue
            ev = v.processor(next(video_iter))
            wrapped = 0 < pos < len(ids) - 1 and ids[pos - 1] == v.vision_start_id and ids[pos + 1] == v.vision_end_id
            out += ids[prev:pos - 1 if wrapped else pos]
            per_patch = ev.grid[1] * ev.grid[2] // self.merge ** 2
            for seconds in ev.timestamps:
                out += self.tokenizer(timestamp_text(seconds), add_special_tokens=False)["input_ids"]
                out += [v.vision_start_id] + [v.video_token_id] * per_patch + [v.vision_end_id]
            values.append(ev.pixel_values)
            grids.append(torch.tensor([ev.grid], dtype=torch.int64))
            prev = pos + 2 if wrapped else pos + 1
        out += ids[prev:]
        return EncodedPrompt(out, torch.cat(values), torch.cat(grids))

    def with_images(self, ids: list[int], images: list[Image.Image], compress_images: bool = False,
                    source: str = "the prompt ids") -> EncodedPrompt:
        """Token ids with one image pad per image, each expanded to its token count (ids whose pads are already
        expanded, as a processor leaves them, are taken as they are), and the images' patches."""
        if not images:
            return EncodedPrompt(list(ids), None, None)
        if self.processor is None or self.image_token_id is None:
            raise DataError("an image was given but this model has no vision tower / image processor", "image")
        # training sets keep compressed images: their grids come from the sizes, the pixels come at collate
        try:
            grid = predicted_grid(self.processor, images) if compress_images else None
            out = self.processor(images=images, return_tensors="pt") if grid is None else None
        except ValueError as e:     # e.g. an aspect ratio over 200, refused by smart_resize
            sizes = [f"{im.width}x{im.height}" for im in images]
            raise DataError(f"image ({', '.join(sizes)}) refused by the image processor: {e}", sizes) from e
        grid = out["image_grid_thw"] if grid is None else grid
        counts = image_token_count(grid, self.merge)
        pads = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(pads) == sum(counts) and len(pads) != len(counts):
            expanded = list(ids)                                 # already expanded
        elif len(pads) != len(counts):
            raise DataError(f"{source} has {len(pads)} image pads for {len(counts)} images (one pad per image, or "
                            f"{sum(counts)} pads expanded)", len(pads))
        else:
            expanded, prev = [], 0
            for pos, n in zip(pads, counts, strict=True):
                expanded += ids[prev:pos] + [self.image_token_id] * n
                prev = pos + 1
            expanded += ids[prev:]
        if compress_images:
            return EncodedPrompt(expanded, None, grid, CompressedImages(self.processor, images, grid, self.patches))
        return EncodedPrompt(expanded, out["pixel_values"], grid)
