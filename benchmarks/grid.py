"""The robust-default grid: `bard-deploy train` over seeds x torch thread counts, and its table (issue "robust
default": on every seed 0-4 and at threads 1 and 2 the source reaches >= 95 % and B16 is within 1 point of it at
>= 4 tokens per forward).

    python benchmarks/grid.py --out runs-grid --run --jobs 2     # train the missing cells, then the table
    python benchmarks/grid.py --out runs-grid                    # the table of the cells that are there
    python benchmarks/grid.py --out runs-grid --json             # ... as JSON
    python benchmarks/grid.py --out runs-grid --rescore 1000     # score every cell again on 1 000 test prompts

A cell is `bard-deploy train --seed S --threads T --out OUT/tT --name sS --no-progress` (the source is rebuilt per
thread count, under OUT/tT/source[-seedS]); its log goes to OUT/tT/sS.log. `--jobs N` runs N cells at a time: their
wall times are then contended (the table says so) while their results are not (a cell's numbers depend on its seed,
thread count and CPU, not on the load); when they oversubscribe the cores, the cells run with
OMP_WAIT_POLICY=PASSIVE (spinning idle threads made two 2-thread cells on 2 cores ~15x slower). `--train-args`
passes further options to every cell, e.g. `--train-args "--preset quality"`. `--variant NAME` names the cells
sS-NAME instead (log OUT/tT/sS-NAME.log), beside the default's sS and from the same sources, so that a recipe and
the default compare seed by seed:

    python benchmarks/grid.py --out runs-grid --variant x2 --run --jobs 2 \
        --train-args "--recipe benchmarks/recipes/stages-x2.toml"
    python benchmarks/grid.py --out runs-grid --variant x2 --samples 1000   # its table; without --variant: sS's

A table takes the cells of one name only: sS without --variant, sS-NAME with it (other runs under OUT/tT are not
cells of it).

The table has one row per cell (exact match of the source and every stage, B16's tokens per forward, B16 minus
the source, the machine, and results.json's wall time, contended when cells shared the cores), then the mean and
the worst per stage and how many cells meet each target. A cell made before results.json carried its provenance
is keyed by its directory names and shows "?" for the machine.

200 test prompts (the results table's) carry about +-1.5 points of sampling error at 95 %, as much as many recipe
effects and the whole margin of the targets. `--rescore N` decodes each cell's source and stages again on the
first N test prompts (as the results table does: the source autoregressively, the stages at its threshold) and
writes `results-N.json` beside results.json; `--samples N` makes the table of those. `--threshold T` with them
decodes each cell's last stage (B16) again on the same N prompts at decode threshold T (the results table's is
0.9) into `results-N-tauT.json` (the source's row copied: it decodes without a threshold) and makes the table of
those, so the tokens-per-forward target can be read at another operating point:

    python benchmarks/grid.py --out runs-grid --rescore 1000 --threshold 0.8
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

SOURCE_MIN = 0.95      # the source's exact match
GAP_MAX = 0.01         # B16 at most this far below its source (above it is fine)
TPF_MIN = 4.0          # B16's tokens per forward
SOURCE = "source (AR)"
CELL = re.compile(r"s(\d+)(?:-(.+))?")    # a cell's directory: sSEED or sSEED-VARIANT
VARIANT = re.compile(r"[A-Za-z0-9_.]+(?:-[A-Za-z0-9_.]+)*")


def cell_name(seed: int, variant: str = "") -> str:
    """A cell's run name: sS, or sS-VARIANT."""
    return f"s{seed}-{variant}" if variant else f"s{seed}"


def cell_command(out: Path, seed: int, threads: int, train_args: str = "", variant: str = "") -> list[str]:
    """The `bard-deploy train` command line of one cell."""
    return [sys.executable, "-m", "bard_deploy.cli", "train", "--seed", str(seed), "--threads", str(threads),
            "--out", str(out / f"t{threads}"), "--name", cell_name(seed, variant), "--no-progress",
            *shlex.split(train_args)]


