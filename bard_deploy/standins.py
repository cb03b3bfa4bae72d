"""Random-weight stand-ins for the checkpoints users bring, in the official on-disk format (no download).

`write_standin(out, "2b")` writes what a Qwen3-VL-2B-Instruct directory holds: `config.json` (the official
values, transformers 4.57 layout with `rope_scaling`), bf16 weights sharded with a `model.safetensors.index.json`
under the names and shapes transformers' own `Qwen3VLForConditionalGeneration` gives them (built on the meta
device, so no memory is spent on it), `preprocessor_config.json` and `generation_config.json` with the official
values, and a tokenizer whose special tokens sit at Qwen's real ids (151643 `<|endoftext|>` ... 151668
`</think>`) over a word-level vocabulary of 151643 regular tokens. `bard_vl=True` relabels the copy as an
official Bard-VL checkpoint (`model_type: bard_vl`, no mask id in the config, `<|mask|>` at 151671 in the
tokenizer). `layers` cuts the decoder's depth (real widths and vocabulary) for quick benchmarks; size "tiny" keeps
the layout and vocabulary at tiny widths, for tests.

Where the values come from: the config.json, preprocessor_config.json and generation_config.json published with
Qwen/Qwen3-VL-{2B,4B,8B}-Instruct (as recalled here without network access; the text shapes agree with
`bench_step.SHAPES` and shared/reference/environment.md: 2.13 B parameters, 4.26 GB bf16 for the 2B). The
chat template is the project's reduced Qwen template, not Qwen's full one (tools, video and thinking parts are
left out).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from bard_deploy.atomic import atomic_dir, write_json
from bard_deploy.checkpoint import INDEX
from bard_deploy.config import BARD_VL_MASK_TOKEN_ID
from bard_deploy.data.tokenizer import vocabulary, word_level_tokenizer
from bard_deploy.errors import ConfigError

# text_config / vision_config of the official Qwen3-VL-*-Instruct config.json files
_TEXT_COMMON = {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "dtype": "bfloat16",
                "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "initializer_range": 0.02,
                "max_position_embeddings": 262144, "model_type": "qwen3_vl_text", "num_key_value_heads": 8,
                "rms_norm_eps": 1e-06, "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                                                        "rope_type": "default"},
                "rope_theta": 5000000, "use_cache": True, "vocab_size": 151936}
_VISION_COMMON = {"hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "initializer_range": 0.02,
                  "model_type": "qwen3_vl", "num_heads": 16, "num_position_embeddings": 2304, "patch_size": 16,
                  "spatial_merge_size": 2, "temporal_patch_size": 2}
SIZES = {
    "2b": ({"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
            "tie_word_embeddings": True},
           {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "out_hidden_size": 2048,
            "deepstack_visual_indexes": [5, 11, 17]}, True),
    "4b": ({"hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
            "tie_word_embeddings": True},
           {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "out_hidden_size": 2560,
            "deepstack_visual_indexes": [5, 11, 17]}, True),
    "8b": ({"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
            "tie_word_embeddings": False},
           {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "out_hidden_size": 4096,
            "deepstack_visual_indexes": [8, 16, 24]}, False),
    # not an official size: the official layout and vocabulary at tiny widths, for tests
    "tiny": ({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": True,
              "rope_scaling": {"mrope_interleaved": True, "mrope_section": [4, 2, 2], "rope_type": "default"}},
             {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
              "num_position_embeddings": 64, "deepstack_visual_indexes": [0, 1]}, True),
}
# Qwen2/3's special tokens from id 151643 on, in order
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
                  "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                  "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>")
FIRST_SPECIAL = 151643
PREPROCESSOR = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
                "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Qwen2VLImageProcessorFast",
                "image_std": [0.5, 0.5, 0.5], "merge_size": 2, "patch_size": 16, "processor_class": "Qwen3VLProcessor",
                "resample": 3, "rescale_factor": 0.00392156862745098,
                "size": {"longest_edge": 16777216, "shortest_edge": 65536}, "temporal_patch_size": 2}
GENERATION = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
              "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.0, "temperature": 0.7,
              "transformers_version": "4.56.0"}


def official_config(size: str, layers: int | None = None, bard_vl: bool = False) -> dict:
    """The config.json of Qwen3-VL-<size>-Instruct (optionally cut to `layers` decoder layers and relabelled as an
    official Bard-VL checkpoint, which keeps its mask id out of the config)."""
    if size not in SIZES:
        raise ConfigError(f"stand-in size must be one of {', '.join(SIZES)}, got {size!r}", size)
    text, vision, tie = copy.deepcopy(SIZES[size])
    text = {**_TEXT_COMMON, **text}
    if layers is not None:
        if not 1 <= layers <= text["num_hidden_layers"]:
            raise ConfigError(f"--layers must be in 1..{text['num_hidden_layers']}, got {layers}", layers)
        text["num_hidden_layers"] = layers
    vision = {**_VISION_COMMON, **vision}
    if layers is not None:              # DeepStack features go into the first decoder layers: keep them in range
        vision["deepstack_visual_indexes"] = vision["deepstack_visual_indexes"][:layers]
    arch = "BardVLForConditionalGeneration" if bard_vl else "Qwen3VLForConditionalGeneration"
    return {"architectures": [arch], "image_token_id": 151655, "model_type": "bard_vl" if bard_vl else "qwen3_vl",
            "text_config": text, "tie_word_embeddings": tie, "transformers_version": "4.57.0.dev0",
            "video_token_id": 151656, "vision_config": vision, "vision_end_token_id": 151653,
            "vision_start_token_id": 151652}


def weight_specs(config: dict) -> dict[str, tuple[int, ...]]:
    """{checkpoint key: shape} of the weights transformers saves for this config (a tied lm_head is not saved)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    hf = {**config, "model_type": "qwen3_vl", "architectures": ["Qwen3VLForConditionalGeneration"]}
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig.from_dict(hf))
    specs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config["tie_word_embeddings"]:
        specs.pop("lm_head.weight", None)
    return specs


