"""Backends: interchangeable step callables keyed by the IO table's names.

A backend embeds token ids, encodes images, and runs the decoder step `step(feeds) -> outputs` where both
dicts use `bard_deploy.iospec` names. The denoising loop imports none of them; it receives one, and keeps its
own tensors (KV buffer, canvas, logits) on the backend's `device`: where `embed` and `step` return theirs.
Optional, where a backend has them: `takes_outputs` (then `step(feeds, outputs)` computes only the outputs
named), `padded_past` (it takes the whole chunked KV buffer), `binding()` (a per-request state the loop passes
back as `step(..., binding=...)`: onnxruntime's IO binding).
"""

from __future__ import annotations

from typing import Protocol

import torch

from bard_deploy import iospec
from bard_deploy.config import ModelConfig
from bard_deploy.devices import resolve_device
from bard_deploy.vision import encode_images


class Backend(Protocol):
    """What the decoding loop needs of a backend."""

    config: ModelConfig
    io: iospec.DecoderIO
    device: torch.device          # where embed / encode_images / step return their tensors

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 -> (B, T, hidden)."""

    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> image embeds (tokens, hidden), DeepStack features (n_ds, tokens, hidden)."""

    def step(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One decoder forward; feeds and outputs keyed by the IO table's names."""


class TorchBackend:
    """The reference backend: eager PyTorch on a loaded BardVLM (read-only, so safe across threads), on the CPU
    or a CUDA device (`device`: cpu, cuda, cuda:N or auto; the model is moved there, in place); inputs may come
    from anywhere, outputs stay on the device."""

    def __init__(self, model, device: str | torch.device = "cpu"):
        self.device = resolve_device(str(device))
        self.model = model.eval().to(self.device)
        self.config: ModelConfig = model.config
        self.io = iospec.DecoderIO.for_config(self.config)

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 -> (B, T, hidden) on the backend's device."""
        return self.model.language_model.embed_tokens(input_ids.to(self.device))

    @torch.inference_mode()
    def encode_images(self, pixel_values, grid_thw):
        """The vision tower on the backend's device: image embeds and DeepStack features."""
        return encode_images(self.model.visual, pixel_values.to(self.device), grid_thw.to(self.device))

    @torch.inference_mode()
    def step(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One decoder forward; feeds (from any device) and outputs keyed by the IO table's names."""
        return self.io.outputs_of(*self.model.step(*self.io.unpack_feeds({k: v.to(self.device)
                                                                          for k, v in feeds.items()})))
