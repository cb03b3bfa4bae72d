"""Running one stage of the recipe: initialise from the parent checkpoint, train its passes (PBM, then above the
anchor SWD), save `run_dir/<stage>` with its metrics, loss plots and `build.json`.

A stage whose directory holds a `build.json` with the same fingerprint is reused as it is (`--resume`); a killed
stage continues from its `run_dir/.work/<stage>/<pass>` trainer state, which is removed once the stage is saved.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bard_deploy.atomic import built_fingerprint
from bard_deploy.checkpoint import load_model, save_model
from bard_deploy.config import ModelConfig
from bard_deploy.data.chat import Example
from bard_deploy.data.collate import collate_diffusion
from bard_deploy.devices import resolve_device
from bard_deploy.train.loop import DistInfo, Schedule, Trainer, plot_losses
from bard_deploy.train.objective import LossSetup, bard_loss, text_token_ids
from bard_deploy.train.recipe import ANCHOR_BLOCK, Recipe, Stage
from bard_deploy.vlm import BardVLM


@dataclass(frozen=True)
class StageContext:
    """What every stage of one run shares: the recipe, the AR source, the encoded data and how to run."""

    recipe: Recipe
    source_dir: Path                 # the AR source: the ablation's teacher and the donor of tokenizer files
    examples: Sequence[Example]
    tokenizer: Any                   # the source's HF tokenizer (it has the <|mask|> token)
    data_hash: str                   # recorded in every stage's config
    resume: bool
    dist_info: DistInfo
    progress: bool
    log: Callable[..., None]         # already silent on every process but the main one

    def stage_dir(self, stage: Stage) -> Path:
        """Where `stage`'s checkpoint goes."""
        return self.recipe.run_dir / stage.name

    def work_dir(self, stage: Stage) -> Path:
        """`stage`'s resume state (one trainer directory per pass) until the stage is saved."""
        return self.recipe.run_dir / ".work" / stage.name


@dataclass(frozen=True)
class Pass:
    """One training pass of a stage: `kind` "pbm" (block-diffusion loss) or "swd" (+ KL from `teacher_dir`)."""

    kind: str
    steps: int
    lr: float
    teacher_dir: Path | None = None


def stage_config(base: ModelConfig, recipe: Recipe, stage: Stage, parent: str, source: str, mask_id: int,
                 data_hash: str) -> ModelConfig:
    """`base` (the parent's config) as the BARD config of `stage`, with its lineage (parent, source, data)."""
    return base.with_bard(mask_token_id=mask_id, block_size=stage.block_size,
                          prompt_attention=recipe.prompt_attention, noise=stage.noise, source_model=source,
                          stage=stage.name, parent=parent, data_hash=data_hash, dual_mode=recipe.dual_mode,
                          mix_keep_weight=recipe.mix_keep_weight if stage.noise == "mix" else None)


def train_stage(ctx: StageContext, stage: Stage, parent_dir: Path) -> Path:
    """One PBM stage (+ its SWD pass): initialise from `parent_dir`, train, save `run_dir/<stage>`; returns it."""
    recipe, out = ctx.recipe, ctx.stage_dir(stage)
    built, fingerprint = built_fingerprint(out), recipe.fingerprint(stage)
    if ctx.resume and built == fingerprint:
        ctx.log(f"{stage.name}: done already ({out})")
        return out
    if built is not None:        # say so: another seed or recipe under the same --out / --name replaces it
        ctx.log(f"{stage.name}: replacing {out}, a build of " + (
            "this recipe (--fresh)" if built == fingerprint else
            f"another recipe (fingerprint {built}, this one {fingerprint}; give --name to keep both)"))
    device = resolve_device(recipe.device)
    model = load_model(parent_dir).train()
    model.language_model.checkpoint_layers = recipe.activation_checkpointing
    mask_id = ctx.tokenizer.convert_tokens_to_ids("<|mask|>")
    # the source is recorded relative to the checkpoint (bench finds it from any working directory)
    source = os.path.relpath(Path(ctx.source_dir).resolve(), out.resolve())
    model.config = stage_config(model.config, recipe, stage, parent_dir.name, source, mask_id,
                                ctx.data_hash)
    setup = stage_loss_setup(ctx, stage, mask_id, device)
    t0 = time.perf_counter()
    model, history = run_passes(ctx, stage, model, setup, device)
    model.cpu()
    if ctx.dist_info.main:                  # the other processes trained their share; the main one saves
        save_stage(ctx, stage, model, history, time.perf_counter() - t0)
    return out


def stage_passes(recipe: Recipe, stage: Stage, source_dir: Path) -> list[Pass]:
    """The passes `stage` trains, in order, leaving out those of 0 steps: PBM, then (above the anchor, unless
    `no_distill`) SWD from the B4 anchor, or from the AR source under `ar_teacher`."""
    passes = [Pass("pbm", stage.steps, stage.lr)]
    if stage.block_size > ANCHOR_BLOCK and stage.distill_steps and not recipe.no_distill:
        teacher_dir = source_dir if recipe.ar_teacher else recipe.run_dir / recipe.stages[0].name
        passes.append(Pass("swd", stage.distill_steps, stage.distill_lr, teacher_dir))
    return [p for p in passes if p.steps]


def frozen_model(directory: Path, device: torch.device) -> BardVLM:
    """A checkpoint loaded as a teacher: eval mode, no gradients, on `device`."""
    return load_model(directory).eval().requires_grad_(False).to(device)