def oversubscribed(jobs: int, threads: int, cpus: int | None = None) -> bool:
    """Whether `jobs` cells of `threads` torch threads each want more than the `cpus` cores (default: this
    machine's)."""
    return jobs * threads > (cpus or os.cpu_count() or 1)


def cell_env(jobs: int, threads: int, cpus: int, env: Mapping[str, str]) -> dict[str, str]:
    """The environment of a cell: `env`, plus OMP_WAIT_POLICY=PASSIVE (unless `env` sets it) when `jobs` cells of
    `threads` threads each would oversubscribe the `cpus` cores. OpenMP's default lets idle threads spin: two
    2-thread trainings on 2 cores then ran a source step in ~5 s instead of ~0.3 s (Intel Xeon VM, 2026-12-07).
    The policy changes only how threads wait, not how work is split: the same cell gave the same losses
    bit for bit either way."""
    if oversubscribed(jobs, threads, cpus) and "OMP_WAIT_POLICY" not in env:
        return {**env, "OMP_WAIT_POLICY": "PASSIVE"}
    return dict(env)


def results_name(samples: int | None = None, threshold: float | None = None) -> str:
    """results.json, `--rescore`d results-N.json, or results-N-tauT.json (the last stage at threshold T)."""
    if samples is None:
        return "results.json"
    return f"results-{samples}.json" if threshold is None else f"results-{samples}-tau{threshold:g}.json"


def result_path(out: Path, seed: int, threads: int, samples: int | None = None, variant: str = "",
                threshold: float | None = None) -> Path:
    """A cell's results.json, results-N.json or results-N-tauT.json."""
    return out / f"t{threads}" / cell_name(seed, variant) / results_name(samples, threshold)


def stage_rows(rows: list[dict]) -> list[dict]:
    """The rows of a results file that are its stages decoded as BARD: not the source's, not a dual-mode
    checkpoint's causal rows."""
    return [r for r in rows if r["model"] != SOURCE and not r["model"].endswith("(causal)")]


