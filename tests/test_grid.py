"""benchmarks/grid.py: the robust-default grid's table from results.json files (means, worst cases, the targets
per cell), on hand-made cells whose numbers are worked out by hand."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GRID = ROOT / "benchmarks" / "grid.py"


def write_cell(out: Path, seed: int, threads: int, rows: dict, provenance: bool = True, seconds=600.0):
    d = out / f"t{threads}" / f"s{seed}"
    d.mkdir(parents=True)
    res = {"train_seconds": seconds, "eval_samples": 200,
           "rows": [{"model": m, "exact_match": em, "tokens_per_forward": tpf, "per_group": {"where": "1/2"}}
                    for m, (em, tpf) in rows.items()]}
    if provenance:
        res["provenance"] = {"machine": "Test CPU", "torch_threads": threads, "seed": seed, "source_steps": 3000}
    (d / "results.json").write_text(json.dumps(res))


def grid(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GRID), *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)


def test_grid_table_means_worst_and_targets(tmp_path):
    # seed 0: all three targets; seed 1: source 94.5 (< 95) and B16 3.5 under it; seed 2 (an old results.json,
    # keyed by its directories): B16 1.0 under its source (within), 3.9 tokens per forward (< 4)
    write_cell(tmp_path, 0, 1, {"source (AR)": (0.995, 1.0), "b4": (0.97, 3.0), "b16": (0.99, 4.9)})
    write_cell(tmp_path, 1, 1, {"source (AR)": (0.945, 1.0), "b4": (0.90, 3.0), "b16": (0.91, 4.5)})
    write_cell(tmp_path, 2, 2, {"source (AR)": (0.96, 1.0), "b4": (0.95, 3.0), "b16": (0.95, 3.9)},
               provenance=False, seconds=None)
    proc = grid("--out", tmp_path, "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert [(c["seed"], c["threads"], c["machine"]) for c in res["cells"]] == [(0, 1, "Test CPU"), (1, 1, "Test CPU"),
                                                                               (2, 2, "?")]
    assert res["cells"][0]["per_task"]["b16"] == {"where": "1/2"}
    s = res["summary"]
    assert abs(s["mean"]["source (AR)"] - (0.995 + 0.945 + 0.96) / 3) < 1e-12
    assert s["worst"] == {"source (AR)": 0.945, "b4": 0.90, "b16": 0.91}
    assert abs(s["worst_gap"] + 0.035) < 1e-12 and s["worst_tpf"] == 3.9
    assert s["met"] == {"source": 2, "gap": 2, "tpf": 2} and s["all_three"] == 1
    table = grid("--out", tmp_path)
    assert table.returncode == 0, table.stderr
    assert "| 1 | 1 | 94.5 % | 90.0 % | 91.0 % (4.50) | -3.5 | Test CPU | 10 min 0 s |" in table.stdout
    assert "| 2 | 2 | 96.0 % | 95.0 % | 95.0 % (3.90) | -1.0 | ? | - |" in table.stdout
    assert "**all three on 1**" in table.stdout and "(200 test prompts each)" in table.stdout
    # a subset of the grid
    only = json.loads(grid("--out", tmp_path, "--json", "--threads", "2").stdout)
    assert [c["seed"] for c in only["cells"]] == [2]


def test_grid_refuses_mixed_recipes_and_empty_grids(tmp_path):
    assert "no finished cell" in grid("--out", tmp_path).stderr
    write_cell(tmp_path, 0, 1, {"source (AR)": (0.99, 1.0), "b16": (0.99, 4.9)})
    write_cell(tmp_path, 1, 1, {"source (AR)": (0.99, 1.0), "b8": (0.99, 4.9)})
    proc = grid("--out", tmp_path)
    assert proc.returncode != 0 and "seed 1, threads 1 has models" in proc.stderr and "Traceback" not in proc.stderr
    assert "comma-separated integers" in grid("--out", tmp_path, "--seeds", "a").stderr


def test_grid_cell_command_is_one_train_run_per_cell(tmp_path, grid_module):
    g = grid_module
    cmd = g.cell_command(tmp_path, 3, 2, "--preset quality")
    assert cmd[1:] == ["-m", "bard_deploy.cli", "train", "--seed", "3", "--threads", "2", "--out",
                       str(tmp_path / "t2"), "--name", "s3", "--no-progress", "--preset", "quality"]
    assert g.result_path(tmp_path, 3, 2) == tmp_path / "t2" / "s3" / "results.json"
