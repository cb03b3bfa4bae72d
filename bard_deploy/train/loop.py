"""The training loop shared by the AR source model and every BARD stage.

AdamW (vision tower at its own lower learning rate, no decay on norms / biases / embeddings), linear warm-up
then cosine decay, gradient accumulation, gradient clipping, under torchrun DDP or FSDP2 (gloo on CPU, nccl on
GPU), CUDA placement with bf16 autocast, a rich progress bar with ETA, metrics as JSONL and a loss-curve PNG,
and atomic, resumable training state (FSDP gathers the shards into the same files).

Determinism: the samples of step s and the noise of each sample are functions of (seed, s, sample index) only,
so a resumed run reaches the same weights as an uninterrupted one, and N processes with the same global batch
follow the same loss curve as one.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from bard_deploy.atomic import atomic_dir, recover_dir
from bard_deploy.devices import resolve_device
from bard_deploy.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class Schedule:
    """The optimisation recipe of one training run: steps, global batch, AdamW, LR schedule and clipping."""

    steps: int
    lr: float
    batch_size: int                    # global samples per optimizer step
    micro_batch: int = 0               # samples per forward on one process (0 = the whole per-process share);
    #                                    with the Trainer's `length`, the share is cut in order of length
    warmup: int = 0
    min_lr_ratio: float = 0.1
    vision_lr_ratio: float = 0.1       # the vision tower (not its mergers) trains at lr * this
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)
    # an exponential moving average of the weights at this decay (0 = none): it starts at the weights after step 1
    # and decays at min(decay, (1 + t) / (10 + t)) after step t (the usual warm-up); when kept, the average is
    # what the run produces
    ema_decay: float = 0.0
    # the share of the steps after warm-up over which the cosine decays, at the end: 1.0 = all of them (cosine);
    # below 1 the lr stays at its peak until then (warm-up, stable, decay)
    decay_share: float = 1.0

    def check(self) -> Schedule:
        """Validate the fields (a ConfigError names a bad one); returns self so a call can be chained."""
        for name in ("steps", "batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}", getattr(self, name))
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}", self.lr)
        if self.warmup < 0 or self.micro_batch < 0:
            raise ConfigError("warmup and micro_batch must be >= 0", (self.warmup, self.micro_batch))
        if not 0 < self.decay_share <= 1:
            raise ConfigError(f"decay_share must be in (0, 1], got {self.decay_share}", self.decay_share)
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}", self.ema_decay)
        return self

    def ema_weight(self, step: int) -> float:
        """The weight of the new weights in the average after optimizer step `step` (`average_weight`)."""
        return average_weight(self.ema_decay, step)

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base lr at optimizer step `step` (0-based): linear warm-up, then the peak until the
        last `decay_share` of the steps, over which it follows a cosine to min_lr_ratio."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        if self.decay_share < 1:
            progress = max(0.0, progress - (1 - self.decay_share)) / self.decay_share
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def average_weight(decay: float, step: int) -> float:
    """The weight of the new weights in an exponential moving average at `decay` after optimizer step `step`
    (1-based; the average starts as a copy of step 1's): 1 - min(decay, (1 + step) / (10 + step))."""
    return 1.0 - min(decay, (1 + step) / (10 + step))


@dataclass
class DistInfo:
    """This process's rank and the world size (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """True on rank 0, the process that writes files and logs."""
        return self.rank == 0

    def close(self) -> None:
        """Leave the process group (gloo aborts the process at exit when its group is still alive)."""
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    @classmethod
    def init(cls) -> DistInfo:
        """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on GPU)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())


def resolve_precision(name: str, device: torch.device) -> str:
    """"auto" = bf16 autocast on a CUDA device that supports it, fp32 elsewhere (CPUs here lack native bf16)."""
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name not in ("fp32", "bf16"):
        raise ConfigError(f"--precision must be auto, fp32 or bf16, got {name!r}", name)
    return name


