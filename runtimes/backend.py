"""Backends: interchangeable step callables keyed by the IO table's names.

A backend embeds token ids, encodes images, and runs the decoder step `step(feeds) -> outputs` where both
dicts use `bard_deploy.iospec` names. The denoising loop imports none of them; it receives one.
"""

from __future__ import annotations

from typing import Protocol

import torch

from bard_deploy import iospec
from bard_deploy.config import ModelConfig


class Backend(Protocol):
    config: ModelConfig
    io: iospec.DecoderIO

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 -> (B, T, hidden)."""

    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> image embeds (tokens, hidden), DeepStack features (n_ds, tokens, hidden)."""

    def step(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One decoder forward; feeds and outputs keyed by the IO table's names."""


class TorchBackend:
    """The reference backend: eager PyTorch on a loaded BardVLM (read-only, so safe across threads)."""

    def __init__(self, model):
        self.model = model.eval()
        self.config: ModelConfig = model.config
        self.io = iospec.DecoderIO.for_config(self.config)

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.language_model.embed_tokens(input_ids)

    @torch.inference_mode()
    def encode_images(self, pixel_values, grid_thw):
        from bard_deploy.vision import encode_images

        return encode_images(self.model.visual, pixel_values, grid_thw)

    @torch.inference_mode()
    def step(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n = self.io.num_layers
        past = None
        if iospec.past_key(0) in feeds:
            past = [(feeds[iospec.past_key(i)], feeds[iospec.past_value(i)]) for i in range(n)]
        logits, new_kv = self.model.step(feeds[iospec.INPUTS_EMBEDS], feeds[iospec.POSITION_IDS],
                                         feeds[iospec.ATTENTION_BIAS], past, feeds.get(iospec.DEEPSTACK_EMBEDS))
        out = {iospec.LOGITS: logits}
        for i, (k, v) in enumerate(new_kv):
            out[iospec.new_key(i)] = k
            out[iospec.new_value(i)] = v
        return out
