"""Decoder inputs from real denoising trajectories: the data of the export's validation and of INT8 calibration.

A `RecordingBackend` wraps any backend and keeps every step's feeds (and outputs): prefills of real image
prompts, then canvases at every denoising step (all noise levels from all-MASK to almost clean), with and
without a finished block in front. Saved as a versioned safetensors file keyed `<step>/<io name>`, with its hash.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bard_deploy.errors import ExportError

FORMAT_VERSION = 1


class RecordingBackend:
    """Delegates to `inner` and records (feeds, outputs) of every step."""

    def __init__(self, inner, keep_outputs: bool = True):
        self.inner, self.keep_outputs = inner, keep_outputs
        self.config, self.io, self.device = inner.config, inner.io, inner.device
        self.records: list[tuple[dict, dict]] = []

    def embed(self, input_ids):
        return self.inner.embed(input_ids)

    def encode_images(self, pixel_values, grid_thw):
        return self.inner.encode_images(pixel_values, grid_thw)

    def step(self, feeds):
        out = self.inner.step(feeds)
        self.records.append(({k: v.cpu().clone() for k, v in feeds.items()},
                             {k: v.cpu().clone() for k, v in out.items()} if self.keep_outputs else {}))
        return out


def record(pipe, conversations: list[list[dict]], ar: bool = False, **options) -> list[tuple[dict, dict]]:
    """Run `pipe` (a runtime Pipeline) over the prompts of `conversations`, one at a time, recording the steps."""
    rec = RecordingBackend(pipe.backend)
    inner, pipe.backend = pipe.backend, rec
    try:
        for conv in conversations:
            pipe.generate_batch([conv[:-1] if conv[-1]["role"] == "assistant" else conv], ar=ar, **options)
    finally:
        pipe.backend = inner
    return rec.records


def save_calibration(path: str | Path, records: list[tuple[dict, dict]], meta: dict) -> str:
    """Write the feeds of `records`; returns the file's sha256."""
    tensors = {f"{i:05d}/{name}": t.contiguous() for i, (feeds, _) in enumerate(records) for name, t in feeds.items()}
    save_file(tensors, str(path), metadata={"format_version": str(FORMAT_VERSION), "meta": json.dumps(meta)})
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_calibration(path: str | Path) -> list[dict[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        version = (f.metadata() or {}).get("format_version")
    if version != str(FORMAT_VERSION):
        raise ExportError(f"calibration file {path} has format version {version}, expected {FORMAT_VERSION}", version)
    flat = load_file(str(path))
    steps: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        i, name = key.split("/", 1)
        steps.setdefault(i, {})[name] = t
    return [steps[i] for i in sorted(steps)]
