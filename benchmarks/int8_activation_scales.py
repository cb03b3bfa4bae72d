"""The cost of batch invariance in dynamic INT8: the same decoder step quantized with one activation scale per
tensor (onnxruntime's `quantize_dynamic`: a row's answer depends on the rows beside it) and with one scale per
token (`per_token_activations`, what `export --int8` writes), timed interleaved on random weights at a real shape.

    python benchmarks/int8_activation_scales.py [--shape qwen3-vl-2b] [--layers 4] [--tokens 1,16,32]
        [--batch 1,4] [--past 1024] [--repeats 9] [--threads N]

Prints one row per (batch, T): median milliseconds of each graph (the repeats alternate between the two) and
their ratio, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen3-vl-2b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", default="1,16,32")
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--past", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()

    import shutil

    from bard_deploy import iospec
    from bard_deploy.bench_step import _config, _model, shape_config
    from bard_deploy.calibration.quantize import per_token_activations, quantize_dynamic_lean
    from bard_deploy.converters.onnx_export import export_decoder
    from bard_deploy.runtimes.ort_backend import session, to_numpy
    from bard_deploy.threads import Threads

    dims = shape_config(a.shape)
    cfg = _config(dims, a.layers)
    threads = Threads.policy("onnxruntime", a.threads or None).backend
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = _model(dims, a.layers)
        export_decoder(model, tmp / "fp32.onnx", embeddings="emb.safetensors")
        del model
        quantize_dynamic_lean(tmp / "fp32.onnx", tmp / "tensor.onnx", [], external=True)
        shutil.copy(tmp / "tensor.onnx", tmp / "token.onnx")      # the graph only: both point at one data file
        rewritten = per_token_activations(tmp / "token.onnx")
        sessions = {"per-tensor": session(tmp / "tensor.onnx", threads), "per-token": session(tmp / "token.onnx",
                                                                                              threads)}
        io = iospec.DecoderIO.for_config(cfg)
        for B in [int(x) for x in a.batch.split(",")]:
            for T in [int(x) for x in a.tokens.split(",")]:
                feeds = to_numpy(io.dummy_feeds(batch=B, seq=T, past=a.past))
                times = {k: [] for k in sessions}
                for s in sessions.values():
                    s.run(None, feeds)                                        # warm-up
                for _ in range(a.repeats):
                    for name, s in sessions.items():
                        t0 = time.perf_counter()
                        s.run(None, feeds)
                        times[name].append(time.perf_counter() - t0)
                med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
                rows.append({"batch": B, "T": T, **{f"{k}_ms": round(v, 2) for k, v in med.items()},
                             "ratio": round(med["per-token"] / med["per-tensor"], 3)})
                print(f"B={B} T={T:3d}  per-tensor {med['per-tensor']:8.2f} ms  per-token {med['per-token']:8.2f} ms"
                      f"  ratio {rows[-1]['ratio']:.3f}", flush=True)
    print(json.dumps({"shape": a.shape, "layers": a.layers, "past": a.past, "threads": threads, "repeats": a.repeats,
                      "quantized_inputs_rewritten": rewritten, "rows": rows}))


if __name__ == "__main__":
    main()
