"""The BARD recipe as data: progressive block merging (AR -> B4 -> B8 -> B16 [-> B32]), each stage initialised
from the previous one, and stage-wise distillation from the frozen B4 anchor for every stage above it.

A stage trains `steps` with the block-diffusion loss (CE at corrupted positions x min(1/t, cap)), then, above
the anchor, `distill_steps` with CE + lambda * top-k forward KL from the teacher, which sees the *same*
corrupted sequence under its own block-4 mask. `--ar-teacher` distils from the AR source instead (the paper's
ablation: it hurts); `--no-distill` skips the pass (the other ablation).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import tomllib
import torch

from bard_deploy.config import ModelConfig
from bard_deploy.converters.checkpoint import load_model, recover_dir
from bard_deploy.data.collate import TrainBatch, collate_diffusion
from bard_deploy.diffusion.loss import per_sample_mean, topk_kl, weighted_ce
from bard_deploy.diffusion.mask import CLEAN, NOISY, PROMPT, Layout, training_mask
from bard_deploy.diffusion.noise import corrupt
from bard_deploy.errors import ConfigError
from bard_deploy.train.loop import DistInfo, Schedule, Trainer, plot_losses, resolve_device, resolve_precision
from bard_deploy.vlm import BardVLM

ANCHOR_BLOCK = 4


@dataclass(frozen=True)
class Stage:
    name: str
    block_size: int
    steps: int
    lr: float = 1e-3
    warmup: int = 20
    batch_size: int = 32
    noise: str = "mask"
    distill_steps: int = 0           # stages above the anchor: the SWD pass
    distill_lr: float = 5e-4

    def check(self) -> Stage:
        if self.block_size <= 0 or self.steps < 0 or self.distill_steps < 0 or self.batch_size <= 0:
            raise ConfigError(f"stage {self.name}: block_size and batch_size must be > 0, steps >= 0", self)
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


# B8 is a stepping stone and gets the fewest steps, B16 (the stage that ships) the most after the anchor: over
# seeds 0-2 this split (B8 200 + 100, B16 400 + 250) took B16 from 93.5 to 94.7 % on average against
# 250 + 150 each, for ~30 s more; B8 itself fell 1.5 points.
DEFAULT_STAGES = (
    Stage("b4", 4, 1500, warmup=100),
    Stage("b8", 8, 200, distill_steps=100),
    Stage("b16", 16, 400, distill_steps=250),
)
DEFAULT_TRAIN_SAMPLES = 24000
# `bard-deploy train --preset NAME`: (stages, synthetic training samples); "default" is the recipe's own default.
PRESETS = {
    "default": (DEFAULT_STAGES, DEFAULT_TRAIN_SAMPLES),
    # about twice the default's steps and data, plus a B32 stage: ~26 min + the source on the 2-core dev box;
    # seeds 0-2 gave B4 99.0 / 99.0 / 94.5 %, B16 98.0 / 100.0 / 98.5 % against the source's 96.0 % (README)
    "quality": ((Stage("b4", 4, 3000, warmup=100),) + parse_stages("b8:8:400:200,b16:16:800:500,b32:32:400:250"),
                48000),
    "smoke": (parse_stages("b4:4:4,b8:8:2:2"), 64),
}


DISTILL_FIELDS = ("distill_lambda", "distill_topk", "distill_temperature", "ar_teacher", "no_distill")


@dataclass(frozen=True)
class Recipe:
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

    def check(self) -> Recipe:
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
        if self.shift_distill < 0:
            raise ConfigError(f"shift_distill must be >= 0, got {self.shift_distill}", self.shift_distill)
        if not 0 < self.t_min <= 1 or self.weight_cap < 1:
            raise ConfigError("t_min must be in (0, 1] and weight_cap >= 1", (self.t_min, self.weight_cap))
        for s in self.stages:
            s.check()
        resolve_precision(self.precision, torch.device("cpu"))     # the name only; the device is checked at use
        if self.strategy not in ("ddp", "fsdp"):
            raise ConfigError(f"strategy must be 'ddp' or 'fsdp', got {self.strategy!r}", self.strategy)
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / self.name

    def fingerprint(self, stage: Stage) -> str:
        """What determines a stage's weights: the recipe up to and including it."""
        upto = self.stages[:self.stages.index(stage) + 1]
        key = {**asdict(self), "stages": [asdict(s) for s in upto], "eval_samples": None, "eval_threshold": None,
               "out": None, "name": None}
        if len(upto) == 1:      # the anchor has no distillation pass: an ablation run reuses (a copy of) it
            key.update(dict.fromkeys(DISTILL_FIELDS))
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


# ---- losses -----------------------------------------------------------------------------------------------

