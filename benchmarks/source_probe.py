"""Build the embedded default's AR source with one seed, thread count and recipe override, then score it per task
on the 200 test prompts: the probe behind the README's "why it failed elsewhere" table (word reading learnt or
not, "where" the next weakest).

    python benchmarks/source_probe.py --seed 1 --threads 1 --out /tmp/probe/s1 [--set '{"steps": 3000}']

`--set` takes SourceRecipe fields as JSON (steps, weight_decay, train_samples, lr, vision_lr_ratio, ...). Prints
one JSON line: the recipe, training seconds, exact match overall, per task (read / where / describe / count) and
per task and object count, and the first mismatches. `--train-samples N` also scores the first N training samples
(seen in training): a gap between the two is over-fitting, not under-learning.
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
    a = ap.parse_args()

    import torch

    from bard_deploy.data.synthetic import TASKS, samples
    from bard_deploy.runtimes.api import Pipeline
    from bard_deploy.train.source import SourceRecipe, build_source

    torch.set_num_threads(a.threads)
    recipe = replace(SourceRecipe(seed=a.seed), **json.loads(a.set))
    t0 = time.perf_counter()
    build_source(a.out / "source", recipe, progress=False, log=lambda *x: None)
    train_s = time.perf_counter() - t0
    pipe = Pipeline.load(a.out / "source", threads=a.threads)

    def score(split: str, n: int) -> tuple[float, dict[str, str], list[dict]]:
        hit, total, fails = Counter(), Counter(), []
        for s in samples(split, n):
            got = pipe.generate_batch([s.messages()[:-1]], ar=True, max_new_tokens=64)[0].text
            for key in (s.task, f"{s.task}, {len(s.items)} objects"):      # per task, and by how crowded
                hit[key] += got == s.answer
                total[key] += 1
            if got != s.answer and len(fails) < 8:
                fails.append({"task": s.task, "expected": s.answer, "got": got})
        return sum(hit[t] for t in TASKS) / n, {t: f"{hit[t]}/{total[t]}" for t in sorted(total)}, fails

    exact, per_task, fails = score("test", a.samples)
    row = {"recipe": asdict(recipe), "threads": a.threads, "train_s": round(train_s), "exact_match": exact,
           "per_task": per_task, "fails": fails}
    if a.train_samples:
        train_exact, train_per_task, _ = score("train", a.train_samples)
        row["train_split"] = {"exact_match": train_exact, "per_task": train_per_task}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
