"""Peak memory of loading a checkpoint (the lean loader: meta construction, tensors assigned one at a time), per
dtype, each in its own process (peak RSS is per process); then a torch generate when asked.

    python benchmarks/load_memory.py DIR [--dtypes bf16,fp32] [--generate]

Writes a table, then one JSON line: per dtype the load time, the peak RSS, the weights' bytes in that dtype and
their ratio (the target is <= 1.15x). Make a stand-in first: `bard-deploy standin --size 2b --out DIR`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time
import torch
from bard_deploy.bench import peak_rss_mb
from bard_deploy.checkpoint import load_model
from bard_deploy.devices import resolve_dtype
directory, dtype, generate = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
base = peak_rss_mb()
t0 = time.perf_counter()
model = load_model(directory, dtype=resolve_dtype(dtype))
seconds = time.perf_counter() - t0
weights = sum(p.numel() * p.element_size() for p in model.parameters())
out = {"dtype": dtype, "load_s": round(seconds, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
       "rss_before_load_mb": round(base, 1), "weights_mb": round(weights / 2**20, 1),
       "parameters": sum(p.numel() for p in model.parameters())}
if generate:
    from bard_deploy.runtimes.api import Pipeline
    from bard_deploy.runtimes.backend import TorchBackend
    pipe = Pipeline.from_backend(TorchBackend(model), directory)
    t0 = time.perf_counter()
    r = pipe.generate("Describe the picture.", ar=pipe.config.bard is None, max_new_tokens=8)
    out.update(generate_s=round(time.perf_counter() - t0, 1), tokens=len(r.token_ids),
               peak_rss_after_generate_mb=round(peak_rss_mb(), 1))
print("RESULT " + json.dumps(out), flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("directory")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--generate", action="store_true", help="Also decode 8 tokens (AR or BARD) on torch.")
    args = ap.parse_args()
    rows = []
    for dtype in args.dtypes.split(","):
        proc = subprocess.run([sys.executable, "-c", CHILD, args.directory, dtype, "1" if args.generate else "0"],
                              capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"load in {dtype} failed:\n{proc.stderr[-2000:]}")
        row = json.loads(line[len("RESULT "):])
        row["peak_over_weights"] = round(row["peak_rss_mb"] / row["weights_mb"], 3)
        rows.append(row)
    print(f"{'dtype':6} {'params':>8} {'weights MiB':>12} {'peak RSS MiB':>13} {'ratio':>6} {'load s':>7}")
    for r in rows:
        print(f"{r['dtype']:6} {r['parameters'] / 1e9:7.2f}B {r['weights_mb']:12.0f} {r['peak_rss_mb']:13.0f} "
              f"{r['peak_over_weights']:6.3f} {r['load_s']:7.1f}")
    print(json.dumps({"directory": args.directory, "rows": rows}))


if __name__ == "__main__":
    main()