def sample_seed(seed: int, step: int, index: int) -> int:
    """The seed of global sample `index` of step `step` (noise, sampling)."""
    return (seed * 1_000_003 + step * 10_007 + index) % (2**63 - 1)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The dataset permutation of one epoch, from its own generator seeded by (seed, epoch) only: every process
    and a resumed run compute the same order without sharing RNG state."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7 + epoch)).tolist()


def step_indices(n: int, batch: int, seed: int, step: int) -> list[int]:
    """The dataset indices of the global batch of `step`: consecutive slices of per-epoch permutations."""
    out, orders = [], {}
    for pos in range(step * batch, (step + 1) * batch):
        epoch, i = divmod(pos, n)
        if epoch not in orders:
            orders[epoch] = epoch_order(n, seed, epoch)
        out.append(orders[epoch][i])
    return out


def shard(model: torch.nn.Module) -> None:
    """FSDP2: shard every decoder layer and vision block, then the rest (embeddings, head, mergers) at the root."""
    from torch.distributed.fsdp import fully_shard

    inner = getattr(model, "model", None)
    for name in ("language_model", "visual"):
        sub = inner[name] if inner is not None and name in inner else None
        for block in getattr(sub, "layers", None) or getattr(sub, "blocks", None) or ():
            fully_shard(block)
    fully_shard(model)


def param_groups(model: torch.nn.Module, sched: Schedule) -> list[dict]:
    """AdamW groups: decayed matrices, undecayed norms / biases / embeddings, and the vision tower (not its
    mergers) at `lr_scale` vision_lr_ratio; empty groups are dropped."""
    vision, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("model.visual.") and "merger" not in name:
            vision.append(p)
        elif p.dim() < 2 or "embed" in name or "norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": sched.weight_decay, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
              {"params": vision, "weight_decay": sched.weight_decay, "lr_scale": sched.vision_lr_ratio}]
    return [g for g in groups if g["params"]]


LossFn = Callable[[torch.nn.Module, object, list[torch.Generator]], tuple[torch.Tensor, dict]]


