"""The CUDA paths in one prepared run, for a lent GPU machine (issue "GPU"): <= 8 minutes on an H200.

    python benchmarks/gpu_check.py --out $OUT            # on the GPU machine
    python benchmarks/gpu_check.py --dry-run --out DIR   # anywhere: CPU, tiny sizes, a few steps (CI runs this)

Sections (each one timed; a failing section is reported and the next one runs), then one JSON file
`gpu_check.json` in --out and its summary as the last line on stdout:
  1. tests     the `gpu`-marked tests (dry run: collected only)
  2. train     the embedded default's B4 stage (random-initialised parent) for 300 steps on CUDA (bf16 autocast,
               FlexAttention block masks) and on the CPU (fp32, SDPA), same seed and data: the two loss curves,
               smoothed, and their largest relative gap over the second half (target <= 2 %)
  3. decode    that trained B4 checkpoint decoded on CUDA (fp32) and on the CPU: tokens must be equal
  4. timing    one decoder step of a Qwen3-VL-2B-shaped text decoder (28 layers, random bf16 weights, past 512):
               AR T=1, BARD T=16 and T=32, eager and replayed as CUDA graphs (static shapes: one graph per T);
               weight bandwidth against the H200's ~4.3 TB/s (target >= 25 % for AR T=1 with graphs); and a replayed
               B16 decode (a commit trace of steps per block: the first step of each later block is T=32, finished
               block + canvas; the others T=16) against AR, tokens/s ratio at the same settings (target >= 3x)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bard_deploy import iospec
from bard_deploy.bench_step import SHAPES, weight_bytes
from bard_deploy.config import ModelConfig
from bard_deploy.data.collate import collate_diffusion
from bard_deploy.data.tokenizer import build_image_processor, build_tokenizer
from bard_deploy.embedded import embedded_config, save_checkpoint
from bard_deploy.evaluate import synthetic_conversations
from bard_deploy.prompting import PromptEncoder
from bard_deploy.runtimes.api import Pipeline
from bard_deploy.train.loop import Schedule, Trainer
from bard_deploy.train.objective import LossSetup, bard_loss, text_token_ids
from bard_deploy.train.source import synthetic_examples
from bard_deploy.vlm import BardVLM

ROOT = Path(__file__).resolve().parent.parent
H200_TBPS = 4.3
# steps per block of a B16 decode: mean 1.30, the B16 threshold-0.9 row of the README's onnxruntime benchmark
B16_TRACE = (2, 1, 1, 1, 2, 1, 1, 2, 1, 1)


def section(results: dict, name: str, fn, *args) -> None:
    """Run one section; its result, or its error, and its wall time go into results[name]."""
    t0 = time.perf_counter()
    try:
        out = fn(*args)
    except Exception as e:          # a prepared run reports every section: one failure must not hide the rest
        out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    results[name] = out
    print(f"[{name}] {json.dumps(out)[:400]}", flush=True)


# ---- 1. the gpu-marked tests -----------------------------------------------------------------------------

def gpu_tests(dry: bool) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(ROOT / "tests")]
    proc = subprocess.run(cmd + (["--co"] if dry else []), capture_output=True, text=True, cwd=ROOT, timeout=300)
    tail = proc.stdout.strip().splitlines()[-1:] or [""]
    return {"ok": proc.returncode == 0, "rc": proc.returncode, "summary": tail[0], "collected_only": dry}


# ---- 2. training on CUDA vs CPU --------------------------------------------------------------------------

def _trainer(device: str, precision: str, work: Path, steps: int, samples: int, hidden: int, layers: int):
    tok = build_tokenizer()
    cfg = embedded_config(tok, hidden=hidden, layers=layers)
    cfg = cfg.with_bard(mask_token_id=tok.convert_tokens_to_ids("<|mask|>"), block_size=4)
    enc = PromptEncoder(tok, build_image_processor(), cfg.image_token_id, cfg.spatial_merge_size)
    examples = synthetic_examples(enc, "train", samples, 256)
    torch.manual_seed(0)
    model = BardVLM(cfg)
    setup = LossSetup("mask", cfg.bard.mask_token_id, text_token_ids(tok), 0.05, 20.0, "causal")
    if device.startswith("cuda"):
        setup = LossSetup(setup.noise, setup.mask_id, setup.text_tokens.to(device), setup.t_min, setup.weight_cap,
                          setup.prompt_attention)
    sched = Schedule(steps=steps, lr=1e-3, batch_size=32, micro_batch=16, warmup=min(20, steps // 5))
    return Trainer(model, sched, examples, lambda ex: collate_diffusion(ex, cfg, 4, tok.pad_token_id,
                                                                         tok.eos_token_id),
                   bard_loss(setup), work, seed=0, progress=False, device=device, precision=precision,
                   length=lambda ex: ex.num_tokens)


def _smooth(xs: list[float], k: int = 10) -> list[float]:
    return [statistics.mean(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


def train(device: str, dry: bool, work: Path) -> dict:
    steps, samples, hidden, layers = (6, 64, 32, 2) if dry else (300, 4000, 128, 4)
    curves = {}
    runs = (("device", device, "bf16" if device.startswith("cuda") else "fp32"), ("cpu", "cpu", "fp32"))
    for label, dev, precision in runs:       # a dry run trains twice on the CPU: the curves must then be equal
        trainer = _trainer(dev, precision, work / f"train-{label}", steps, samples, hidden, layers)
        curves[label] = [h["loss"] for h in trainer.run()]
        if label == "cpu":                    # the checkpoint the decode section reads
            model = trainer.model.cpu()
            save_checkpoint(model, work / "b4", config=model.config)
    a, b = _smooth(curves["device"]), _smooth(curves["cpu"])
    gaps = [abs(x - y) / y for x, y in zip(a, b, strict=True)][len(a) // 2:]
    return {"ok": max(gaps) <= 0.02, "steps": steps, "max_relative_gap_second_half": round(max(gaps), 4),
            "final_loss": {k: round(v[-1], 4) for k, v in curves.items()}, "target": "<= 0.02",
            "curves_every_10": {k: [round(x, 4) for x in v[::10]] for k, v in curves.items()}}


# ---- 3. decoding on CUDA vs CPU ---------------------------------------------------------------------------

def decode(device: str, work: Path, prompts: int) -> dict:
    convs = [c[:-1] for c in synthetic_conversations("test", prompts)]
    tokens = {}
    for dev in (device, "cpu"):
        pipe = Pipeline.load(work / "b4", device=dev)
        tokens[dev] = [r.token_ids for r in (pipe.generate_batch([c], max_new_tokens=32, threshold=0.9)[0]
                                             for c in convs)]
    same = sum(a == b for a, b in zip(tokens[device], tokens["cpu"], strict=True))
    return {"ok": same == len(convs), "prompts": len(convs), "equal": same}


# ---- 4. step timing at the 2B shape -----------------------------------------------------------------------

def _median_ms(fn, sync, repeats: int) -> float:
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _step_fns(model: BardVLM, io: iospec.DecoderIO, T: int, past: int, device: torch.device, dtype: torch.dtype,
              graphs: bool):
    """A callable running one step with static inputs of T tokens over `past`; replayed as a CUDA graph when
    `graphs` (the static inputs are captured once; a replay only launches)."""
    feeds = {k: (v.to(dtype) if v.is_floating_point() else v).to(device)
             for k, v in io.dummy_feeds(1, T, past).items()}
    args = io.unpack_feeds(feeds)

    def eager():
        with torch.inference_mode():
            return model.step(*args)

    if not graphs:
        return eager
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            eager()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        model.step(*args)
    return graph.replay


def timing(device: str, dry: bool) -> dict:
    dev = torch.device(device)
    dims = ({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 16, "intermediate_size": 128, "vocab_size": 512} if dry
            else {**SHAPES["qwen3-vl-2b"], "vocab_size": 151936})
    past, repeats = (16, 3) if dry else (512, 20)
    dtype = torch.bfloat16
    cfg = ModelConfig.from_dict({"model_type": "qwen3", **dims, "tie_word_embeddings": True,
                                 "max_position_embeddings": 40960})
    with torch.device(dev):
        torch.manual_seed(0)
        model = BardVLM(cfg).to(dtype).eval()
    io = iospec.DecoderIO.for_config(cfg)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    modes = ["eager"] + (["cuda_graphs"] if dev.type == "cuda" else [])
    ms = {m: {T: _median_ms(_step_fns(model, io, T, past, dev, dtype, m == "cuda_graphs"), sync, repeats)
              for T in (1, 16, 32)} for m in modes}
    gbytes = weight_bytes(dims, dims["num_hidden_layers"], 2.0) / 1e9
    out: dict = {"shape": "qwen3-vl-2b" if not dry else "tiny", "dtype": "bf16", "past": past,
                 "ms_per_step": {m: {str(T): round(v, 3) for T, v in d.items()} for m, d in ms.items()},
                 "weights_gb": round(gbytes, 3), "trace_steps_per_block": list(B16_TRACE)}
    for m, d in ms.items():
        ar_tps = 1e3 / d[1]
        blocks = len(B16_TRACE)
        # block 0: its steps are T=16; every later block's first step carries the finished block (T=32)
        bard_ms = sum((d[16] if b == 0 else d[32]) + (s - 1) * d[16] for b, s in enumerate(B16_TRACE))
        bard_tps = 1e3 * 16 * blocks / bard_ms
        out[m] = {"ar_tokens_per_s": round(ar_tps, 1), "bard_b16_tokens_per_s": round(bard_tps, 1),
                  "bard_vs_ar": round(bard_tps / ar_tps, 2),
                  "ar_weight_tbps": round(gbytes / (d[1] / 1e3) / 1e3, 3)}
        out[m]["ar_fraction_of_h200_bandwidth"] = round(out[m]["ar_weight_tbps"] / H200_TBPS, 3)
    best = out.get("cuda_graphs", out["eager"])
    out["ok"] = dry or (best["ar_fraction_of_h200_bandwidth"] >= 0.25 and best["bard_vs_ar"] >= 3)
    if dev.type != "cuda":
        out["cuda_graphs"] = "skipped: no CUDA device"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu-check"))
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, a few steps: checks the script.")
    args = ap.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (use --dry-run to check the script on a CPU)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "dry_run": args.dry_run,
                     "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
                     "torch": torch.__version__, "cuda": torch.version.cuda}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        section(results, "tests", gpu_tests, args.dry_run)
        section(results, "train", train, device, args.dry_run, work)
        section(results, "decode", decode, device, work, 4 if args.dry_run else 16)
        section(results, "timing", timing, device, args.dry_run)
    results["ok"] = all(results[s].get("ok") for s in ("tests", "train", "decode", "timing"))
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: (v.get("ok") if isinstance(v, dict) else v) for k, v in results.items()}))


if __name__ == "__main__":
    main()
