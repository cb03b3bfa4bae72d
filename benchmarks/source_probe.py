"""Build the embedded default's AR source with one seed, thread count and recipe override, then score it per task
on the 200 test prompts: the probe behind the README's "why it failed elsewhere" table (word reading learnt or
not, "where" the next weakest).

    python benchmarks/source_probe.py --seed 1 --threads 1 --out /tmp/probe/s1 [--set '{"steps": 3000}']

`--set` takes SourceRecipe fields as JSON (steps, weight_decay, train_samples, lr, vision_lr_ratio, ...). Prints
one JSON line: the recipe, training seconds, exact match overall, per task (read / where / describe / count) and
per task and object count, and the first mismatches. `--train-samples N` also scores the first N training samples
(seen in training): a gap between the two is over-fitting, not under-learning.

Weight averages and snapshots of the same run, scored beside its last weights (a paired comparison: one run,
one data order, one seed):

    python benchmarks/source_probe.py --seed 3 --out /tmp/probe/s3 --ema 0.995,0.998 --snapshots 2500 \
        --samples 1000 --validation 300

`--ema D,...` keeps an exponential moving average of the weights per decay D (from step 1, with the usual
warm-up min(D, (1 + t) / (10 + t)): `train.loop.average_weight`, as `Schedule.ema_decay`);
`--snapshots S,...` keeps the weights after step S; `--validation N` also scores every variant on N validation
prompts (to test choosing a variant on validation and reporting it on test). Each variant is saved as a
checkpoint under --out and scored like the last weights; the JSON line then has one row per variant under
"variants".
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--set", default="{}", help="SourceRecipe fields as JSON")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--train-samples", type=int, default=0, help="also score the first N training samples")
    ap.add_argument("--ema", default="", help="comma-separated EMA decays of the weights to keep and score")
    ap.add_argument("--snapshots", default="", help="comma-separated steps whose weights to keep and score")
    ap.add_argument("--validation", type=int, default=0, help="also score every variant on N validation prompts")
    a = ap.parse_args()
    decays = [float(d) for d in a.ema.split(",") if d]
    snap_steps = {int(s) for s in a.snapshots.split(",") if s}

    import torch

    from bard_deploy.data.synthetic import TASKS, samples
    from bard_deploy.embedded import save_checkpoint
    from bard_deploy.runtimes.api import Pipeline
    from bard_deploy.train.loop import average_weight
    from bard_deploy.train.source import SourceRecipe, build_source

    torch.set_num_threads(a.threads)
    recipe = replace(SourceRecipe(seed=a.seed), **json.loads(a.set))
    kept: dict[str, dict[str, torch.Tensor]] = {}     # variant name -> weights
    model_of: list[torch.nn.Module] = []

    def keep(trainer) -> None:
        params = {n: p.detach() for n, p in trainer.model.state_dict().items()}
        if not model_of:
            model_of.append(trainer.model)
        for d in decays:
            avg = kept.setdefault(f"ema{d}", {n: p.clone() for n, p in params.items()})
            w = average_weight(d, trainer.step)          # the same average as Schedule.ema_decay
            for n, p in params.items():
                if p.is_floating_point():
                    avg[n].lerp_(p, w)
        if trainer.step in snap_steps:
            kept[f"step{trainer.step}"] = {n: p.clone() for n, p in params.items()}

    t0 = time.perf_counter()
    build_source(a.out / "source", recipe, progress=False, log=lambda *x: None,
                 on_step=keep if (decays or snap_steps) else None)
    train_s = time.perf_counter() - t0
    if (decays or snap_steps) and not model_of:
        raise SystemExit(f"{a.out / 'source'} was already built: variants need a fresh --out")
    variants = {"last": a.out / "source"}
    for name, weights in kept.items():
        model_of[0].load_state_dict(weights)
        variants[name] = save_checkpoint(model_of[0], a.out / name)

    def score(pipe, split: str, n: int) -> dict:
        """Exact match of the first n prompts of a split (and of its first 200, the grid's), per task and per
        task and object count, and the first mismatches."""
        hit, total, fails, first = Counter(), Counter(), [], 0
        for i, s in enumerate(samples(split, n)):
            got = pipe.generate_batch([s.messages()[:-1]], ar=True, max_new_tokens=64)[0].text
            for key in (s.task, f"{s.task}, {len(s.items)} objects"):      # per task, and by how crowded
                hit[key] += got == s.answer
                total[key] += 1
            first += i < 200 and got == s.answer
            if got != s.answer and len(fails) < 8:
                fails.append({"task": s.task, "expected": s.answer, "got": got})
        return {"exact_match": sum(hit[t] for t in TASKS) / n, "first_200": first / min(n, 200),
                "per_task": {t: f"{hit[t]}/{total[t]}" for t in sorted(total)}, "fails": fails}

    pipe = Pipeline.load(a.out / "source", threads=a.threads)
    row = {"recipe": asdict(recipe), "threads": a.threads, "train_s": round(train_s), **score(pipe, "test", a.samples)}
    if a.train_samples:
        train = score(pipe, "train", a.train_samples)
        row["train_split"] = {"exact_match": train["exact_match"], "per_task": train["per_task"]}
    if len(variants) > 1 or a.validation:
        row["variants"] = {}
        for name, directory in variants.items():
            pipe = Pipeline.load(directory, threads=a.threads)
            test = row if name == "last" else score(pipe, "test", a.samples)
            v = {"test": test["exact_match"], "test_200": test["first_200"], "per_task": test["per_task"]}
            if a.validation:
                v["validation"] = score(pipe, "validation", a.validation)["exact_match"]
            row["variants"][name] = v
    print(json.dumps(row))


if __name__ == "__main__":
    main()