def stage_loss_setup(ctx: StageContext, stage: Stage, mask_id: int, device: torch.device) -> LossSetup:
    """The loss every pass of `stage` starts from; the anchor adds shift-distillation when the recipe asks."""
    r = ctx.recipe
    setup = LossSetup(stage.noise, mask_id, text_token_ids(ctx.tokenizer), r.t_min, r.weight_cap,
                      r.prompt_attention, distill_lambda=r.distill_lambda, topk=r.distill_topk,
                      temperature=r.distill_temperature, ar_weight=r.dual_mode_weight if r.dual_mode else 0.0,
                      keep_weight=r.mix_keep_weight)
    if stage is not r.stages[0] or r.shift_distill <= 0:
        return setup
    setup = replace(setup, shift_teacher=frozen_model(ctx.source_dir, device), shift_weight=r.shift_distill)
    ctx.log(f"{stage.name}: shift-distillation from the AR source, weight {r.shift_distill}")
    return setup


def pass_loss_setup(ctx: StageContext, stage: Stage, setup: LossSetup, p: Pass, device: torch.device) -> LossSetup:
    """`setup` with the teacher of pass `p` (an SWD pass) loaded; unchanged for a PBM pass."""
    if p.teacher_dir is None:
        return setup
    teacher = frozen_model(p.teacher_dir, device)
    ctx.log(f"{stage.name}: distilling from {'the AR source' if ctx.recipe.ar_teacher else 'the B4 anchor'} "
            f"({p.teacher_dir})")
    return replace(setup, teacher=teacher, teacher_is_ar=ctx.recipe.ar_teacher)


def run_passes(ctx: StageContext, stage: Stage, model: BardVLM, setup: LossSetup,
               device: torch.device) -> tuple[BardVLM, dict[str, list[dict]]]:
    """Train every pass of `stage` in turn, each from the previous one's weights; returns the trained model and
    each pass's metric rows (pass kind -> rows). The main process plots each pass's loss curve."""
    history = {}
    for p in stage_passes(ctx.recipe, stage, ctx.source_dir):
        trainer = pass_trainer(ctx, stage, model, pass_loss_setup(ctx, stage, setup, p, device), p, device)
        history[p.kind] = trainer.run(resume=ctx.resume)
        model = trainer.final_model()
        if ctx.dist_info.main:
            plot_losses(trainer.metrics_path, trainer.work / "loss.png", f"{stage.name} {p.kind} loss")
    return model, history


def pass_trainer(ctx: StageContext, stage: Stage, model: BardVLM, setup: LossSetup, p: Pass,
                 device: torch.device) -> Trainer:
    """The Trainer of pass `p`: length-grouped micro-batches of diffusion-collated samples, its state in
    `work_dir/<kind>` under the stage's fingerprint (a resumed state of another recipe is refused)."""
    r, cfg, tok = ctx.recipe, model.config, ctx.tokenizer

    def collate(ex):
        return collate_diffusion(ex, cfg, stage.block_size, tok.pad_token_id, tok.eos_token_id, r.prompt_attention)

    sched = Schedule(steps=p.steps, lr=p.lr, batch_size=stage.batch_size, micro_batch=r.micro_batch,
                     warmup=min(stage.warmup, p.steps // 5), weight_decay=stage.weight_decay,
                     ema_decay=stage.ema_decay)
    return Trainer(model, sched, ctx.examples, collate, bard_loss(setup), ctx.work_dir(stage) / p.kind, seed=r.seed,
                   save_every=50, label=f"{stage.name} {p.kind}", dist_info=ctx.dist_info, progress=ctx.progress,
                   device=device, precision=r.precision, strategy=r.strategy, length=lambda ex: ex.num_tokens,
                   fingerprint=f"{r.fingerprint(stage)}:{p.kind}")


def pass_files(work: Path, kinds: Sequence[str]) -> list[Path]:
    """Each pass's metrics and loss plot, renamed after the pass (metrics-pbm.jsonl, loss-swd.png, ...) so that
    the passes' files can sit side by side in the stage's checkpoint."""
    renamed = []
    for p in (work / kind / name for kind in kinds for name in ("metrics.jsonl", "loss.png")):
        target = p.with_name(f"{p.stem}-{p.parent.name}{p.suffix}")
        p.replace(target)
        renamed.append(target)
    return renamed


def save_stage(ctx: StageContext, stage: Stage, model: BardVLM, history: dict[str, list[dict]],
               seconds: float) -> None:
    """Write `stage`'s checkpoint with its metrics, plots and `build.json` (the fingerprint `train_stage` reuses
    it by), then drop its resume state."""
    out, work = ctx.stage_dir(stage), ctx.work_dir(stage)
    build = {"fingerprint": ctx.recipe.fingerprint(stage), "stage": asdict(stage), "train_seconds": round(seconds, 1),
             "final_loss": {k: v[-1]["loss"] for k, v in history.items() if v}}
    save_stage_checkpoint(model, out, ctx.source_dir, {"build.json": build}, pass_files(work, list(history)))
    shutil.rmtree(work, ignore_errors=True)          # the stage is saved: its resume state is obsolete
    ctx.log(f"{stage.name}: saved {out} ({build['train_seconds']} s)")


def save_stage_checkpoint(model: BardVLM, directory: Path, source_dir: Path, extra: dict[str, dict],
                          copies: Sequence[Path]) -> None:
    """Save a stage checkpoint: it carries the source's tokenizer / processor files and its
    generation_config.json, so that every stage loads and decodes on its own."""
    gen = source_dir / "generation_config.json"
    extra = dict(extra)
    if gen.is_file():
        extra["generation_config.json"] = json.loads(gen.read_text())
    save_model(model, directory, config=model.config, side_files_from=source_dir, extra_files=extra,
               copy_files=list(copies))