def rescore(run_dir: Path, samples: int) -> dict:
    """Score a finished run (`bard-deploy train`'s OUT/NAME) again on the first `samples` test prompts, as its
    results table did (source autoregressively, every stage of results.json at its threshold); writes and returns
    results-N.json (rows, eval_samples, and the provenance copied from results.json)."""
    from bard_deploy.config import load_config, resolve_source
    from bard_deploy.train.recipe import Recipe, Stage
    from bard_deploy.train.run import results_table

    res = json.loads((run_dir / "results.json").read_text())
    rows = stage_rows(res["rows"])
    if not rows:
        raise ValueError(f"{run_dir / 'results.json'} has no stage rows")
    first = run_dir / rows[0]["model"]
    recorded = load_config(first).bard.source_model
    source, looked = resolve_source(first, recorded)
    if source is None:
        raise ValueError(f"the source of {first} ({recorded}) is not at {', '.join(map(str, looked))}")
    thresholds = {r["threshold"] for r in rows}
    if len(thresholds) != 1:
        raise ValueError(f"{run_dir}: stages at several thresholds {sorted(thresholds)}")
    recipe = Recipe(out=str(run_dir.parent), name=run_dir.name, eval_samples=samples,
                    eval_threshold=thresholds.pop(), source=str(source),
                    stages=tuple(Stage(r["model"], r["block_size"], 1) for r in rows),
                    dual_mode=any(r["model"].endswith("(causal)") for r in res["rows"]))
    out = {**results_table(recipe, source, log=print), "provenance": res.get("provenance", {})}
    (run_dir / f"results-{samples}.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def retune(run_dir: Path, samples: int, threshold: float) -> dict:
    """Decode the last stage of a rescored run (its results-N.json) again on the same N test prompts at
    `threshold`, as the results table decodes (`train.run.stage_row`); writes and returns results-N-tauT.json: the
    source's row of results-N.json (it decodes without a threshold), that stage's row, and the provenance."""
    from bard_deploy.evaluate import synthetic_split
    from bard_deploy.runtimes.api import Pipeline
    from bard_deploy.train.recipe import Stage
    from bard_deploy.train.run import stage_row

    scored = run_dir / results_name(samples)
    if not scored.is_file():
        raise ValueError(f"{scored} is missing (score the cell first: --rescore {samples})")
    res = json.loads(scored.read_text())
    sources = [r for r in res["rows"] if r["model"] == SOURCE]
    stages = stage_rows(res["rows"])
    if not sources or not stages:
        raise ValueError(f"{scored} lacks the source's row or a stage's")
    last = stages[-1]
    convs, tasks = synthetic_split("test", samples)
    row = stage_row(Pipeline.load(run_dir / last["model"], device="auto"), Stage(last["model"], last["block_size"], 1),
                    threshold, convs, tasks)
    out = {"eval_samples": samples, "rows": [sources[0], row], "provenance": res.get("provenance", {})}
    (run_dir / results_name(samples, threshold)).write_text(json.dumps(out, indent=2) + "\n")
    return out


def run_cells(out: Path, todo: list[tuple[int, int]], jobs: int, train_args: str, variant: str = "") -> list[str]:
    """Train the cells `todo` ((seed, threads) each), `jobs` at a time; returns one line per failed cell."""
    running: list[tuple[tuple[int, int], subprocess.Popen, object]] = []
    failed = []
    queue = list(todo)
    while queue or running:
        while queue and len(running) < jobs:
            seed, threads = queue.pop(0)
            (out / f"t{threads}").mkdir(parents=True, exist_ok=True)
            log = open(out / f"t{threads}" / f"{cell_name(seed, variant)}.log", "w")
            print(f"grid: cell seed {seed}, threads {threads} started ({log.name})", flush=True)
            cmd = cell_command(out, seed, threads, train_args, variant)
            env = cell_env(jobs, threads, os.cpu_count() or 1, os.environ)
            running.append(((seed, threads), subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                            log))
        time.sleep(5)
        for item in list(running):
            (seed, threads), proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {log.name})"
                print(f"grid: cell seed {seed}, threads {threads} {status}", flush=True)
                if proc.returncode != 0:
                    failed.append(f"seed {seed}, threads {threads}: exit {proc.returncode}, see {log.name}")
    return failed


def load_cells(out: Path, samples: int | None = None, variant: str = "", threshold: float | None = None) -> list[dict]:
    """Every finished cell of `variant` (sS, or sS-VARIANT) under `out`: seed, threads, machine, wall seconds,
    {model: (exact match, tokens per forward)} in the table's order, and {model: exact match per task} where
    results.json has it. Runs of other names under OUT/tT are left out."""
    cells = []
    name = results_name(samples, threshold)
    for path in sorted(out.glob(f"t*/s*/{name}")):
        match = CELL.fullmatch(path.parent.name)
        if match is None or (match.group(2) or "") != variant:
            continue
        res = json.loads(path.read_text())
        prov = res.get("provenance", {})
        if "train_seconds" not in res and (path.parent / "results.json").is_file():    # a results-N.json
            res["train_seconds"] = json.loads((path.parent / "results.json").read_text()).get("train_seconds")
        cells.append({
            "seed": prov.get("seed", int(match.group(1))),
            "threads": prov.get("torch_threads", int(path.parent.parent.name[1:])),
            "machine": prov.get("machine", "?"), "source_steps": prov.get("source_steps"),
            "seconds": res.get("train_seconds"), "samples": res.get("eval_samples"),
            "models": {r["model"]: (r["exact_match"], r["tokens_per_forward"]) for r in res["rows"]},
            "per_task": {r["model"]: r["per_group"] for r in res["rows"] if "per_group" in r}})
    return sorted(cells, key=lambda c: (c["threads"], c["seed"]))


