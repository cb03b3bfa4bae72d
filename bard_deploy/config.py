"""Model config: dataclasses read from, and written back to, an HF `config.json` (+ a `bard` section).

Three source layouts are understood:

- `qwen3_vl`  : transformers' Qwen3VLForConditionalGeneration (text_config + vision_config).
- `bard_vl`   : the official Bard-VL checkpoints: the same architecture under new names; the mask token
                (151671) is not in their config and their prompt attention is block-causal (see
                reference/bard-method.md §1.2-1.4). Imported as `qwen3_vl` with a filled `bard` section.
- `qwen3`     : a text-only Qwen3ForCausalLM (no vision tower).

Everything we do not model (token ids of the chat template, generation fields, ...) is kept verbatim in
`extra` and written back, so a saved checkpoint stays loadable by transformers.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from bard_deploy.errors import ConfigError

Arch = Literal["qwen3_vl", "qwen3"]
PromptAttention = Literal["causal", "block"]
Noise = Literal["mask", "mix"]

BARD_VL_MASK_TOKEN_ID = 151671  # hard-coded in the reference code, absent from its config
PROMPT_ATTENTION = ("causal", "block")
NOISES = ("mask", "mix")


def _field(d: dict, key: str, kind: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    """Read `d[key]`, check its type, and name the field in the error when it is missing or wrong."""
    if key not in d or d[key] is None:
        if default is ...:
            raise ConfigError(f"{where}: missing field '{key}'", key)
        return default
    value = d[key]
    # bool is an int subclass: refuse True where a count is expected.
    if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ConfigError(f"{where}: field '{key}' must be {_kind_name(kind)}, got {value!r}", value)
    if not isinstance(value, kind):
        raise ConfigError(f"{where}: field '{key}' must be {_kind_name(kind)}, got {value!r}", value)
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _positive(value: int, key: str, where: str) -> int:
    if value <= 0:
        raise ConfigError(f"{where}: field '{key}' must be > 0, got {value}", value)
    return value


@dataclass(frozen=True)
class TextConfig:
    """The Qwen3 text decoder's shape. Field names follow HF's text_config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: tuple[int, int, int] | None = None  # None: plain 1-D RoPE (text-only Qwen3)
    tie_word_embeddings: bool = False
    attention_bias: bool = False

    @classmethod
    def from_hf(cls, d: dict, where: str, tie_word_embeddings: bool) -> TextConfig:
        """Parse and validate an HF text config dict (`where` names it in errors); reads transformers 5.x
        `rope_parameters` or 4.x `rope_theta` + `rope_scaling`. `tie_word_embeddings` is passed in:
        Qwen3-VL keeps it at the top level."""
        ints = {}
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads"):
            ints[key] = _positive(_field(d, key, int, where), key, where)
        head_dim = _field(d, "head_dim", int, where, ints["hidden_size"] // ints["num_attention_heads"])
        _positive(head_dim, "head_dim", where)
        if ints["num_attention_heads"] % ints["num_key_value_heads"]:
            raise ConfigError(
                f"{where}: num_attention_heads ({ints['num_attention_heads']}) is not a multiple of "
                f"num_key_value_heads ({ints['num_key_value_heads']})", ints["num_key_value_heads"])
        if head_dim % 2:
            raise ConfigError(f"{where}: head_dim must be even for RoPE, got {head_dim}", head_dim)
        act = _field(d, "hidden_act", str, where, "silu")
        if act != "silu":
            raise ConfigError(f"{where}: hidden_act '{act}' is not supported (Qwen3 uses 'silu')", act)
        # transformers 5.x: rope_parameters; 4.x checkpoints: rope_theta + rope_scaling.
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{where}: rope_parameters must be an object, got {rope!r}", rope)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ConfigError(f"{where}: rope_type '{rope_type}' is not supported (only 'default')", rope_type)
        theta = rope.get("rope_theta", d.get("rope_theta", 1e6))
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
            raise ConfigError(f"{where}: rope_theta must be a positive number, got {theta!r}", theta)
        section = rope.get("mrope_section")
        if section is not None:
            if (not isinstance(section, (list, tuple)) or len(section) != 3
                    or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in section)):
                raise ConfigError(f"{where}: mrope_section must be 3 non-negative ints, got {section!r}", section)
            # transformers silently accepts a wrong sum and then rotates the wrong dims (environment.md §2).
            if sum(section) != head_dim // 2:
                raise ConfigError(
                    f"{where}: mrope_section {list(section)} sums to {sum(section)}, expected head_dim/2 = "
                    f"{head_dim // 2}", section)
            if rope.get("mrope_interleaved", True) is not True:
                raise ConfigError(f"{where}: only interleaved MRoPE (Qwen3-VL) is supported", section)
            section = tuple(section)
        eps = _field(d, "rms_norm_eps", (int, float), where, 1e-6)
        return cls(
            **ints, head_dim=head_dim,
            max_position_embeddings=_positive(_field(d, "max_position_embeddings", int, where, 32768),
                                              "max_position_embeddings", where),
            rms_norm_eps=float(eps), rope_theta=float(theta), mrope_section=section,
            tie_word_embeddings=tie_word_embeddings,
            attention_bias=_field(d, "attention_bias", bool, where, False),
        )

    def to_hf(self) -> dict:
        """The HF text_config fields this dataclass models, in transformers 5.x form (`rope_parameters`)."""
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.mrope_section is not None:
            rope.update(mrope_section=list(self.mrope_section), mrope_interleaved=True)
        return {
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps, "rope_parameters": rope, "hidden_act": "silu",
            "attention_bias": self.attention_bias,
        }


