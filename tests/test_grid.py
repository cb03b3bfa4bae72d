"""benchmarks/grid.py: the robust-default grid's table from results.json files (means, worst cases, the targets
per cell), on hand-made cells whose numbers are worked out by hand."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GRID = ROOT / "benchmarks" / "grid.py"


def write_cell(out: Path, seed: int, threads: int, rows: dict, provenance: bool = True, seconds=600.0, name=""):
    d = out / f"t{threads}" / (name or f"s{seed}")
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


def test_grid_cells_that_oversubscribe_the_cores_wait_passively(grid_module):
    g = grid_module
    assert g.cell_env(2, 2, 2, {"A": "1"}) == {"A": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    assert g.cell_env(2, 1, 2, {"A": "1"}) == {"A": "1"}                  # one thread per core: left as it is
    assert g.cell_env(1, 2, 2, {}) == {}
    assert g.cell_env(2, 2, 2, {"OMP_WAIT_POLICY": "ACTIVE"}) == {"OMP_WAIT_POLICY": "ACTIVE"}   # the user's


def test_grid_variant_cells_sit_beside_the_default_and_tables_keep_them_apart(tmp_path, grid_module):
    g = grid_module
    cmd = g.cell_command(tmp_path, 3, 1, "--recipe x2.toml", variant="x2")
    assert cmd[cmd.index("--name") + 1] == "s3-x2" and cmd[cmd.index("--out") + 1] == str(tmp_path / "t1")
    assert g.result_path(tmp_path, 3, 1, 1000, "x2") == tmp_path / "t1" / "s3-x2" / "results-1000.json"
    # the default's cell, a variant's, and other runs under t1 (a probe, a source): each table takes its own
    write_cell(tmp_path, 0, 1, {"source (AR)": (0.99, 1.0), "b16": (0.97, 4.5)})
    write_cell(tmp_path, 0, 1, {"source (AR)": (0.99, 1.0), "b16": (0.995, 5.0)}, name="s0-x2", provenance=False)
    write_cell(tmp_path, 0, 1, {"source (AR)": (0.99, 1.0), "b16": (0.50, 9.0)}, name="s0-x2-probe")
    write_cell(tmp_path, 0, 1, {"source (AR)": (0.10, 1.0), "b16": (0.10, 9.0)}, name="source-seed0")
    default = json.loads(grid("--out", tmp_path, "--json").stdout)
    assert [c["models"]["b16"][0] for c in default["cells"]] == [0.97]
    x2 = json.loads(grid("--out", tmp_path, "--json", "--variant", "x2").stdout)
    assert [(c["seed"], c["models"]["b16"][0]) for c in x2["cells"]] == [(0, 0.995)]
    assert x2["summary"]["all_three"] == 1 and default["summary"]["all_three"] == 0
    probe = json.loads(grid("--out", tmp_path, "--json", "--variant", "x2-probe").stdout)
    assert [c["models"]["b16"][0] for c in probe["cells"]] == [0.50]
    # a --rescore'd results-N.json takes the training's wall time from results.json beside it
    (tmp_path / "t1" / "s0" / "results-1000.json").write_text(json.dumps({"eval_samples": 1000, "rows": [
        {"model": "source (AR)", "exact_match": 0.985, "tokens_per_forward": 1.0},
        {"model": "b16", "exact_match": 0.98, "tokens_per_forward": 4.6}]}))
    rescored = json.loads(grid("--out", tmp_path, "--json", "--samples", "1000").stdout)["cells"]
    assert [(c["seconds"], c["samples"], c["models"]["b16"]) for c in rescored] == [(600.0, 1000, [0.98, 4.6])]
    missing = grid("--out", tmp_path, "--variant", "y")
    assert missing.returncode != 0 and "no finished cell (sS-y)" in missing.stderr
    bad = grid("--out", tmp_path, "--variant", "x/../y")
    assert bad.returncode != 0 and "--variant 'x/../y'" in bad.stderr and "Traceback" not in bad.stderr


def test_grid_threshold_tables_read_the_cells_decoded_at_that_threshold(tmp_path, grid_module):
    """`--samples N --threshold T` tables results-N-tauT.json (the source's row and the last stage at T), apart from
    results-N.json; without N, or at a threshold outside (0, 1], it refuses in one line."""
    g = grid_module
    assert g.result_path(tmp_path, 2, 1, 1000, "x2", 0.8) == tmp_path / "t1" / "s2-x2" / "results-1000-tau0.8.json"
    assert g.results_name(1000, 0.75) == "results-1000-tau0.75.json" and g.results_name(1000) == "results-1000.json"
    write_cell(tmp_path, 0, 1, {"source (AR)": (0.96, 1.0), "b16": (0.97, 3.6)})
    for name, tau, b16 in (("results-1000.json", 0.9, (0.97, 3.6)), ("results-1000-tau0.8.json", 0.8, (0.945, 4.2))):
        (tmp_path / "t1" / "s0" / name).write_text(json.dumps({"eval_samples": 1000, "rows": [
            {"model": "source (AR)", "exact_match": 0.96, "tokens_per_forward": 1.0},
            {"model": "b16", "threshold": tau, "exact_match": b16[0], "tokens_per_forward": b16[1]}]}))
    at09 = json.loads(grid("--out", tmp_path, "--json", "--samples", "1000").stdout)["summary"]
    at08 = json.loads(grid("--out", tmp_path, "--json", "--samples", "1000", "--threshold", "0.8").stdout)["summary"]
    assert at09["met"] == {"source": 1, "gap": 1, "tpf": 0} and at08["met"] == {"source": 1, "gap": 0, "tpf": 1}
    assert abs(at08["worst_gap"] - (0.945 - 0.96)) < 1e-12 and at08["worst_tpf"] == 4.2
    none = grid("--out", tmp_path, "--samples", "1000", "--threshold", "0.7")
    assert none.returncode != 0 and "--rescore 1000 --threshold 0.7" in none.stderr
    for args in (("--threshold", "0.8"), ("--samples", "1000", "--threshold", "1.5")):
        proc = grid("--out", tmp_path, *args)
        assert proc.returncode != 0 and "--threshold" in proc.stderr and "Traceback" not in proc.stderr
