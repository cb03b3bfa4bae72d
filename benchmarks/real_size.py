"""Real-size export on a stand-in: fp32 graphs (+ INT8 and INT4 with their gate on a chat JSONL), with wall time
and peak RSS of the whole command (`/usr/bin/time -v`).

    python benchmarks/real_size.py [--size 2b] [--layers 6] [--variants int8,int4] [--work /tmp/real-size]

Writes the stand-in (bard-deploy standin) and a 40-row chat JSONL of the synthetic task's images and questions
(the gate's data: token agreement with fp32), runs `bard-deploy export`, prints a line and one JSON line. The
weights are random, so by default the gate reports its numbers without failing the export (`--gate enforce`).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from bard_deploy.data.synthetic import make_sample
from bard_deploy.onnx_files import graph_bytes


def chat_jsonl(path: Path, n: int) -> Path:
    """n rows of the synthetic task as the chat JSONL of `train --data` (images as PNG files beside it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            s = make_sample(1000 + i)
            s.image().save(path.parent / f"img{i}.png")
            f.write(json.dumps({"messages": [
                {"role": "user", "content": [{"type": "image", "image": f"img{i}.png"}, {"type": "text",
                                                                                         "text": s.question}]},
                {"role": "assistant", "content": s.answer}]}) + "\n")
    return path


def _tree_rss_kib(pid: int) -> int:
    """VmRSS of a process and all its descendants together, from /proc (0 once it is gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) if "VmRSS" in status else 0
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, AttributeError):
            continue
    return total


def timed(cmd: list[str]) -> dict:
    """Run a command under /usr/bin/time -v; its wall time, exit code, peak RSS of the process itself (time -v:
    the largest single process) and of the whole process tree at once (sampled every 0.2 s from /proc: the
    quantizers run in a child process beside the exporter), and the export's log lines with their times."""
    proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    peak, lines, t0 = [0], [], time.perf_counter()

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss_kib(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in proc.stdout:
        lines.append(line.rstrip())
        if line.startswith(("export:", "error:")):
            print(f"[{time.perf_counter() - t0:7.1f} s, tree {_tree_rss_kib(proc.pid) / 2**20:5.2f} GiB] "
                  f"{line.rstrip()}", flush=True)
    proc.wait()
    sampler.join()
    text = "\n".join(lines)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    parts = [float(x) for x in wall.group(1).split(":")] if wall else [0.0]
    seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    return {"rc": proc.returncode, "wall_s": round(seconds, 1),
            "peak_rss_gib": round(int(rss.group(1)) / 2**20, 2) if rss else None,
            "peak_tree_rss_gib": round(peak[0] / 2**20, 2),
            "log": [ln.strip() for ln in lines if ln.startswith(("export:", "error:"))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--variants", default="int8,int4", help="Comma-separated quantized variants ('' = fp32 only).")
    ap.add_argument("--work", default="/tmp/real-size")
    ap.add_argument("--calibration-samples", type=int, default=8)
    ap.add_argument("--eval-samples", type=int, default=25, help="Evaluation prompts of the gate (each decodes "
                    "64 tokens per variant: the slow part on a CPU).")
    ap.add_argument("--gate", default="measure", choices=("measure", "enforce"),
                    help="measure: the gate reports but cannot fail (random weights make its thresholds "
                         "meaningless); enforce: the export's default thresholds.")
    args = ap.parse_args()
    work = Path(args.work)
    bd = str(Path(sys.executable).with_name("bard-deploy"))
    src = work / f"standin-{args.size}-{args.layers or 'full'}"
    if not (src / "config.json").is_file():
        subprocess.run([bd, "standin", "--size", args.size, "--out", str(src)]
                       + (["--layers", str(args.layers)] if args.layers else []), check=True, capture_output=True)
    data = chat_jsonl(work / "calib" / "rows.jsonl", 40)
    out = work / "export"
    flags = [f"--{v}" for v in args.variants.split(",") if v]
    run = timed([bd, "export", "--model", str(src), "--out", str(out), "--force", "--calib-data", str(data),
                 "--calibration-samples", str(args.calibration_samples), "--eval-samples", str(args.eval_samples),
                 *flags, *(["--gate-top1", "0", "--gate-token-agreement", "0"] if args.gate == "measure" else [])])
    result = {"size": args.size, "layers": args.layers, "variants": flags, **run}
    if run["rc"] == 0:
        m = json.loads((out / "manifest.json").read_text())
        result["graphs_mib"] = {v: round(graph_bytes(out / g) / 2**20, 1) for v, g in m["graphs"]["decoder"].items()}
        result["gates"] = {v: m[v] for v in ("int8", "int4") if m.get(v)}
    print(f"stand-in {args.size} ({args.layers or 'all'} layers), export {' '.join(flags) or 'fp32'}: rc {run['rc']}, "
          f"{run['wall_s']} s, peak RSS {run['peak_rss_gib']} GiB (process tree {run['peak_tree_rss_gib']} GiB), "
          f"graphs {result.get('graphs_mib')}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
