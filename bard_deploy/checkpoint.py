"""HF-format checkpoints <-> BardVLM, through one declarative key map.

A checkpoint directory holds `config.json`, `model.safetensors` (or shards + `model.safetensors.index.json`)
and the tokenizer / processor files. Safetensors only: pickle weights are refused, even renamed.
Writes are atomic: everything goes to a temporary sibling directory that is renamed into place.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from bard_deploy.atomic import atomic_dir, recover_dir, write_json
from bard_deploy.config import ModelConfig, load_config
from bard_deploy.errors import CheckpointError
from bard_deploy.vlm import BardVLM

# The key map, per checkpoint layout: (prefix in the file, prefix of our parameter name). Our names are
# Qwen3-VL's, so the map is the identity there; it is invertible, so saving uses it backwards.
KEY_MAP: dict[str, tuple[tuple[str, str], ...]] = {
    "qwen3_vl": (("model.language_model.", "model.language_model."),
                 ("model.visual.", "model.visual."),
                 ("lm_head.", "lm_head.")),
    "qwen3": (("model.", "model.language_model."),
              ("lm_head.", "lm_head.")),
}
# Read-only aliases, tried after KEY_MAP: the older Qwen-VL layout (decoder under `model.`, tower under `visual.`).
LEGACY_KEY_MAP: dict[str, tuple[tuple[str, str], ...]] = {
    "qwen3_vl": (("model.", "model.language_model."), ("visual.", "model.visual.")),
    "qwen3": (),
}

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Tokenizer, processor and generation files a checkpoint carries along unchanged.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
              "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
              "generation_config.json")


def to_ours(key: str, arch: str) -> str | None:
    """Our parameter name for a checkpoint key, or None when no rule of the layout matches."""
    for src, dst in KEY_MAP[arch] + LEGACY_KEY_MAP[arch]:
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def to_file(name: str, arch: str) -> str:
    """The checkpoint key of one of our parameter names (KEY_MAP read backwards)."""
    for src, dst in KEY_MAP[arch]:
        if name.startswith(dst):
            return src + name[len(dst):]
    raise AssertionError(f"no key map rule for our parameter {name}")


# ---- reading --------------------------------------------------------------------------------------

def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint, in index order; refuses pickle and half-written shards."""
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}", str(index)) from e
        files = [directory / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"shard {f.name} listed in {INDEX} is missing", str(f))
        return files
    single = directory / WEIGHTS
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{directory}: only pickle weights ({pickles[0]}); safetensors required "
                              "(pickle files can execute code and are refused)", pickles[0])
    raise CheckpointError(f"{directory}: no {WEIGHTS} or {INDEX}", str(directory))


def iter_tensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) over every weight file; a corrupt, truncated or renamed pickle file is an error.

    Each tensor comes from its own opening of the file: safetensors maps the file, and a mapping kept open for a
    whole 2 GB shard keeps every page read so far in this process's RSS (1.2x the weights for a bf16 -> fp32
    load instead of ~1.05x). A tensor the caller keeps as it is still references its pages (zero copy)."""
    for path in weight_files(directory):
        if path.stat().st_size == 0:
            raise CheckpointError(f"weight file {path.name} is empty", str(path))
        try:
            with safe_open(path, framework="pt") as f:
                keys = list(f.keys())
            for key in keys:
                with safe_open(path, framework="pt") as f:
                    tensor = f.get_tensor(key)
                yield key, tensor
                del tensor
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"weight file {path.name} is not a valid safetensors file ({e})", str(path)) from e


def tensor_shapes(directory: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (shape, dtype)} from the safetensors headers, without reading the tensors."""
    out = {}
    for path in weight_files(directory):
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    out[key] = (tuple(sl.get_shape()), str(sl.get_dtype()))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"weight file {path.name} is not a valid safetensors file ({e})", str(path)) from e
    return out