@dataclass(frozen=True)
class BardSection:
    """What BARD adds to a checkpoint's config: no parameters, only these facts."""

    mask_token_id: int
    block_size: int | None = None          # the trained block size; None = unknown (imported checkpoint)
    prompt_attention: PromptAttention = "causal"
    noise: Noise = "mask"
    source_model: str | None = None
    stage: str | None = None
    parent: str | None = None
    data_hash: str | None = None
    dual_mode: bool = False                # trained with an AR loss too: it also decodes causally (ar=True)
    # mix noise: the weight of the CE at the noisy tokens the noise left unchanged (0 = the reference's loss, which
    # never shows the model a right visible token); None = not recorded (imported, or trained before it was)
    mix_keep_weight: float | None = None

    @classmethod
    def from_dict(cls, d: Any, vocab_size: int) -> BardSection:
        """Parse and validate a `bard` section: unknown fields are refused, mask_token_id must lie in
        [0, vocab_size)."""
        where = "config.json 'bard'"
        if not isinstance(d, dict):
            raise ConfigError(f"{where} must be an object, got {d!r}", d)
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ConfigError(f"{where}: unknown field '{sorted(unknown)[0]}'", sorted(unknown)[0])
        mask = _field(d, "mask_token_id", int, where)
        if not 0 <= mask < vocab_size:
            raise ConfigError(f"{where}: mask_token_id {mask} is outside the vocabulary [0, {vocab_size})", mask)
        block = _field(d, "block_size", int, where, None)
        if block is not None:
            _positive(block, "block_size", where)
        pa = _field(d, "prompt_attention", str, where, "causal")
        if pa not in PROMPT_ATTENTION:
            raise ConfigError(f"{where}: prompt_attention must be one of {PROMPT_ATTENTION}, got {pa!r}", pa)
        noise = _field(d, "noise", str, where, "mask")
        if noise not in NOISES:
            raise ConfigError(f"{where}: noise must be one of {NOISES}, got {noise!r}", noise)
        strs = {k: _field(d, k, str, where, None) for k in ("source_model", "stage", "parent", "data_hash")}
        keep = _field(d, "mix_keep_weight", (int, float), where, None)
        if keep is not None and keep < 0:
            raise ConfigError(f"{where}: mix_keep_weight must be >= 0, got {keep!r}", keep)
        return cls(mask_token_id=mask, block_size=block, prompt_attention=pa, noise=noise,
                   dual_mode=_field(d, "dual_mode", bool, where, False),
                   mix_keep_weight=None if keep is None else float(keep), **strs)


