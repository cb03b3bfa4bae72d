"""The BARD recipe as data: progressive block merging (AR -> B4 -> B8 -> B16 [-> B32]), each stage initialised
from the previous one, and stage-wise distillation from the frozen B4 anchor for every stage above it.

A stage trains `steps` with the block-diffusion loss (CE at corrupted positions x min(1/t, cap)), then, above
the anchor, `distill_steps` with CE + lambda * top-k forward KL from the teacher, which sees the *same*
corrupted sequence under its own block-4 mask. `--ar-teacher` distils from the AR source instead (the paper's
ablation: it hurts); `--no-distill` skips the pass (the other ablation).

This module is the recipe as data only: the loss is `train.objective`, running the stages `train.stages`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import tomllib
import torch

from bard_deploy.errors import ConfigError
from bard_deploy.train.loop import resolve_precision

ANCHOR_BLOCK = 4      # the first stage's block size, and the teacher of every stage above it


@dataclass(frozen=True)
class Stage:
    """One PBM stage: `steps` of the block-diffusion loss at `block_size`, then `distill_steps` of SWD."""

    name: str
    block_size: int
    steps: int
    lr: float = 1e-3
    warmup: int = 20
    batch_size: int = 32
    noise: str = "mask"
    distill_steps: int = 0           # stages above the anchor: the SWD pass
    distill_lr: float = 5e-4
    weight_decay: float = 0.0        # AdamW's, on matrices (as the source's), in both passes
    ema_decay: float = 0.0           # each pass ends on an exponential moving average of its weights (0 = none)

    def check(self) -> Stage:
        """The stage itself, or a ConfigError naming the first bad field."""
        if self.block_size <= 0 or self.steps < 0 or self.distill_steps < 0 or self.batch_size <= 0:
            raise ConfigError(f"stage {self.name}: block_size and batch_size must be > 0, steps >= 0", self)
        if not self.weight_decay >= 0:
            raise ConfigError(f"stage {self.name}: weight_decay must be >= 0, got {self.weight_decay}",
                              self.weight_decay)
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"stage {self.name}: ema_decay must be in [0, 1), got {self.ema_decay}", self.ema_decay)
        if self.noise not in ("mask", "mix"):
            raise ConfigError(f"stage {self.name}: noise must be 'mask' or 'mix', got {self.noise!r}", self.noise)
        return self


def parse_stages(spec: str) -> tuple[Stage, ...]:
    """`name:block:steps[:distill_steps]` comma-separated, e.g. "b4:4:300,b8:8:150:100"."""
    stages = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        if len(parts) not in (3, 4) or not all(p.isdigit() for p in parts[1:]):
            raise ConfigError(f"stage spec {item!r} is not name:block:steps[:distill_steps]", item)
        stages.append(Stage(parts[0], int(parts[1]), int(parts[2]), distill_steps=int(parts[3]) if len(parts) == 4
                            else 0).check())
    return tuple(stages)


# Every stage is twice as long as it was until 2026-12-07 (now `--preset fast`): paired on the same sources, seeds
# 0-4 at torch threads 1 and 2 (Intel Xeon VM, 1 000 test prompts), B16 gained 0.9 to 5.0 points on every one of the
# ten cells and ended within 1 point of its source on 9 of 10 (fast: 3 of 10). B8 / B16 keep the "where" answers
# the short stages lose (README "Parts 5-8"). The price is time: 32 min 18 s with the source, alone at threads 2 on
# the 2-core dev VM, against ~17.5 min for fast (the 15-minute budget is missed by both).
# B8 is a stepping stone and gets the fewest steps, B16 (the stage that ships) the most after the anchor (at half
# these lengths, over seeds 0-2, B8 200 + 100 / B16 400 + 250 gave B16 94.7 % against 93.5 % for 250 + 150 each).
# The stages above the anchor use mix noise with the keep loss (Recipe.mix_keep_weight 1.0): against mask noise
# from the same B4 anchor, B16 at tau 0.9 gained 1.5 points on each of seeds 0 / 1 / 2 (98.0 -> 99.5, 90.5 -> 92.0,
# 91.0 -> 92.5 %, README), and only such a checkpoint can use token revision (a mask-noise one rewrites two thirds
# of the right tokens). The quality preset below was measured with mask noise and keeps it.
DEFAULT_STAGES = (
    Stage("b4", 4, 3000, warmup=100),
    Stage("b8", 8, 400, distill_steps=200, noise="mix"),
    Stage("b16", 16, 800, distill_steps=500, noise="mix"),
)
# the default until 2026-12-07: half the stage steps; ~25 min with the source (AMD VM), B16 1.5-1.8 points under it
# on average (README Parts 6-8)
FAST_STAGES = (
    Stage("b4", 4, 1500, warmup=100),
    Stage("b8", 8, 200, distill_steps=100, noise="mix"),
    Stage("b16", 16, 400, distill_steps=250, noise="mix"),
)
DEFAULT_TRAIN_SAMPLES = 24000
# `bard-deploy train --preset NAME`: (stages, synthetic training samples); "default" is the recipe's own default.
PRESETS = {
    "default": (DEFAULT_STAGES, DEFAULT_TRAIN_SAMPLES),
    "fast": (FAST_STAGES, DEFAULT_TRAIN_SAMPLES),
    # the default's step counts with mask noise, plus a B32 stage and twice the data: ~26 min + the source on the
    # 2-core dev box (2026-11-28); seeds 0-2 gave B4 99.0 / 99.0 / 94.5 %, B16 98.0 / 100.0 / 98.5 % against the
    # source's 96.0 % (README)
    "quality": ((Stage("b4", 4, 3000, warmup=100),) + parse_stages("b8:8:400:200,b16:16:800:500,b32:32:400:250"),
                48000),
    "smoke": (parse_stages("b4:4:4,b8:8:2:2"), 64),
}


DISTILL_FIELDS = ("distill_lambda", "distill_topk", "distill_temperature", "ar_teacher", "no_distill")


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a run: the source, the data, the stages and the loss and device settings."""

    name: str = "default"
    out: str = "runs"
    source: str | None = None               # AR source checkpoint; None = the embedded default (built on demand)
    data: str | None = None                 # chat JSONL file/dir; None = the synthetic task
    image_root: str | None = None
    train_samples: int = DEFAULT_TRAIN_SAMPLES   # synthetic samples (ignored with --data)
    stages: tuple[Stage, ...] = DEFAULT_STAGES
    prompt_attention: str = "causal"
    t_min: float = 0.05
    weight_cap: float = 20.0
    distill_lambda: float = 0.5
    distill_topk: int = 16
    distill_temperature: float = 1.0
    ar_teacher: bool = False
    no_distill: bool = False
    # anchor stage only (experimental, off by default): + weight x (1 - cos) between a masked position's final
    # hidden state and the AR source's one position earlier, which predicts the same token (the head is shared)
    shift_distill: float = 0.0
    # dual mode: + weight x next-token CE on the clean response (its causal view) in every BARD pass, so the
    # checkpoint also decodes causally and can verify its own drafts (speculative="self")
    dual_mode: bool = False
    dual_mode_weight: float = 1.0
    # mix noise: + weight x CE at the noisy positions the noise left unchanged (0 = the reference: the loss only
    # where the input differs from the target, so a visible token is always "wrong" to the model and token
    # revision rewrites right tokens; > 0 teaches it to keep them, what revision needs)
    mix_keep_weight: float = 1.0
    micro_batch: int = 16                   # samples per forward, grouped by length (0 = the whole batch)
    activation_checkpointing: bool = False
    device: str = "auto"                    # auto = CUDA when present (LOCAL_RANK under torchrun), else CPU
    precision: str = "auto"                 # auto = bf16 autocast on CUDA, fp32 on CPU
    strategy: str = "ddp"                   # under torchrun: ddp (replicas) or fsdp (FSDP2 shards, large models)
    max_len: int = 1024
    seed: int = 0
    eval_samples: int = 200
    eval_threshold: float = 0.9
    on_error: str = "skip"
    # --data: one row in `hold_out_every` (by a hash of its line) is held out for the results table (0 = none)
    hold_out_every: int = 20
    # --data: refuse the data when more of its text tokens than this are the tokenizer's unknown token
    max_unknown_rate: float = 0.01

    def check(self) -> Recipe:
        """The recipe itself, or a ConfigError naming the first bad setting (the stages included)."""
        if not self.stages:
            raise ConfigError("the recipe has no stages", self.stages)
        if self.stages[0].block_size != ANCHOR_BLOCK:
            raise ConfigError(f"the first stage is the B{ANCHOR_BLOCK} anchor; got block size "
                              f"{self.stages[0].block_size}", self.stages[0].block_size)
        blocks = [s.block_size for s in self.stages]
        if blocks != sorted(set(blocks)) or any(b % ANCHOR_BLOCK for b in blocks):
            raise ConfigError(f"stage block sizes must grow and be multiples of {ANCHOR_BLOCK}: {blocks}", blocks)
        if self.prompt_attention not in ("causal", "block"):
            raise ConfigError(f"prompt_attention must be 'causal' or 'block', got {self.prompt_attention!r}",
                              self.prompt_attention)
        if not self.dual_mode_weight >= 0:
            raise ConfigError(f"dual_mode_weight must be >= 0, got {self.dual_mode_weight}", self.dual_mode_weight)
        if not self.mix_keep_weight >= 0:
            raise ConfigError(f"mix_keep_weight must be >= 0, got {self.mix_keep_weight}", self.mix_keep_weight)
        if self.shift_distill < 0:
            raise ConfigError(f"shift_distill must be >= 0, got {self.shift_distill}", self.shift_distill)
        if not 0 < self.t_min <= 1 or self.weight_cap < 1:
            raise ConfigError("t_min must be in (0, 1] and weight_cap >= 1", (self.t_min, self.weight_cap))
        for s in self.stages:
            s.check()
        resolve_precision(self.precision, torch.device("cpu"))     # the name only; the device is checked at use
        if not 0 <= self.max_unknown_rate <= 1:
            raise ConfigError(f"max_unknown_rate must be in [0, 1], got {self.max_unknown_rate}", self.max_unknown_rate)
        if isinstance(self.hold_out_every, bool) or not isinstance(self.hold_out_every, int) or \
                self.hold_out_every < 0 or self.hold_out_every == 1:
            raise ConfigError(f"hold_out_every must be 0 (no held-out split) or an integer >= 2, got "
                              f"{self.hold_out_every!r}", self.hold_out_every)
        if self.strategy not in ("ddp", "fsdp"):
            raise ConfigError(f"strategy must be 'ddp' or 'fsdp', got {self.strategy!r}", self.strategy)
        return self

    @property
    def run_dir(self) -> Path:
        """Where the stages' checkpoints go: `out/name/<stage>`."""
        return Path(self.out) / self.name

    def fingerprint(self, stage: Stage) -> str:
        """What determines a stage's weights: the recipe up to and including it."""
        upto = self.stages[:self.stages.index(stage) + 1]
        # a stage field added later is left out at its old value (the fingerprints of earlier runs stay)
        stages = [{k: v for k, v in asdict(s).items() if (k, v) not in (("weight_decay", 0.0), ("ema_decay", 0.0))}
                  for s in upto]
        key = {**asdict(self), "stages": stages, "eval_samples": None, "eval_threshold": None,
               "out": None, "name": None, "max_unknown_rate": None}
        if len(upto) == 1:      # the anchor has no distillation pass: an ablation run reuses (a copy of) it
            key.update(dict.fromkeys(DISTILL_FIELDS))
        if all(s.noise == "mask" for s in upto) or self.mix_keep_weight == 0:
            del key["mix_keep_weight"]      # no effect on these weights (and the fingerprints of earlier runs stay)
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_recipe(path: str | Path | None, **overrides) -> Recipe:
    """A Recipe from a TOML file (top-level keys + [[stages]] tables), then CLI overrides (None = not given)."""
    data: dict = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"recipe {path}: {e}", str(path)) from e
    known = {f.name for f in fields(Recipe)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"recipe {path}: unknown key '{sorted(unknown)[0]}'", sorted(unknown)[0])
    if "stages" in data:
        try:
            data["stages"] = tuple(Stage(**s).check() for s in data["stages"])
        except TypeError as e:
            raise ConfigError(f"recipe {path}: bad stage ({e})", data["stages"]) from e
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Recipe(**data).check()
    except TypeError as e:
        raise ConfigError(f"recipe: {e}", data) from e


def recipe_from_cli(recipe_path: Path | None, preset: str, stages: str | None, given: dict) -> Recipe:
    """The recipe of `bard-deploy train`: a TOML recipe or a preset, then the options the user gave.

    `given` maps Recipe field names to the values given on the command line (None = not given). Without a TOML
    recipe the preset's stages and training samples apply unless `stages` / `train_samples` are given; with one,
    its own stages apply unless `stages` is given (the preset then only has to be a known name).
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})", preset)
    preset_stages, preset_samples = PRESETS[preset]
    overrides = {k: v for k, v in given.items() if v is not None}
    if stages:
        overrides["stages"] = parse_stages(stages)
    elif recipe_path is None:
        overrides["stages"] = preset_stages
    if recipe_path is None and not overrides.get("train_samples"):    # 0, like None, means the preset's
        overrides["train_samples"] = preset_samples
    return load_recipe(recipe_path, **overrides)