def load_model(directory: str | Path, dtype: torch.dtype = torch.float32,
               block_size: int | None = None, mask_token_id: int | None = None,
               prompt_attention: str | None = None) -> BardVLM:
    """Load a checkpoint directory (qwen3_vl, bard_vl or qwen3 layout) into a BardVLM in eval mode, its
    parameters in `dtype` (buffers stay fp32).

    Lean at any size: the model is built on the meta device and each tensor is read from its (memory-mapped)
    file, converted and assigned one at a time, so the peak is about the weights once in `dtype` plus one tensor.
    Every key of the file must map to one of our parameters and every parameter must be present with the same
    shape; otherwise the error names the key. `block_size`, `mask_token_id`, `prompt_attention`: one-off
    overrides of the bard section (`config.load_config`).
    """
    directory = Path(directory)
    recover_dir(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist", str(directory))
    config = load_config(directory, block_size, mask_token_id, prompt_attention)
    model = BardVLM.on_meta(config)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    arch = config.arch
    loaded: dict[str, torch.Tensor] = {}
    tied_head: torch.Tensor | None = None
    for key, tensor in iter_tensors(directory):
        name = to_ours(key, arch)
        if name == "lm_head.weight" and config.text.tie_word_embeddings:
            tied_head = tensor  # some exporters write the tied head too; it must equal the embedding
            continue
        if name is None or name not in shapes:
            raise CheckpointError(f"unknown checkpoint key '{key}' (not a parameter of a {arch} model)", key)
        if name in loaded:
            raise CheckpointError(f"checkpoint key '{key}' appears twice", key)
        if tuple(tensor.shape) != shapes[name]:
            raise CheckpointError(f"checkpoint key '{key}' has shape {tuple(tensor.shape)}, the config implies "
                                  f"{shapes[name]}", key)
        loaded[name] = tensor.to(dtype)            # the file's copy goes as soon as it is converted
        del tensor
    missing = [n for n in shapes if n not in loaded]
    if missing:
        raise CheckpointError(f"checkpoint is missing key '{to_file(missing[0], arch)}'"
                              f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}", missing[0])
    if tied_head is not None:
        emb = loaded["model.language_model.embed_tokens.weight"]
        if tied_head.shape != emb.shape or not torch.equal(tied_head.to(dtype), emb):
            raise CheckpointError("lm_head.weight differs from embed_tokens but tie_word_embeddings is true",
                                  "lm_head.weight")
    model.load_state_dict(loaded, strict=True, assign=True)
    return model.eval()


# ---- writing --------------------------------------------------------------------------------------

def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    return shards


def save_model(model: BardVLM, directory: str | Path, config: ModelConfig | None = None,
               side_files_from: str | Path | None = None, max_shard_bytes: int = 2 * 1024**3,
               extra_files: dict[str, dict] | None = None, copy_files: list[str | Path] = ()) -> Path:
    """Write a checkpoint directory atomically (temp directory, fsync, rename).

    `config` defaults to the model's own; `side_files_from` copies tokenizer / processor files from another
    checkpoint; `extra_files` writes more JSON files (name -> object); `copy_files` copies files in (metrics,
    plots). An existing directory is replaced only
    once the new one is complete, so a crash leaves either the old or the new checkpoint, never a mix (a kill between
    the two renames of `replace_dir` is repaired by the next reader: `recover_dir`).
    """
    directory = Path(directory)
    config = config or model.config
    with atomic_dir(directory, CheckpointError, "checkpoint") as tmp:
        tensors = {to_file(k, config.arch): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        shards = _shards(tensors, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], tmp / WEIGHTS, metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / name, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            write_json(tmp / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        write_json(tmp / "config.json", config.to_dict())
        if side_files_from is not None:
            for name in SIDE_FILES:
                src = Path(side_files_from) / name
                if src.is_file() and not (tmp / name).exists():
                    shutil.copy2(src, tmp / name)
        for name, obj in (extra_files or {}).items():
            write_json(tmp / name, obj)
        for f in copy_files:
            shutil.copy2(f, tmp / Path(f).name)
    return directory