def _random(key: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Norm weights 1, biases 0, everything else normal(0, 0.02): a sane untrained model, in bf16."""
    if len(shape) == 1 and "norm" in key and key.endswith(".weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    if key.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)


def write_weights(directory: Path, specs: dict[str, tuple[int, ...]], seed: int, max_shard_bytes: int) -> int:
    """Random bf16 weights in shards of at most `max_shard_bytes`, one shard in memory at a time; returns bytes."""
    g = torch.Generator().manual_seed(seed)
    groups: list[list[str]] = [[]]
    size = 0
    for key, shape in specs.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    weight_map, total = {}, 0
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {k: _random(k, specs[k], g) for k in keys}
        total += sum(t.numel() * 2 for t in shard.values())
        save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
        del shard
    write_json(directory / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return total


def build_tokenizer(bard_vl: bool = False):
    """A word-level tokenizer with 151643 regular tokens (the synthetic task's words first, then fillers) and
    Qwen's special tokens at their real ids; `<|mask|>` at 151671 for a Bard-VL copy."""
    from tokenizers import AddedToken

    words = [w for w in vocabulary() if not w.startswith("<")]
    vocab = {w: i for i, w in enumerate(words)}
    for i in range(len(vocab), FIRST_SPECIAL):
        vocab[f"w{i}"] = i
    specials = list(SPECIAL_TOKENS)
    if bard_vl:      # 151669, 151670 unused, then the mask token at Bard-VL's id
        specials += ["<|reserved_0|>", "<|reserved_1|>", "<|mask|>"]
    # Qwen's byte-level BPE has no unknown token; this one is a filler
    tok = word_level_tokenizer(vocab, [AddedToken(t, special=True) for t in specials], f"w{FIRST_SPECIAL - 1}",
                               262144, {"mask_token": "<|mask|>"} if bard_vl else {})
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|image_pad|>", "<|mask|>")}
    assert ids["<|endoftext|>"] == FIRST_SPECIAL and ids["<|image_pad|>"] == 151655
    assert not bard_vl or ids["<|mask|>"] == BARD_VL_MASK_TOKEN_ID
    return tok


def write_standin(out: str | Path, size: str = "2b", layers: int | None = None, bard_vl: bool = False,
                  seed: int = 0, max_shard_bytes: int = 2 * 10**9) -> Path:
    """Write a random-weight stand-in checkpoint directory (atomically); returns it."""
    out = Path(out)
    config = official_config(size, layers, bard_vl)
    specs = weight_specs(config)
    with atomic_dir(out, ConfigError, "stand-in") as tmp:
        write_weights(tmp, specs, seed, max_shard_bytes)
        write_json(tmp / "config.json", config)
        write_json(tmp / "preprocessor_config.json", PREPROCESSOR)
        write_json(tmp / "generation_config.json", GENERATION)
        build_tokenizer(bard_vl).save_pretrained(tmp)
        (tmp / "standin.json").write_text(json.dumps({"size": size, "layers": layers, "bard_vl": bard_vl,
                                                      "seed": seed, "weights": "random, bf16"}) + "\n")
    return out
