"""The prepared GPU check (benchmarks/gpu_check.py) runs end to end on the CPU in its dry-run mode, so the script
a lent GPU machine runs has been exercised before the machine is spent on it."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["ok"] and res["dry_run"]
    assert res["tests"]["collected_only"] and "collected" in res["tests"]["summary"]
    assert res["train"]["max_relative_gap_second_half"] == 0.0            # two CPU runs: the same curve
    assert res["decode"]["equal"] == res["decode"]["prompts"] == 4
    t = res["timing"]
    assert set(t["ms_per_step"]["eager"]) == {"1", "16", "32"} and t["cuda_graphs"] == "skipped: no CUDA device"
    assert t["eager"]["bard_vs_ar"] > 0