class Trainer:
    """Runs `schedule.steps` optimizer steps of `loss_fn` over `examples`, writing to `work_dir`.

    loss_fn(model, batch, generators) -> (per-sample losses (n,), metrics); `collate(examples)` builds the batch;
    `length(example)`, when given, orders each step's samples before they are cut into micro-batches;
    `on_step(trainer)`, when given, runs after every optimizer step.
    """

    def __init__(self, model: torch.nn.Module, schedule: Schedule, examples: Sequence, collate: Callable,
                 loss_fn: LossFn, work_dir: str | Path, seed: int = 0, save_every: int = 0, log_every: int = 0,
                 label: str = "train", dist_info: DistInfo | None = None, progress: bool = True,
                 device: torch.device | str = "cpu", precision: str = "fp32", strategy: str = "ddp",
                 length: Callable[[Any], int] | None = None, fingerprint: str = "",
                 on_step: Callable[[Trainer], None] | None = None):
        self.sched = schedule.check()
        if strategy not in ("ddp", "fsdp"):
            raise ConfigError(f"strategy must be 'ddp' or 'fsdp', got {strategy!r}", strategy)
        self.device = resolve_device(str(device))
        self.precision = resolve_precision(precision, self.device)
        model.to(self.device)
        self.model, self.examples, self.collate, self.loss_fn = model, examples, collate, loss_fn
        self.work = Path(work_dir)
        self.seed, self.save_every, self.label = seed, save_every, label
        self.length = length
        self.on_step = on_step               # called after every optimizer step (probes: weight averages, snapshots)
        self.fingerprint = fingerprint       # what else determines the run (recipe, data); checked on resume
        self.log_every = log_every or max(1, min(10, schedule.steps // 50))   # ~50+ points per curve
        self.dist = dist_info or DistInfo()
        self.progress = progress
        if self.sched.batch_size % self.dist.world:
            raise ConfigError(f"global batch {self.sched.batch_size} is not divisible by {self.dist.world} processes",
                              self.sched.batch_size)
        self.fsdp = strategy == "fsdp" and self.dist.world > 1
        self.ddp = None
        if self.fsdp:
            shard(model)
        elif self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.opt = torch.optim.AdamW(param_groups(model, self.sched), lr=self.sched.lr, betas=self.sched.betas)
        self.step = 0
        self.average: dict[str, torch.Tensor] = {}   # the weight average (ema_decay): name -> tensor (FSDP: shard)

    # ---- state -----------------------------------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        """The resumable training state: `work_dir/state`."""
        return self.work / "state"

    @property
    def metrics_path(self) -> Path:
        """The logged per-step metrics, one JSON object a line: `work_dir/metrics.jsonl`."""
        return self.work / "metrics.jsonl"

    def save_state(self) -> None:
        """Atomically write weights, optimizer moments, step and RNG states (safetensors + JSON, no pickle).
        Every process calls it (FSDP gathers the shards); the main process writes."""
        weights, moments = self._full_state()
        average = self._full_average()
        if not self.dist.main:
            return
        with atomic_dir(self.state_dir, CheckpointError, "training state") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / "model.safetensors")
            if average:
                save_file({k: v.cpu().contiguous() for k, v in average.items()}, tmp / "average.safetensors")
            opt = {}
            for i, state in enumerate(moments):
                for key, value in state.items():
                    value = value.detach().cpu()
                    opt[f"{i}.{key}"] = value.reshape(-1) if key == "step" else value.contiguous()
            save_file(opt, tmp / "optimizer.safetensors")
            meta = {"step": self.step, "schedule": asdict(self.sched), "seed": self.seed,
                    "fingerprint": self.fingerprint,
                    "torch_rng": torch.get_rng_state().tolist(), "python_rng": _py_rng_to_json(random.getstate())}
            (tmp / "state.json").write_text(json.dumps(meta))

    def load_state(self) -> bool:
        """Resume from `state/` when it exists; True if resumed."""
        if self.dist.main:
            recover_dir(self.state_dir)
        if self.dist.world > 1:
            dist.barrier()
        meta_path = self.state_dir / "state.json"
        if not meta_path.is_file():
            return False
        try:
            meta = json.loads(meta_path.read_text())
            weights = load_file(self.state_dir / "model.safetensors")
            opt = load_file(self.state_dir / "optimizer.safetensors")
            average = load_file(self.state_dir / "average.safetensors") if self.sched.ema_decay else {}
        except (OSError, ValueError, json.JSONDecodeError) as e:
            raise CheckpointError(f"training state in {self.state_dir} is unreadable ({e})", str(self.state_dir)) from e
        if (meta["schedule"] != json.loads(json.dumps(asdict(self.sched))) or meta["seed"] != self.seed
                or meta.get("fingerprint", "") != self.fingerprint):
            raise CheckpointError(f"training state in {self.state_dir} was written by a different recipe, schedule "
                                  "or seed; remove it (--fresh) or use the same settings", str(self.state_dir))
        moments = []
        for i in range(len(self._params)):
            st = {k.split(".", 1)[1]: v for k, v in opt.items() if k.split(".", 1)[0] == str(i)}
            moments.append({k: v.reshape(()) if k == "step" else v for k, v in st.items()})
        self._load_full_state(weights, moments)
        self._load_full_average(average)
        torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))
        random.setstate(_py_rng_from_json(meta["python_rng"]))
        self.step = meta["step"]
        self._truncate_metrics()
        return True

    @property
    def _params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.opt.param_groups for p in g["params"]]

    def _full_state(self, weights_only: bool = False) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
        """(weights, optimizer state per parameter index) as whole tensors. Under FSDP a collective that
        gathers the shards: to the main process (the others get empty dicts), or, weights only, to all."""
        if not self.fsdp:
            return self.model.state_dict(), [self.opt.state.get(p, {}) for p in self._params]
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )
        options = StateDictOptions(full_state_dict=True, cpu_offload=not weights_only)
        weights = get_model_state_dict(self.model, options=options)
        if weights_only:
            return weights, []
        state = get_optimizer_state_dict(self.model, self.opt, options=options).get("state", {})
        if not self.dist.main:
            return {}, []
        names = {id(p): n for n, p in self.model.named_parameters()}
        return weights, [state.get(names[id(p)], {}) for p in self._params]

    def _load_full_state(self, weights: dict[str, torch.Tensor], moments: list[dict[str, torch.Tensor]]) -> None:
        """Inverse of `_full_state`; every process passes the whole state (FSDP keeps its shard)."""
        if not self.fsdp:
            self.model.load_state_dict(weights)
            for p, st in zip(self._params, moments, strict=True):
                if st:
                    self.opt.state[p] = {k: v if k == "step" else v.to(p.device) for k, v in st.items()}
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, weights, options=options)
        names = {id(p): n for n, p in self.model.named_parameters()}
        groups = get_optimizer_state_dict(self.model, self.opt, options=options)["param_groups"]
        state = {names[id(p)]: st for p, st in zip(self._params, moments, strict=True) if st}
        set_optimizer_state_dict(self.model, self.opt, {"state": state, "param_groups": groups}, options=options)

    # ---- the weight average (Schedule.ema_decay) -------------------------------------------------------------
    def _update_average(self) -> None:
        """Fold the weights after this step into the average (a copy of them after the first step)."""
        weight = self.sched.ema_weight(self.step)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if name in self.average:
                    self.average[name].lerp_(p.detach(), weight)
                else:
                    self.average[name] = p.detach().clone()

    def _full_average(self) -> dict[str, torch.Tensor]:
        """The average as whole tensors (FSDP: a collective that gathers its shards on every process)."""
        return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in self.average.items()}

    def _load_full_average(self, average: dict[str, torch.Tensor]) -> None:
        """Inverse of `_full_average`: every process passes the whole average (FSDP keeps its shard)."""
        params = dict(self.model.named_parameters())
        if set(average) != (set(params) if self.sched.ema_decay else set()):
            raise CheckpointError(f"training state in {self.state_dir} holds no weight average for this model",
                                  str(self.state_dir))
        self.average = {}
        for name, full in average.items():
            p = params[name]
            if hasattr(p, "device_mesh"):                    # FSDP: this process's shard of the whole tensor
                from torch.distributed.tensor import distribute_tensor
                self.average[name] = distribute_tensor(full.to(p.device), p.device_mesh, p.placements)
            else:
                self.average[name] = full.to(p.device)

    def final_model(self) -> torch.nn.Module:
        """What the run produces, as a plain module on every process (a collective under FSDP): the weight
        average when the schedule keeps one (then also the weights of this trainer's model), else the last
        weights (`unsharded_model`)."""
        if not self.average:
            return self.unsharded_model()
        average = self._full_average()
        model = self.model if not self.fsdp else self.unsharded_model()
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(average[name].to(p.device))
        return model

    def unsharded_model(self) -> torch.nn.Module:
        """The trained model as a plain module, the same on every process (to save it, or to start the next
        pass from it). Under FSDP a collective: call it on every process."""
        if not self.fsdp:
            return self.model
        weights, _ = self._full_state(weights_only=True)
        plain = type(self.model)(self.model.config)
        plain.load_state_dict(weights)
        return plain.to(self.device)

    def _truncate_metrics(self) -> None:
        if not self.metrics_path.is_file() or not self.dist.main:
            return
        keep = [ln for ln in self.metrics_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
        self.metrics_path.write_text("".join(ln + "\n" for ln in keep))

    # ---- the loop ----------------------------------------------------------------------------------------
    def _micro_batches(self, step: int) -> list[tuple[list[int], list[int]]]:
        """This process's (dataset indices, global sample positions) per micro-batch of `step`."""
        idx = step_indices(len(self.examples), self.sched.batch_size, self.seed, step)
        mine = list(range(self.dist.rank, len(idx), self.dist.world))
        if self.length is not None:
            # similar lengths share a micro-batch, so less of it is padding; every sample keeps its own noise
            # seed (its global position) and the loss is a sum over samples, so the step's math is unchanged
            mine.sort(key=lambda j: self.length(self.examples[idx[j]]))
        size = self.sched.micro_batch or len(mine)
        return [([idx[j] for j in mine[i:i + size]], mine[i:i + size]) for i in range(0, len(mine), size)]

    def train_step(self) -> dict:
        """One optimizer step over the global batch, accumulated over this process's micro-batches.
        Returns the step's metrics: step, mean per-sample loss, lr, grad_norm and the loss's own metrics."""
        model = self.ddp or self.model
        model.train()
        for g in self.opt.param_groups:
            g["lr"] = self.sched.lr * g["lr_scale"] * self.sched.lr_factor(self.step)
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros(2, device=self.device)   # summed per-sample loss, samples
        extra: dict[str, float] = {}
        micro = self._micro_batches(self.step)
        for n, (indices, positions) in enumerate(micro):
            batch = self.collate([self.examples[i] for i in indices]).to(self.device)
            gens = [torch.Generator().manual_seed(sample_seed(self.seed, self.step, p)) for p in positions]
            sync = n == len(micro) - 1
            if self.fsdp:
                self.model.set_requires_gradient_sync(sync)
            ctx = self.ddp.no_sync() if (self.ddp is not None and not sync) else _null()
            with ctx:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                    per_sample, metrics = self.loss_fn(model, batch, gens)
                per_sample = per_sample.float()
                # sum over the global batch / global batch; DDP and FSDP average over processes, so scale back up
                (per_sample.sum() * self.dist.world / self.sched.batch_size).backward()
            total[0] += per_sample.detach().sum()
            total[1] += len(indices)
            for k, v in metrics.items():
                extra[k] = extra.get(k, 0.0) + float(v) / len(micro)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.sched.grad_clip)
        if hasattr(grad_norm, "full_tensor"):               # FSDP: a DTensor
            grad_norm = grad_norm.full_tensor()
        self.opt.step()
        if self.dist.world > 1:
            dist.all_reduce(total)
        self.step += 1
        if self.sched.ema_decay:
            self._update_average()
        return {"step": self.step, "loss": float(total[0] / total[1]), "lr": self.opt.param_groups[0]["lr"],
                "grad_norm": float(grad_norm), **{k: round(v, 6) for k, v in extra.items()}}

    def run(self, resume: bool = False) -> list[dict]:
        """Train to `schedule.steps`; with resume, continue from `state/` if present. Returns the metrics."""
        if resume:
            self.load_state()
        elif self.dist.main:
            recover_dir(self.state_dir)               # so that a killed writer's leftovers go too
            shutil.rmtree(self.state_dir, ignore_errors=True)
            self.metrics_path.unlink(missing_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        history: list[dict] = []
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        columns = [TextColumn(f"[bold]{self.label}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TextColumn("ETA"),
                   TimeRemainingColumn()]
        with Progress(*columns, disable=not (self.progress and self.dist.main)) as bar:
            task = bar.add_task(self.label, total=self.sched.steps, completed=self.step, loss=float("nan"))
            t0 = time.perf_counter()
            while self.step < self.sched.steps:
                m = self.train_step()
                m["elapsed_s"] = round(time.perf_counter() - t0, 3)
                history.append(m)
                bar.update(task, completed=self.step, loss=m["loss"])
                if self.on_step is not None:
                    self.on_step(self)
                if self.dist.main and (self.step % self.log_every == 0 or self.step == self.sched.steps):
                    with open(self.metrics_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(m) + "\n")
                if self.save_every and self.step % self.save_every == 0 and self.step < self.sched.steps:
                    self.save_state()
        return history


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _py_rng_to_json(state: tuple) -> list:
    return [state[0], list(state[1]), state[2]]


def _py_rng_from_json(state: list) -> tuple:
    return (state[0], tuple(state[1]), state[2])


def plot_losses(metrics_path: str | Path, png_path: str | Path, title: str) -> None:
    """The loss curve of a metrics.jsonl as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in Path(metrics_path).read_text().splitlines() if ln.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