def targets(cell: dict, last: str) -> dict[str, bool]:
    """The three targets of one cell, for its last stage `last` (B16 in the default recipe)."""
    src, (b, tpf) = cell["models"][SOURCE][0], cell["models"][last]
    return {"source": src >= SOURCE_MIN - 1e-9, "gap": b >= src - GAP_MAX - 1e-9, "tpf": tpf >= TPF_MIN}


def summarize(cells: list[dict]) -> dict:
    """Mean and worst exact match per model (and of B16 - source), and how many cells meet each target. Every
    cell must have the same models (a ValueError names the first that does not)."""
    models = list(cells[0]["models"])
    for c in cells:
        if list(c["models"]) != models:
            raise ValueError(f"cell seed {c['seed']}, threads {c['threads']} has models {list(c['models'])}, "
                             f"not {models}: one recipe per grid")
    last = models[-1]
    per = {m: [c["models"][m][0] for c in cells if m in c["models"]] for m in models}
    gaps = [c["models"][last][0] - c["models"][SOURCE][0] for c in cells]
    met = [targets(c, last) for c in cells]
    return {"cells": len(cells), "last": last,
            "mean": {m: statistics.fmean(v) for m, v in per.items()},
            "worst": {m: min(v) for m, v in per.items()},
            "mean_tpf": statistics.fmean(c["models"][last][1] for c in cells),
            "worst_tpf": min(c["models"][last][1] for c in cells),
            "mean_gap": statistics.fmean(gaps), "worst_gap": min(gaps),
            "met": {k: sum(m[k] for m in met) for k in ("source", "gap", "tpf")},
            "all_three": sum(all(m.values()) for m in met)}