def with_block_size(layout: Layout, block: int, prompt_attention: str) -> Layout:
    """The same packed tokens re-cut into blocks of `block` (the teacher's view): response blocks j // block,
    prompt blocks i // block under block-causal prompts."""
    kind = layout.kind
    resp = (kind == CLEAN) | (kind == NOISY)
    start = torch.where(kind == PROMPT, 1, 0).sum(1, keepdim=True)         # prompt length per sample
    new_block = torch.where(resp, (layout.index - start) // block, layout.block)
    if prompt_attention == "block":
        new_block = torch.where(kind == PROMPT, layout.index // block, new_block)
    return Layout(kind, new_block, layout.index)


@dataclass
class LossSetup:
    noise: str
    mask_id: int
    text_tokens: torch.Tensor
    t_min: float
    weight_cap: float
    prompt_attention: str
    teacher: BardVLM | None = None
    teacher_is_ar: bool = False
    distill_lambda: float = 0.5
    topk: int = 16
    temperature: float = 1.0
    shift_teacher: BardVLM | None = None     # the AR source, for the anchor's shift-distillation term
    shift_weight: float = 0.0
    stats: dict = field(default_factory=dict)


def bard_loss(setup: LossSetup) -> Callable:
    """loss_fn(model, batch, gens) -> per-sample losses, metrics (for the Trainer)."""

    def fn(model, batch: TrainBatch, gens):
        module = getattr(model, "module", model)
        c = corrupt(batch.input_ids, batch.layout, setup.noise, setup.mask_id, setup.text_tokens, setup.t_min, gens)
        h = model(c.input_ids, batch.position_ids, training_mask(batch.layout, setup.prompt_attention),
                  batch.pixel_values, batch.image_grid_thw)
        per_sample, metrics = weighted_ce(module, h, batch.input_ids, c.corrupted, c.t, batch.loss_mask,
                                          setup.weight_cap)
        rows, cols = c.corrupted.nonzero(as_tuple=True)
        scored = batch.loss_mask.sum(1).float()
        if setup.teacher is not None:
            with torch.no_grad():
                t_logits = teacher_logits(setup, batch, c.input_ids, rows, cols)
            s_logits = module.head(h[rows, cols])
            kl = topk_kl(s_logits, t_logits, setup.topk, setup.temperature)
            per_sample = per_sample + setup.distill_lambda * per_sample_mean(kl, rows, scored)
            metrics["kl"] = float(kl.detach().mean()) if kl.numel() else 0.0
        if setup.shift_teacher is not None:
            with torch.no_grad():
                target = ar_hidden_before(setup.shift_teacher, batch, rows, cols)
            gap = 1 - torch.nn.functional.cosine_similarity(h[rows, cols], target, dim=-1)
            per_sample = per_sample + setup.shift_weight * per_sample_mean(gap, rows, scored)
            metrics["shift"] = float(gap.detach().mean()) if gap.numel() else 0.0
        return per_sample, metrics

    return fn


def teacher_logits(setup: LossSetup, batch: TrainBatch, noisy_ids: torch.Tensor, rows: torch.Tensor,
                   cols: torch.Tensor) -> torch.Tensor:
    """The teacher's logits for the corrupted positions (rows, cols) of the packed batch.

    B4 anchor: the same corrupted sequence under the block-4 mask, read at the same positions (no shift).
    AR source (ablation): the clean prefix, causally; the token at response offset j is read from the logits
    of the position before it (its clean twin's predecessor).
    """
    t = setup.teacher
    if not setup.teacher_is_ar:
        lay = with_block_size(batch.layout, ANCHOR_BLOCK, setup.prompt_attention)
        h = t(noisy_ids, batch.position_ids, training_mask(lay, setup.prompt_attention), batch.pixel_values,
              batch.image_grid_thw)
        return t.head(h[rows, cols])
    return t.head(ar_hidden_before(t, batch, rows, cols))


def ar_hidden_before(ar: BardVLM, batch: TrainBatch, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The AR model's final hidden states that predict the tokens at noisy positions (rows, cols): the clean
    prefix read causally (the noisy copy cut off), at the position before each one's clean twin."""
    lay = batch.layout
    R = (lay.kind == NOISY).sum(1)
    # only [prompt | clean response] is read, as one causal prompt: cut the columns after the longest such prefix
    clean = (lay.kind == PROMPT) | (lay.kind == CLEAN)
    width = int(clean.sum(1).max())
    lay = lay[:width]
    causal = Layout(torch.where(clean[:, :width], PROMPT, 0), lay.block, lay.index)
    h = ar(batch.input_ids[:, :width], batch.position_ids[..., :width], training_mask(causal, "causal"),
           batch.pixel_values, batch.image_grid_thw)
    # noisy position (row, col) -> its clean twin col - R -> the position before it
    return h[rows, cols - R[rows] - 1]


# ---- the recipe ---------------------------------------------------------------------------------------------

def text_token_ids(tokenizer) -> torch.Tensor:
    """Ids a `mix` replacement may draw: every token but the special ones (chat, vision, mask, pad, ...)."""
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return torch.tensor([i for i in range(len(tokenizer)) if i not in special])


def stage_config(base: ModelConfig, recipe: Recipe, stage: Stage, parent: str, source: str, mask_id: int,
                 data_hash: str) -> ModelConfig:
    return base.with_bard(mask_token_id=mask_id, block_size=stage.block_size,
                          prompt_attention=recipe.prompt_attention, noise=stage.noise, source_model=source,
                          stage=stage.name, parent=parent, data_hash=data_hash)


def is_done(directory: Path, fingerprint: str) -> bool:
    recover_dir(directory)
    marker = directory / "build.json"
    return marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fingerprint


def train_stage(recipe: Recipe, stage: Stage, parent_dir: Path, source_dir: Path, examples, tokenizer, data_hash: str,
                resume: bool, dist_info: DistInfo, progress: bool, log, save: Callable) -> Path:
    """One PBM stage (+ its SWD pass): initialise from `parent_dir`, train, save `run_dir/<stage>`."""
    out = recipe.run_dir / stage.name
    fingerprint = recipe.fingerprint(stage)
    if resume and is_done(out, fingerprint):
        log(f"{stage.name}: done already ({out})")
        return out
    device = resolve_device(recipe.device)
    model = load_model(parent_dir).train()
    model.language_model.checkpoint_layers = recipe.activation_checkpointing
    mask_id = tokenizer.convert_tokens_to_ids("<|mask|>")
    cfg = stage_config(model.config, recipe, stage, parent_dir.name, str(source_dir), mask_id, data_hash)
    model.config = cfg

    def collate(ex):
        return collate_diffusion(ex, cfg, stage.block_size, tokenizer.pad_token_id, tokenizer.eos_token_id,
                                 recipe.prompt_attention)

    setup = LossSetup(stage.noise, mask_id, text_token_ids(tokenizer), recipe.t_min, recipe.weight_cap,
                      recipe.prompt_attention, distill_lambda=recipe.distill_lambda, topk=recipe.distill_topk,
                      temperature=recipe.distill_temperature)
    work = recipe.run_dir / ".work" / stage.name
    if stage is recipe.stages[0] and recipe.shift_distill > 0:
        setup.shift_teacher = load_model(source_dir).eval().requires_grad_(False).to(device)
        setup.shift_weight = recipe.shift_distill
        log(f"{stage.name}: shift-distillation from the AR source, weight {recipe.shift_distill}")
    passes = [("pbm", stage.steps, stage.lr, None)]
    if stage.block_size > ANCHOR_BLOCK and stage.distill_steps and not recipe.no_distill:
        teacher_dir = source_dir if recipe.ar_teacher else recipe.run_dir / recipe.stages[0].name
        passes.append(("swd", stage.distill_steps, stage.distill_lr, teacher_dir))
    t0 = time.perf_counter()
    history = {}
    for kind, steps, lr, teacher_dir in passes:
        if steps == 0:
            continue
        s = replace(setup)
        if teacher_dir is not None:
            s.teacher = load_model(teacher_dir).eval().requires_grad_(False).to(device)
            s.teacher_is_ar = recipe.ar_teacher
            log(f"{stage.name}: distilling from {'the AR source' if recipe.ar_teacher else 'the B4 anchor'} "
                f"({teacher_dir})")
        sched = Schedule(steps=steps, lr=lr, batch_size=stage.batch_size, micro_batch=recipe.micro_batch,
                         warmup=min(stage.warmup, steps // 5))
        trainer = Trainer(model, sched, examples, collate, bard_loss(s), work / kind, seed=recipe.seed,
                          save_every=50, label=f"{stage.name} {kind}", dist_info=dist_info, progress=progress,
                          device=device, precision=recipe.precision, strategy=recipe.strategy,
                          length=lambda ex: ex.num_tokens, fingerprint=f"{fingerprint}:{kind}")
        history[kind] = trainer.run(resume=resume)
        model = trainer.unsharded_model()
        if dist_info.main:
            plot_losses(trainer.metrics_path, work / kind / "loss.png", f"{stage.name} {kind} loss")
    model.cpu()
    if not dist_info.main:
        return out
    copies = [p for kind in history for p in (work / kind / "metrics.jsonl", work / kind / "loss.png")]
    renamed = []
    for p in copies:                                    # metrics-pbm.jsonl, loss-swd.png, ...
        target = p.with_name(f"{p.stem}-{p.parent.name}{p.suffix}")
        p.replace(target)
        renamed.append(target)
    build = {"fingerprint": fingerprint, "stage": asdict(stage), "train_seconds": round(time.perf_counter() - t0, 1),
             "final_loss": {k: v[-1]["loss"] for k, v in history.items() if v}}
    save(model, out, cfg, {"build.json": build}, renamed)
    shutil.rmtree(work, ignore_errors=True)          # the stage is saved: its resume state is obsolete
    log(f"{stage.name}: saved {out} ({build['train_seconds']} s)")
    return out