@dataclass(frozen=True)
class ModelConfig:
    """A whole checkpoint's config: text decoder, optional vision tower, special ids, bard section."""

    arch: Arch
    text: TextConfig
    vision: dict | None = None             # HF vision_config, handed to transformers' vision tower
    image_token_id: int | None = None
    video_token_id: int | None = None
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    bard: BardSection | None = None
    extra: dict = field(default_factory=dict)  # every other top-level field, written back verbatim

    # ---- derived facts the rest of the code asks for ----------------------------------------------
    @property
    def has_vision(self) -> bool:
        """True when the checkpoint has a vision tower (Qwen3-VL; False for text-only Qwen3)."""
        return self.vision is not None

    @property
    def num_deepstack(self) -> int:
        """Number of DeepStack vision features added after the first decoder layers (0 without vision)."""
        return len(self.vision.get("deepstack_visual_indexes", [])) if self.vision else 0

    @property
    def spatial_merge_size(self) -> int:
        """Side of the patch square merged into one LM image token (HF default 2; 1 without vision)."""
        return int(self.vision.get("spatial_merge_size", 2)) if self.vision else 1

    def with_bard(self, **changes: Any) -> ModelConfig:
        """A copy whose bard section has `changes` applied (created if absent; needs mask_token_id)."""
        base = asdict(self.bard) if self.bard else {}
        base.update(changes)
        return replace(self, bard=BardSection.from_dict(base, self.text.vocab_size))

    # ---- reading -----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Any, block_size: int | None = None, mask_token_id: int | None = None,
                  prompt_attention: str | None = None) -> ModelConfig:
        """Parse an HF config dict. `block_size`, `mask_token_id` (default BARD_VL_MASK_TOKEN_ID) and
        `prompt_attention` (default "block") fill the bard section of an imported Bard-VL config."""
        if not isinstance(d, dict):
            raise ConfigError(f"config.json must be a JSON object, got {type(d).__name__}", d)
        model_type = d.get("model_type")
        if model_type == "qwen3":
            return cls._from_qwen3(d)
        if model_type in ("qwen3_vl", "bard_vl"):
            return cls._from_qwen3_vl(d, imported_bard_vl=model_type == "bard_vl", block_size=block_size,
                                      mask_token_id=mask_token_id, prompt_attention=prompt_attention)
        raise ConfigError(
            f"config.json: model_type {model_type!r} is not supported (expected 'qwen3_vl', 'bard_vl' or 'qwen3')",
            model_type)

    @classmethod
    def _from_qwen3(cls, d: dict) -> ModelConfig:
        tie = _field(d, "tie_word_embeddings", bool, "config.json", False)
        text = TextConfig.from_hf(d, "config.json", tie)
        bard = BardSection.from_dict(d["bard"], text.vocab_size) if d.get("bard") is not None else None
        known = set(text.to_hf()) | {"model_type", "tie_word_embeddings", "bard", "rope_theta", "rope_scaling"}
        return cls(arch="qwen3", text=text, bard=bard, extra={k: v for k, v in d.items() if k not in known})

    @classmethod
    def _from_qwen3_vl(cls, d: dict, imported_bard_vl: bool, block_size: int | None,
                       mask_token_id: int | None = None, prompt_attention: str | None = None) -> ModelConfig:
        tc = _field(d, "text_config", dict, "config.json")
        vc = _field(d, "vision_config", dict, "config.json")
        # Official Qwen3-VL configs put tie_word_embeddings at the top; some put it in text_config.
        tie = d.get("tie_word_embeddings", tc.get("tie_word_embeddings", False))
        if not isinstance(tie, bool):
            raise ConfigError(f"config.json: field 'tie_word_embeddings' must be bool, got {tie!r}", tie)
        text = TextConfig.from_hf(tc, "config.json text_config", tie)
        if text.mrope_section is None:
            raise ConfigError("config.json text_config: Qwen3-VL needs rope_parameters.mrope_section", None)
        vision = cls._check_vision(vc, text)
        ids = {k: _field(d, k, int, "config.json") for k in
               ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
        for key, value in ids.items():
            if not 0 <= value < text.vocab_size:
                raise ConfigError(f"config.json: {key} {value} is outside the vocabulary [0, {text.vocab_size})",
                                  value)
        if imported_bard_vl:
            if d.get("bard") is not None:
                raise ConfigError("config.json: a 'bard_vl' config already has a 'bard' section", d["bard"])
            bard_d = {"mask_token_id": BARD_VL_MASK_TOKEN_ID if mask_token_id is None else mask_token_id,
                      "prompt_attention": prompt_attention or "block", "block_size": block_size,
                      "source_model": d.get("_name_or_path")}
            if mask_token_id is None and not 0 <= BARD_VL_MASK_TOKEN_ID < text.vocab_size:
                raise ConfigError(f"config.json: this Bard-VL vocabulary ({text.vocab_size}) does not hold the "
                                  f"reference's mask id {BARD_VL_MASK_TOKEN_ID}: pass its mask id (--mask-token-id, "
                                  "mask_token_id=; bard-deploy import writes it once)", BARD_VL_MASK_TOKEN_ID)
            bard = BardSection.from_dict({k: v for k, v in bard_d.items() if v is not None}, text.vocab_size)
        else:
            bard = BardSection.from_dict(d["bard"], text.vocab_size) if d.get("bard") is not None else None
        known = {"model_type", "text_config", "vision_config", "tie_word_embeddings", "bard", *ids}
        extra = {k: v for k, v in d.items() if k not in known}
        if imported_bard_vl:
            extra.pop("architectures", None)
        text_extra = {k: v for k, v in tc.items()
                      if k not in set(text.to_hf()) | {"model_type", "rope_theta", "rope_scaling",
                                                       "tie_word_embeddings"}}
        if text_extra:
            extra["_text_config_extra"] = text_extra
        return cls(arch="qwen3_vl", text=text, vision=vision, bard=bard, extra=extra, **ids)

    @staticmethod
    def _check_vision(vc: dict, text: TextConfig) -> dict:
        where = "config.json vision_config"
        depth = _positive(_field(vc, "depth", int, where), "depth", where)
        out = _field(vc, "out_hidden_size", int, where)
        # transformers fails later with a misleading "tokens: 6, features: 6" message (environment.md §2).
        if out != text.hidden_size:
            raise ConfigError(f"{where}: out_hidden_size {out} != text hidden_size {text.hidden_size}", out)
        ds = _field(vc, "deepstack_visual_indexes", list, where, [])
        for i in ds:
            if not isinstance(i, int) or not 0 <= i < depth:
                raise ConfigError(f"{where}: deepstack_visual_indexes entry {i!r} is not in [0, depth={depth})", i)
        if len(ds) > text.num_hidden_layers:
            raise ConfigError(f"{where}: {len(ds)} deepstack features but only {text.num_hidden_layers} text layers",
                              ds)
        npos = _positive(_field(vc, "num_position_embeddings", int, where, 2304), "num_position_embeddings", where)
        if math.isqrt(npos) ** 2 != npos:
            raise ConfigError(f"{where}: num_position_embeddings {npos} is not a perfect square", npos)
        for key in ("patch_size", "spatial_merge_size", "temporal_patch_size"):
            _positive(_field(vc, key, int, where, 2 if key != "patch_size" else 16), key, where)
        vision = {k: v for k, v in vc.items() if k != "model_type"}
        return vision

    # ---- writing -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The HF config.json dict (loadable by transformers), with our `bard` section when present."""
        extra = dict(self.extra)
        text_extra = extra.pop("_text_config_extra", {})
        if self.arch == "qwen3":
            d = {**extra, "model_type": "qwen3", **self.text.to_hf(),
                 "tie_word_embeddings": self.text.tie_word_embeddings}
            d.setdefault("architectures", ["Qwen3ForCausalLM"])
        else:
            d = {**extra, "model_type": "qwen3_vl",
                 "text_config": {**text_extra, "model_type": "qwen3_vl_text", **self.text.to_hf()},
                 "vision_config": {"model_type": "qwen3_vl_vision", **(self.vision or {})},
                 "tie_word_embeddings": self.text.tie_word_embeddings,
                 "image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
                 "vision_start_token_id": self.vision_start_token_id,
                 "vision_end_token_id": self.vision_end_token_id}
            d.setdefault("architectures", ["Qwen3VLForConditionalGeneration"])
        if self.bard is not None:
            d["bard"] = {k: v for k, v in asdict(self.bard).items() if v is not None}
        return d


def out_of_vocabulary(ids, vocab_size: int) -> list:
    """The entries of `ids` that are not token ids of a vocabulary of `vocab_size` (ints in [0, vocab_size); a
    bool is not an id)."""
    return [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]


def resolve_source(model_dir: str | Path, source_model: str) -> tuple[Path | None, list[Path]]:
    """(the checkpoint a recorded `source_model` path names, or None; the places looked at). Relative paths are
    relative to the checkpoint directory that records them; checkpoints written before that recorded them
    relative to the training's working directory, which is looked at second."""
    recorded = Path(source_model)
    candidates = [recorded] if recorded.is_absolute() else [Path(model_dir) / recorded, recorded]
    return next((c for c in candidates if (c / "config.json").is_file()), None), candidates


def load_config(directory: str | Path, block_size: int | None = None, mask_token_id: int | None = None,
                prompt_attention: str | None = None) -> ModelConfig:
    """Read `directory/config.json` into a ModelConfig (a typed error names what is wrong). The overrides
    (None: the checkpoint's) fill an imported Bard-VL config's bard section, or replace those fields of ours, for
    one-off use (`bard-deploy import` writes them once)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json in {directory}", str(path))
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}", str(path)) from e
    config = ModelConfig.from_dict(raw, block_size, mask_token_id, prompt_attention)
    changes = {k: v for k, v in (("block_size", block_size), ("mask_token_id", mask_token_id),
                                 ("prompt_attention", prompt_attention)) if v is not None}
    if changes and isinstance(raw, dict) and raw.get("model_type") != "bard_vl":
        if config.bard is None:
            raise ConfigError(f"{directory} is an autoregressive checkpoint (no bard section): "
                              f"{', '.join(changes)} apply to BARD checkpoints", sorted(changes)[0])
        config = config.with_bard(**changes)
    return config