def markdown(cells: list[dict], summary: dict) -> str:
    """The README's grid table."""
    models, last = list(cells[0]["models"]), summary["last"]
    pct = lambda x: f"{100 * x:.1f} %"                                  # noqa: E731
    head = ["seed", "threads", *models[:-1], f"{last} (tokens / forward)", f"{last} - source", "machine",
            "wall"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        m = c["models"]
        gap = 100 * (m[last][0] - m[SOURCE][0])
        wall = "-" if c["seconds"] is None else f"{int(c['seconds'] // 60)} min {int(c['seconds'] % 60)} s"
        lines.append("| " + " | ".join([str(c["seed"]), str(c["threads"]), *(pct(m[k][0]) for k in models[:-1]),
                                        f"{pct(m[last][0])} ({m[last][1]:.2f})", f"{gap:+.1f}", c["machine"],
                                        wall]) + " |")
    for what in ("mean", "worst"):
        vals = summary[what]
        tpf, gap = summary[f"{what}_tpf"], 100 * summary[f"{what}_gap"]
        lines.append("| " + " | ".join([f"**{what}**", "", *(pct(vals[k]) for k in models[:-1]),
                                        f"{pct(vals[last])} ({tpf:.2f})", f"{gap:+.1f}", "", ""]) + " |")
    n, met = summary["cells"], summary["met"]
    prompts = sorted({c["samples"] for c in cells if c["samples"]})
    each = "/".join(map(str, prompts)) or "?"
    lines.append(f"\nOf {n} cells ({each} test prompts each): source >= {100 * SOURCE_MIN:.0f} % on {met['source']}, "
                 f"{last} within "
                 f"{100 * GAP_MAX:.0f} point of its source on {met['gap']}, at >= {TPF_MIN:g} tokens per forward on "
                 f"{met['tpf']}; **all three on {summary['all_three']}**.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds")
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    ap.add_argument("--run", action="store_true", help="train the cells that have no results.json yet")
    ap.add_argument("--jobs", type=int, default=1, help="cells trained at a time")
    ap.add_argument("--train-args", default="", help="further `bard-deploy train` options for every cell")
    ap.add_argument("--variant", default="", help="cells named sS-VARIANT beside the default's sS, from the same "
                    "sources (with --train-args: a recipe to compare seed by seed)")
    ap.add_argument("--json", action="store_true", help="print the cells and the summary as JSON")
    ap.add_argument("--rescore", type=int, default=0, help="score every cell again on N test prompts")
    ap.add_argument("--samples", type=int, default=None, help="the table of the cells' results-N.json")
    ap.add_argument("--threshold", type=float, default=None, help="with --rescore N / --samples N: the cells' last "
                    "stage decoded at this threshold on those N prompts (results-N-tauT.json), and its table")
    a = ap.parse_args()
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s]
        thread_counts = [int(t) for t in a.threads.split(",") if t]
    except ValueError:
        raise SystemExit(f"--seeds {a.seeds!r} / --threads {a.threads!r}: comma-separated integers") from None
    if a.variant and not VARIANT.fullmatch(a.variant):
        raise SystemExit(f"--variant {a.variant!r}: letters, digits, '_', '.' and inner '-' only")
    if a.threshold is not None and not (a.rescore or a.samples):
        raise SystemExit("--threshold needs --rescore N or --samples N (the prompts to decode at it)")
    if a.threshold is not None and not 0 < a.threshold <= 1:
        raise SystemExit(f"--threshold {a.threshold}: a decode threshold in (0, 1]")
    if a.jobs < 1 or not seeds or not thread_counts or min(thread_counts) < 1:
        raise SystemExit("--jobs, --seeds and --threads need at least one value, threads and jobs >= 1")
    if a.run:
        todo = [(s, t) for t in thread_counts for s in seeds
                if not result_path(a.out, s, t, variant=a.variant).is_file()]
        if oversubscribed(a.jobs, max(thread_counts)):
            print(f"grid: {a.jobs} jobs x up to {max(thread_counts)} threads on {os.cpu_count()} cores: the wall "
                  "times are contended (the results are not); idle OpenMP threads wait passively "
                  "(OMP_WAIT_POLICY=PASSIVE unless set)", flush=True)
        failed = run_cells(a.out, todo, a.jobs, a.train_args, a.variant)
        if failed:
            raise SystemExit("grid: cells failed:\n  " + "\n  ".join(failed))
    if a.rescore:
        for s, t in [(s, t) for t in thread_counts for s in seeds]:
            done, scored = result_path(a.out, s, t, variant=a.variant), result_path(a.out, s, t, a.rescore, a.variant)
            if done.is_file() and not scored.is_file():
                print(f"grid: scoring {cell_name(s, a.variant)}, threads {t} on {a.rescore} test prompts", flush=True)
                try:
                    rescore(done.parent, a.rescore)
                except ValueError as e:
                    raise SystemExit(f"grid: {e}") from None
            tuned = result_path(a.out, s, t, a.rescore, a.variant, a.threshold)
            if a.threshold is not None and scored.is_file() and not tuned.is_file():
                print(f"grid: decoding {cell_name(s, a.variant)}, threads {t} at threshold {a.threshold:g}", flush=True)
                try:
                    retune(done.parent, a.rescore, a.threshold)
                except ValueError as e:
                    raise SystemExit(f"grid: {e}") from None
        a.samples = a.rescore
    cells = [c for c in load_cells(a.out, a.samples, a.variant, a.threshold)
             if c["seed"] in seeds and c["threads"] in thread_counts]
    if not cells:
        pattern = "sS" + (f"-{a.variant}" if a.variant else "")
        if a.threshold is not None:
            raise SystemExit(f"grid: no cell ({pattern}) under {a.out} has {results_name(a.samples, a.threshold)} "
                             f"(decode them with --rescore {a.samples} --threshold {a.threshold:g})")
        raise SystemExit(f"grid: no finished cell ({pattern}) under {a.out} (train them with --run)")
    try:
        summary = summarize(cells)
    except ValueError as e:
        raise SystemExit(f"grid: {e}") from None
    if a.json:
        print(json.dumps({"cells": cells, "summary": summary}, indent=2))
    else:
        print(markdown(cells, summary))


if __name__ == "__main__":
    main()
