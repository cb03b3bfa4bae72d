"""The whole model as checkpoints name it: `model.language_model` (our decoder), `model.visual`
(Qwen3-VL's vision tower, absent for a text-only Qwen3) and `lm_head` (absent when tied).

A thin wrapper, like mlx-lm's qwen3_vl.py: it turns token ids and images into decoder inputs
(`embed`, `positions`), and runs the pure decoder step (`step`) followed by the LM head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bard_deploy.config import ModelConfig
from bard_deploy.errors import RuntimeInputError
from bard_deploy.model import KV, TextModel
from bard_deploy.vision import build_vision_tower, encode_images, merge_image_features, rope_index


class BardVLM(nn.Module):
    """Decoder, optional vision tower and LM head under HF checkpoint names (`model.language_model`,
    `model.visual`, `lm_head`; the head is None when tied to the input embedding)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        modules: dict[str, nn.Module] = {"language_model": TextModel(config.text)}
        if config.has_vision:
            modules["visual"] = build_vision_tower(config.vision)
        self.model = nn.ModuleDict(modules)
        c = config.text
        self.lm_head = None if c.tie_word_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.init_weights()

    @classmethod
    def on_meta(cls, config: ModelConfig) -> BardVLM:
        """The model with its parameters on the meta device (no memory, no initialisation) and its buffers (rotary
        tables, functions of the config) on the CPU: the shell a checkpoint loader assigns tensors into."""
        with torch.device("meta"):
            model = cls(config)
        model.language_model.rotary_tables()
        if model.visual is not None:                   # transformers' tower: its rotary module recomputes them
            rot = model.visual.rotary_pos_emb
            model.visual.rotary_pos_emb = type(rot)(rot.config)
        assert not any(b.is_meta for b in model.buffers()), "a buffer was left on the meta device"
        return model

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """HF's initialisation of the decoder (normal(0, std) for linear and embedding weights, norms at 1);
        the vision tower initialises itself. Loading a checkpoint overwrites all of it."""
        for module in [self.language_model, self.lm_head]:
            if module is None:
                continue
            for m in module.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    m.weight.normal_(0.0, std)
                    if getattr(m, "bias", None) is not None:
                        m.bias.zero_()

    # ---- parts -------------------------------------------------------------------------------------
    @property
    def language_model(self) -> TextModel:
        """The text decoder (`model.language_model`)."""
        return self.model["language_model"]

    @property
    def visual(self) -> nn.Module | None:
        """The vision tower (`model.visual`), None for a text-only model."""
        return self.model["visual"] if "visual" in self.model else None

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for hidden states (..., hidden) -> (..., vocab); callers select rows first."""
        if self.lm_head is None:
            return F.linear(hidden, self.language_model.embed_tokens.weight)
        return self.lm_head(hidden)

    # ---- inputs ------------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_grid_thw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids (B, L) [+ images] -> inputs_embeds (B, L, hidden) and deepstack_embeds
        (n_ds, B, L, hidden) (None without images): image features replace the image-pad embeddings."""
        x = self.language_model.embed_tokens(input_ids)
        if pixel_values is None:
            return x, None
        if self.visual is None:
            raise RuntimeInputError("this model has no vision tower but an image was given", "image")
        feats, deepstack = encode_images(self.visual, pixel_values, image_grid_thw)
        return merge_image_features(x, input_ids, self.config.image_token_id, feats, deepstack,
                                    self.config.video_token_id)

    def positions(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                  attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """MRoPE position ids (3, B, L) and per-row rope deltas (B,) for a prompt batch."""
        return rope_index(input_ids, self.config.image_token_id, image_grid_thw,
                          self.config.spatial_merge_size, attention_mask, self.config.video_token_id)

    # ---- the step ----------------------------------------------------------------------------------
    def step(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, attention_bias: torch.Tensor,
             past_key_values: list[KV] | tuple[KV, ...] | None = None,
             deepstack_embeds: torch.Tensor | None = None,
             logits_to_keep: torch.Tensor | None = None) -> tuple[torch.Tensor, list[KV]]:
        """The decoder step: logits (B, K, vocab) of the positions `logits_to_keep` (indices into the T step
        tokens; None: all, K = T) and the new tokens' K/V per layer (B, Hkv, T, D)."""
        h, new_kv = self.language_model(inputs_embeds, position_ids, attention_bias, past_key_values,
                                        deepstack_embeds)
        if logits_to_keep is not None:
            h = h.index_select(1, logits_to_keep)
        return self.head(h), new_kv

    def greedy_head(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`greedy_head` with this model's MASK token (None for an AR model)."""
        return greedy_head(logits, self.config.bard.mask_token_id if self.config.bard else None)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """The training forward: final hidden states (N, L, hidden) of a whole packed batch, no cache.

        The LM head is left to the loss, which applies it only where a loss is taken. Under DDP every parameter
        must take part: a batch without images touches the vision tower with a zero-weighted term.
        """
        x, ds = self.embed(input_ids, pixel_values, image_grid_thw)
        h, _ = self.language_model(x, position_ids, attention_mask, None, ds)
        if pixel_values is None and self.visual is not None and self.training:
            h = h + 0.0 * sum(p.sum() for p in self.visual.parameters())
        return h

    def num_parameters(self) -> int:
        """Total number of parameters, vision tower included (shared tensors counted once)."""
        return sum(p.numel() for p in self.parameters())



def greedy_head(logits: torch.Tensor, mask_token_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(arg-max ids, their softmax probability) per position of logits (..., vocab), the MASK token suppressed
    (a BARD model never predicts it): exactly the decode loop's greedy rule, for graphs to return instead of the
    logits, and for the export to check them against."""
    if logits.dtype != torch.float32:      # (a no-op cast would still be a graph node in front of the logits)
        logits = logits.float()
    if mask_token_id is not None:
        logits = logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) == mask_token_id,
                                    float("-inf"))
    conf, ids = torch.softmax(logits, dim=-1).max(-1)
    return ids, conf
