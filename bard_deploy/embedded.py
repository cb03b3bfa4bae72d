"""The embedded default: a tiny Qwen3-VL-architecture model over the synthetic task's tokenizer.

`embedded_config` gives its ModelConfig (HF Qwen3-VL format, built from the tokenizer's special ids);
`new_checkpoint` writes a randomly initialised one, tokenizer and processor included, for the source-model
trainer (and for tests that need a complete checkpoint directory).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer

from bard_deploy.checkpoint import save_model
from bard_deploy.config import ModelConfig
from bard_deploy.data.tokenizer import build_image_processor, build_tokenizer, padded_vocab_size
from bard_deploy.vlm import BardVLM


def embedded_config(tokenizer, hidden: int = 128, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                    vision_depth: int = 2, vision_hidden: int = 64) -> ModelConfig:
    """A Qwen3-VL config sized for the synthetic task (about 1-2 M parameters by default)."""

    head_dim = hidden // heads
    quarter = head_dim // 2 // 4
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    hf = {
        "model_type": "qwen3_vl",
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "tie_word_embeddings": True,
        "text_config": {
            "vocab_size": padded_vocab_size(tokenizer), "hidden_size": hidden, "intermediate_size": 3 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "head_dim": head_dim, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter],
                                "mrope_interleaved": True},
            "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
        },
        "vision_config": {
            "depth": vision_depth, "hidden_size": vision_hidden, "intermediate_size": 2 * vision_hidden,
            "num_heads": 2, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
            "in_channels": 3, "out_hidden_size": hidden, "num_position_embeddings": 36,
            "deepstack_visual_indexes": list(range(min(vision_depth, layers, 2))),
        },
        **ids,
    }
    return ModelConfig.from_dict(hf)


def save_checkpoint(model, directory: str | Path, config: ModelConfig | None = None, extra: dict | None = None,
                    copy: Sequence[str | Path] = ()) -> Path:
    """A complete checkpoint of the embedded default: weights, config, tokenizer, processor, generation config."""
    tokenizer = build_tokenizer()
    with tempfile.TemporaryDirectory() as side:
        tokenizer.save_pretrained(side)
        build_image_processor().save_pretrained(side)
        gen = {"eos_token_id": [tokenizer.eos_token_id], "pad_token_id": tokenizer.pad_token_id}
        return save_model(model, directory, config=config, side_files_from=side,
                          extra_files={"generation_config.json": gen, **(extra or {})}, copy_files=list(copy))


def new_checkpoint(directory: str | Path, seed: int = 0, bard: dict | None = None, **sizes) -> Path:
    """Write a randomly initialised embedded-default checkpoint (weights, config, tokenizer, processor)."""
    tokenizer = build_tokenizer()
    cfg = embedded_config(tokenizer, **sizes)
    if bard is not None:
        cfg = cfg.with_bard(**{"mask_token_id": tokenizer.convert_tokens_to_ids("<|mask|>"), **bard})
    torch.manual_seed(seed)
    return save_checkpoint(BardVLM(cfg), directory, config=cfg)


def is_embedded_default(directory: str | Path) -> bool:
    """True when a checkpoint uses the embedded default's tokenizer (so it was made for the synthetic task)."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        return False
    try:
        vocab = Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    except Exception:      # the tokenizers library raises plain Exception for any unreadable file: not ours
        return False
    return vocab == build_tokenizer().get_vocab()
