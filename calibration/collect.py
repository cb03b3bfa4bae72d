"""Step inputs from real denoising trajectories: the data of the export's validation and of INT8 calibration.

A `RecordingBackend` wraps any backend and keeps every step's feeds (and outputs): prefills of real image
prompts, then canvases at every denoising step (all noise levels from all-MASK to almost clean), with and
without a finished block in front. `record` decodes conversations through a Pipeline over such a backend (a new
Pipeline: the caller's is never modified, so it stays safe to share); `record_vision` does the same for the
vision tower. Saved as a versioned safetensors file keyed `<step>/<io name>`, with its hash.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from bard_deploy import iospec
from bard_deploy.manifest import sha256
from bard_deploy.runtimes.api import Pipeline

FORMAT_VERSION = 1

Record = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]      # (feeds, outputs) of one graph run


class RecordingBackend:
    """Delegates to `inner` and records (feeds, outputs) of every decoder step, copied to the CPU."""

    def __init__(self, inner, keep_outputs: bool = True):
        self.inner, self.keep_outputs = inner, keep_outputs
        self.config, self.io, self.device = inner.config, inner.io, inner.device
        self.records: list[Record] = []

    def embed(self, input_ids):
        """The inner backend's embedding lookup (not recorded)."""
        return self.inner.embed(input_ids)

    def encode_images(self, pixel_values, grid_thw):
        """The inner backend's vision tower (not recorded: see `record_vision`)."""
        return self.inner.encode_images(pixel_values, grid_thw)

    def step(self, feeds):
        """The inner step, recorded."""
        out = self.inner.step(feeds)
        self.records.append(({k: v.cpu().clone() for k, v in feeds.items()},
                             {k: v.cpu().clone() for k, v in out.items()} if self.keep_outputs else {}))
        return out


def prompt_of(conversation: list[dict]) -> list[dict]:
    """The turns to decode: all but a final assistant answer."""
    return conversation[:-1] if conversation and conversation[-1]["role"] == "assistant" else conversation


def record(pipe: Pipeline, conversations: list[list[dict]], ar: bool = False, keep_outputs: bool = True,
           **options) -> list[Record]:
    """Decode the prompts of `conversations` one at a time through `pipe`'s backend, recording every step."""
    rec = RecordingBackend(pipe.backend, keep_outputs)
    recording = pipe.with_backend(rec)
    for conv in conversations:
        recording.generate_batch([prompt_of(conv)], ar=ar, **options)
    return rec.records


def record_vision(pipe: Pipeline, conversations: list[list[dict]]) -> list[Record]:
    """(feeds, outputs) of the vision tower for every image of the prompts, one image per record."""
    records = []
    for conv in conversations:
        enc = pipe.encoder.encode(prompt_of(conv))
        if enc.pixel_values is None:
            continue
        start = 0
        for grid in enc.image_grid_thw:
            vio = iospec.VisionIO.for_grid(pipe.config, grid.tolist())
            pixels = enc.pixel_values[start:start + vio.patches]
            start += vio.patches
            embeds, deepstack = pipe.backend.encode_images(pixels, grid[None])
            records.append((vio.feeds(pixels), {k: v.cpu() for k, v in vio.outputs_of(embeds, deepstack).items()}))
    return records


def save_calibration(path: str | Path, records: list[Record], meta: dict) -> str:
    """Write the feeds of `records`; returns the file's sha256."""
    tensors = {f"{i:05d}/{name}": t.contiguous() for i, (feeds, _) in enumerate(records) for name, t in feeds.items()}
    save_file(tensors, str(path), metadata={"format_version": str(FORMAT_VERSION), "meta": json.dumps(meta)})
    return sha256(Path(path))
