"""The embedded default's source model: a tiny Qwen3-VL-architecture AR model trained with next-token loss on the
synthetic task, the stand-in for a real pretrained Qwen3-VL. Built on demand and cached: a finished build
leaves `build.json` in its checkpoint directory, and a later call with the same recipe reuses it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bard_deploy.atomic import is_built
from bard_deploy.data.chat import Example, encode_example
from bard_deploy.data.collate import collate_ar
from bard_deploy.data.synthetic import samples
from bard_deploy.data.tokenizer import build_image_processor, build_tokenizer
from bard_deploy.diffusion.loss import next_token_ce
from bard_deploy.diffusion.mask import training_mask
from bard_deploy.embedded import embedded_config, save_checkpoint
from bard_deploy.prompting import PromptEncoder
from bard_deploy.train.loop import DistInfo, Schedule, Trainer, plot_losses
from bard_deploy.vlm import BardVLM

DATA_VERSION = "synthetic-v2"   # bump when the generator's output changes


@dataclass(frozen=True)
class SourceRecipe:
    """Everything that determines a source-model build: data size, schedule, model size and seeds."""

    train_samples: int = 8000
    # 1500 steps without weight decay left the source between 75.5 and 87.5 % on 2 seeds x 2 CPUs (word reading
    # learnt or not by the end: 5/22 to 22/22); 3000 steps with weight decay 0.1 gave 98.5 % on seed 0 (README)
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3         # 1.5e-3 and above: training is unstable and exact match swings from 45 to 85 %
    warmup: int = 100
    vision_lr_ratio: float = 0.5
    # std of the ViT's learned position embedding at init. HF's 0.02 leaves an object's grid cell barely
    # decodable from its image token (linear probe: 40 %) and "where is X" unlearnable in the budget; 0.3 makes
    # it decodable (100 %); 1.0 drowns the content (reading collapses).
    vision_pos_std: float = 0.3
    # initial value of the LM's per-head query / key RMSNorm gains (Qwen3's QK norm). With unit gains a head's
    # attention logit is at most sqrt(head_dim) x gain^2: 5.7 at this model's head_dim 32 (11.3 at Qwen3's 128),
    # and training left the gains at 0.9-1.2. 1.0 is HF's init; 1.5 made "where" worse (README), so it stays.
    qk_norm_init: float = 1.0
    weight_decay: float = 0.1  # AdamW's, on matrices (not norms, biases, embeddings): reading is learnt sooner
    ema_decay: float = 0.0     # build from an exponential moving average of the weights (train.loop.Schedule)
    decay_share: float = 1.0   # the last share of the steps the lr decays over (1.0: cosine over all; Schedule)
    seed: int = 0
    task_weights: dict[str, float] | None = None   # the training mix of question types (None: uniform)
    object_weights: tuple[float, ...] | None = None  # ... and of 1 / 2 / 3 / 4 objects per picture (None: uniform)
    color_share: float = 0.0  # ... and of same-coloured twins of another form (data/synthetic.make_sample)
    kv_heads: int = 2        # the LM's key / value heads (of 4 query heads; 4 = plain multi-head attention)
    hidden: int = 128
    layers: int = 4
    vision_depth: int = 2
    vision_hidden: int = 64
    max_len: int = 256

    def fingerprint(self) -> str:
        """16-hex hash of the recipe and DATA_VERSION: a cached build or a training state is reused
        only when it matches."""
        # fields added later leave the fingerprints of earlier builds as they were at their old values
        key = {k: v for k, v in asdict(self).items() if (k, v) not in (
            ("task_weights", None), ("vision_hidden", 64), ("qk_norm_init", 1.0), ("object_weights", None),
            ("kv_heads", 2), ("color_share", 0.0), ("ema_decay", 0.0), ("decay_share", 1.0))}
        return hashlib.sha256(json.dumps([key, DATA_VERSION], sort_keys=True).encode()).hexdigest()[:16]


def data_hash(split: str, n: int) -> str:
    """16-hex id of the synthetic data (generator version, split, sample count: the data is a pure function of
    them), recorded as provenance in the checkpoint."""
    return hashlib.sha256(f"{DATA_VERSION}:{split}:{n}".encode()).hexdigest()[:16]


def synthetic_examples(encoder: PromptEncoder, split: str, n: int, max_len: int, **mix) -> list[Example]:
    """The first n samples of a synthetic split, encoded as Examples (source "split:seed"); `mix` is the
    training mix `data.synthetic.samples` takes (task_weights, object_weights, color_share)."""
    return [encode_example(encoder, s.messages(), max_len, source=f"{split}:{s.seed}")
            for s in samples(split, n, **mix)]


def make_encoder(tokenizer, processor, cfg) -> PromptEncoder:
    """The PromptEncoder of a tokenizer and image processor for a model config (its image token id and merge size)."""
    return PromptEncoder(tokenizer, processor, cfg.image_token_id, cfg.spatial_merge_size)


def ar_loss(model, batch, gens):
    """Per-sample next-token CE of the response (the generators are unused: AR training has no noise)."""
    h = model(batch.input_ids, batch.position_ids, training_mask(batch.layout, "causal"), batch.pixel_values,
              batch.image_grid_thw)
    return next_token_ce(getattr(model, "module", model), h, batch.input_ids, batch.loss_mask)


def build_source(directory: str | Path, recipe: SourceRecipe = SourceRecipe(), resume: bool = True,
                 progress: bool = True, dist_info: DistInfo | None = None, log=print, device: str = "cpu",
                 precision: str = "fp32", strategy: str = "ddp", on_step=None) -> Path:
    """Train (or reuse) the source model into `directory`; returns it. `on_step(trainer)` runs after every
    optimizer step of a build (probes use it to keep weight averages or snapshots)."""
    directory = Path(directory)
    dist_info = dist_info or DistInfo()
    if is_built(directory, recipe.fingerprint()):
        log(f"source model: reusing {directory}")
        return directory
    torch.manual_seed(recipe.seed)
    tokenizer, processor = build_tokenizer(), build_image_processor()
    cfg = embedded_config(tokenizer, hidden=recipe.hidden, layers=recipe.layers, vision_depth=recipe.vision_depth,
                          vision_hidden=recipe.vision_hidden, kv_heads=recipe.kv_heads)
    t0 = time.perf_counter()
    examples = synthetic_examples(make_encoder(tokenizer, processor, cfg), "train", recipe.train_samples,
                                  recipe.max_len, task_weights=recipe.task_weights,
                                  object_weights=recipe.object_weights, color_share=recipe.color_share)
    log(f"source model: {len(examples)} training samples encoded in {time.perf_counter() - t0:.1f} s")
    model = BardVLM(cfg)
    with torch.no_grad():
        model.visual.pos_embed.weight.normal_(0.0, recipe.vision_pos_std)
        for layer in model.language_model.layers:
            layer.self_attn.q_norm.weight.fill_(recipe.qk_norm_init)
            layer.self_attn.k_norm.weight.fill_(recipe.qk_norm_init)
    log(f"source model: {model.num_parameters() / 1e6:.2f} M parameters, {recipe.steps} steps of "
        f"{recipe.batch_size}")
    sched = Schedule(steps=recipe.steps, lr=recipe.lr, batch_size=recipe.batch_size, warmup=recipe.warmup,
                     min_lr_ratio=0.05, vision_lr_ratio=recipe.vision_lr_ratio, weight_decay=recipe.weight_decay,
                     ema_decay=recipe.ema_decay, decay_share=recipe.decay_share)
    work = directory.parent / ".work" / directory.name
    trainer = Trainer(model, sched, examples, lambda ex: collate_ar(ex, cfg, tokenizer.pad_token_id), ar_loss, work,
                      seed=recipe.seed, save_every=100, label="source (AR)", dist_info=dist_info, progress=progress,
                      device=device, precision=precision, strategy=strategy, fingerprint=recipe.fingerprint(),
                      on_step=on_step)
    history = trainer.run(resume=resume)
    model = trainer.final_model().cpu()
    if not dist_info.main:
        return directory
    plot_losses(trainer.metrics_path, work / "loss.png", "source model (AR next-token loss)")
    build = {"fingerprint": recipe.fingerprint(), "recipe": asdict(recipe), "data_hash": data_hash(
        "train", recipe.train_samples), "final_loss": history[-1]["loss"] if history else None,
        "train_seconds": round(time.perf_counter() - t0, 1)}
    save_checkpoint(model, directory, extra={"build.json": build}, copy=[trainer.metrics_path, work / "loss.png"])
    shutil.rmtree(work, ignore_errors=True)
    return directory
