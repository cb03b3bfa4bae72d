"""`bard-deploy bench-step`: one decoder step at real model shapes with random weights, T = 1..32 tokens over
a past of P tokens, on torch fp32, onnxruntime fp32, INT8 and INT4 (MatMulNBits, blocks of 32).

A full 2B decoder does not fit the ONNX protobuf limit and takes long to export, so the step is timed for two
layer counts (K1 < K2, lm_head included) and extrapolated linearly to the real depth: t(L) = t(K1) +
(L - K1) * (t(K2) - t(K1)) / (K2 - K1). The output says so. Weight bytes read per step (layers + lm_head) over
the step time gives the achieved bandwidth: the memory-bound regime, where T tokens cost about what 1 costs.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bard_deploy import iospec
from bard_deploy.calibration.quantize import quantize, quantize_int4
from bard_deploy.config import ModelConfig
from bard_deploy.converters.onnx_export import export_decoder
from bard_deploy.diffusion.mask import NOISY, response_layout
from bard_deploy.errors import ConfigError
from bard_deploy.replay import PHOTO_PROMPT_TOKENS, read_trace, replay
from bard_deploy.runtimes.backend import TorchBackend
from bard_deploy.runtimes.decode import Session, Stats
from bard_deploy.runtimes.ort_backend import OrtBackend, to_numpy
from bard_deploy.threads import Threads
from bard_deploy.vlm import BardVLM

SHAPES = {
    # the text decoders of Qwen3-VL-2B / 4B (tied embeddings, vocab 151936)
    "qwen3-vl-2b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                        head_dim=128, intermediate_size=6144),
    "qwen3-vl-4b": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=128, intermediate_size=9728),
}


BACKENDS = ("torch", "onnxruntime-fp32", "onnxruntime-int8", "onnxruntime-int4")
DEFAULT_BACKENDS = BACKENDS[:3]
# bytes a step reads per weight (int4: + an fp16 scale per block of 32)
BYTES_PER_WEIGHT = {"torch": 4.0, "onnxruntime-fp32": 4.0, "onnxruntime-int8": 1.0, "onnxruntime-int4": 0.5 + 2 / 32}


@dataclass(frozen=True)
class StepOptions:
    """What `bard-deploy bench-step` times."""

    shape: str = "qwen3-vl-2b"                     # a name of SHAPES or a config.json
    tokens: tuple[int, ...] = (1, 4, 8, 16, 32)    # tokens per step (T)
    past: int = 512                                # cached tokens before the step
    layers_subset: tuple[int, int] = (1, 4)        # the two layer counts timed and extrapolated
    repeats: int = 7                               # the median of this many timings per point
    backends: tuple[str, ...] = DEFAULT_BACKENDS
    out: Path | None = Path("runs/bench")          # bench_step.json goes here (None: not written)
    full_depth: bool = False                       # time the real depth (its graph exports: external data)
    int4_accuracy_level: int = 0                   # MatMulNBits compute type (0 unset, 1 fp32 ... 4 int8)
    threads: int | None = None                     # the backend's threads (None: the available cores)
    loop: bool = False                             # also the decode loop's step against the bare graph's
    replay: Path | None = None                     # a bench trace.json to replay AR against BARD with
    replay_threshold: float | None = None          # its BARD configuration (None: the only one)
    prompt_tokens: int = PHOTO_PROMPT_TOKENS       # the replayed requests' prompt
    replay_requests: int | None = None             # replay the first this many requests (None: all)

    def check(self) -> StepOptions:
        """A typed error naming a bad value."""
        k1, k2 = self.layers_subset if len(self.layers_subset) == 2 else (0, 0)
        if len(self.layers_subset) != 2 or not 0 < k1 < k2:
            raise ConfigError(f"--layers-subset needs two increasing layer counts, got {list(self.layers_subset)}",
                              "layers-subset")
        unknown = sorted(set(self.backends) - set(BACKENDS))
        if unknown:
            raise ConfigError(f"unknown step backend {unknown[0]!r} (choose from {', '.join(BACKENDS)})", unknown[0])
        if self.int4_accuracy_level not in range(5):
            raise ConfigError(f"--int4-accuracy-level must be 0..4, got {self.int4_accuracy_level}",
                              self.int4_accuracy_level)
        shape_config(self.shape)
        if self.replay is not None:
            if not any(b.startswith("onnxruntime") for b in self.backends):
                raise ConfigError("--replay runs on the onnxruntime variants: add one to --backends", "replay")
            read_trace(self.replay, self.replay_threshold)
        if self.prompt_tokens < 1:
            raise ConfigError(f"--prompt-tokens must be >= 1, got {self.prompt_tokens}", self.prompt_tokens)
        return self


def shape_config(shape: str) -> dict:
    """The text decoder's dimensions of a named shape or of a config.json (flat or with text_config)."""
    if shape in SHAPES:
        return {**SHAPES[shape], "vocab_size": 151936}
    path = Path(shape)
    if not path.is_file():
        raise ConfigError(f"--shape must be one of {tuple(SHAPES)} or a config.json, got {shape!r}", shape)
    d = json.loads(path.read_text())
    t = d.get("text_config", d)
    return {k: t[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                              "intermediate_size", "vocab_size")} | {"head_dim": t.get("head_dim", t["hidden_size"]
                                                                                       // t["num_attention_heads"])}


def _model(dims: dict, layers: int) -> BardVLM:
    torch.manual_seed(0)
    return BardVLM(_config(dims, layers)).eval()


def _config(dims: dict, layers: int) -> ModelConfig:
    return ModelConfig.from_dict({"model_type": "qwen3", **dims, "num_hidden_layers": layers,
                                  "tie_word_embeddings": True, "max_position_embeddings": 40960})


def _feeds(config: ModelConfig, T: int, past: int) -> dict[str, torch.Tensor]:
    return iospec.DecoderIO.for_config(config).dummy_feeds(batch=1, seq=T, past=past)


def _time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def weight_bytes(dims: dict, layers: int, bytes_per_weight: float = 4.0) -> float:
    """Bytes of decoder-layer and lm_head weights one step reads."""
    h, f, hd = dims["hidden_size"], dims["intermediate_size"], dims["head_dim"]
    per_layer = h * hd * (2 * dims["num_attention_heads"] + 2 * dims["num_key_value_heads"]) + 3 * h * f
    return (layers * per_layer + h * dims["vocab_size"]) * bytes_per_weight


def step_rows(raw: dict, backends: list[str], tokens: list[int], ks: tuple[int, ...], layers: int, past: int,
              dims: dict) -> list[dict]:
    """Rows of the step table from the medians `raw[backend, k, T]` (seconds) timed at k1 and k2 layers,
    extrapolated linearly to `layers` (or timed at `layers` itself: ks = (layers,))."""
    k1, k2 = ks if len(ks) == 2 else (ks[0], ks[0])
    L = layers
    rows = []
    for b in backends:
        for T in tokens:
            t1, t2 = raw[b, k1, T], raw[b, k2, T]
            t = t1 if k1 == k2 == L else t1 + (L - k1) * (t2 - t1) / (k2 - k1)
            bpw = BYTES_PER_WEIGHT.get(b, 4.0)
            # more layers must cost more, and the extrapolation must be positive; if not, timing noise swamped
            # the slope and the row means nothing
            rows.append({"backend": b, "T": T, "past": past, "reliable": (t2 > t1 or k1 == k2) and t > 0,
                         f"ms_measured_{k1}_layers": round(1e3 * t1, 2), f"ms_measured_{k2}_layers": round(1e3 * t2, 2),
                         "ms_per_step": round(1e3 * t, 2),
                         "ms_per_token": round(1e3 * t / T, 3),
                         "weight_GBps": round(weight_bytes(dims, L, bpw) / t / 1e9, 1) if t > 0 else None})
    for b in backends:
        one = next((r for r in rows if r["backend"] == b and r["T"] == 1), None)
        for r in rows:
            if r["backend"] == b:
                # no T = 1 row, or a time <= 0 (noise): no ratio
                ok = one is not None and r["ms_per_step"] > 0 and one["ms_per_step"] > 0
                r["cost_vs_T1"] = round(r["ms_per_step"] / one["ms_per_step"], 2) if ok else None
    return rows


def step_bench(opts: StepOptions = StepOptions(), log=print) -> dict:
    """Time the step for each backend and T; extrapolate to the shape's depth. Returns rows + notes, and writes
    them as JSON to `opts.out`."""
    o = opts.check()
    dims = shape_config(o.shape)
    L = dims["num_hidden_layers"]
    subset = (L,) if o.full_depth else o.layers_subset
    need = weight_bytes(dims, max(subset)) * 2.2 / 2**30   # torch or ORT fp32 (+ its optimised copy), roughly
    how = f"timing all {L}" if o.full_depth else f"timing {subset[0]} and {subset[1]} layers and extrapolating to {L}"
    log(f"bench-step: {o.shape}, {L} layers, {how} (+ lm_head); needs about {need:.1f} GiB of memory")
    raw: dict[tuple[str, int, int], float] = {}
    extra: dict[str, list[dict]] = {"loop": [], "replay": []}
    with tempfile.TemporaryDirectory() as tmp:
        for k in subset:
            raw.update(_time_layers(o, dims, k, Path(tmp), extra, replay_here=k == max(subset)))
    rows = step_rows(raw, list(o.backends), list(o.tokens), subset, L, o.past, dims)
    how = (f"timed at full depth ({L} layers)" if o.full_depth else
           f"timed {subset[0]} and {subset[1]} layers with lm_head, extrapolated linearly to {L} layers")
    note = (f"{how}; random weights; batch 1; past {o.past}; median of {o.repeats}; "
            f"{Threads.policy('onnxruntime', o.threads).backend} threads")
    res = {"shape": o.shape, "dims": dims, "rows": rows, "note": note}
    if o.loop:
        res["loop"] = extra["loop"]
    if o.replay is not None:
        res["replay"] = extra["replay"]
        res["replay_note"] = (f"a REPLAY at the {o.shape} shape ({max(subset)} layers, random weights): the step and "
                              f"commit sequence of {o.replay} (threshold {o.replay_threshold}) run through the decode "
                              f"loop after a {o.prompt_tokens}-token prompt; tokens are not decoded")
    if o.out is not None:
        o.out.mkdir(parents=True, exist_ok=True)
        (o.out / "bench_step.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def _time_layers(o: StepOptions, dims: dict, k: int, tmp: Path, results: dict, replay_here: bool
                 ) -> dict[tuple[str, int, int], float]:
    """Median step times {(backend, k, T): seconds} of a k-layer decoder on every backend of `o`; the loop's step
    against the bare graph (`o.loop`) and the replay (`o.replay`, where `replay_here`: the deepest layer count)
    go to results["loop"] / results["replay"]."""
    raw = {}
    loops, replays = results["loop"], results["replay"]
    model = _model(dims, k)
    threads = Threads.policy("onnxruntime", o.threads).backend      # the same count for every backend
    torch.set_num_threads(threads)
    if "torch" in o.backends:
        reference = TorchBackend(model)
        for T in o.tokens:
            f = _feeds(model.config, T, o.past)
            raw["torch", k, T] = _time(lambda f=f, b=reference: b.step(f), o.repeats)
        del reference
    fp32 = tmp / f"k{k}.onnx"
    if any(b.startswith("onnxruntime") for b in o.backends):
        export_decoder(model, fp32, embeddings=f"k{k}.embeddings.safetensors")
    del model                               # the torch weights go before the quantizers load the graph
    variants = []
    if "onnxruntime-fp32" in o.backends:
        variants.append(("onnxruntime-fp32", fp32))
    if "onnxruntime-int8" in o.backends:
        int8 = tmp / f"k{k}.int8.onnx"
        quantize(fp32, int8, "cpu", None, [])
        variants.append(("onnxruntime-int8", int8))
    if "onnxruntime-int4" in o.backends:
        int4 = tmp / f"k{k}.int4.onnx"
        quantize_int4(fp32, int4, block_size=32, accuracy_level=o.int4_accuracy_level)
        variants.append(("onnxruntime-int4", int4))
    for name, path in variants:
        backend = OrtBackend.for_graph(path, _config(dims, k), tmp / f"k{k}.embeddings.safetensors", threads)
        sess = backend.decoder
        outs = [x.name for x in sess.get_outputs()]
        for T in o.tokens:
            f = to_numpy(_feeds(_config(dims, k), T, o.past))
            raw[name, k, T] = _time(lambda f=f, s=sess, n=outs: s.run(n, f), o.repeats)
        if o.loop:
            for T in o.tokens:
                loops.append({"backend": name, "layers": k, **loop_vs_bare(backend, T, o.past, o.repeats)})
        if o.replay is not None and replay_here:
            ar, bard, spec = read_trace(o.replay, o.replay_threshold)
            replays.append({"backend": name, "layers": k, "trace": str(o.replay),
                            **replay(backend, ar, bard, o.prompt_tokens, o.replay_requests,
                                     weight_bytes(dims, k, BYTES_PER_WEIGHT[name]), spec)})
        del backend, sess
    return raw


def loop_vs_bare(backend: OrtBackend, T: int, past: int, repeats: int) -> dict:
    """The decode loop's step (`Session.step`: embedding lookup, attention bias, IO-bound feeds over the chunked KV
    buffer, the greedy outputs) against the bare graph run on dense numpy feeds of the same shape asking for the
    same outputs: median ms of each, and the loop's overhead. A fresh layout per step: the bias is built every
    time (the first step of a block; later ones reuse it)."""
    session = Session.with_past(backend, past, T, Stats())
    names = session.outputs or backend.io.output_names
    bare = to_numpy(backend.io.feeds(*_bare_inputs(backend.io, T, past)))
    tokens = torch.zeros(1, T, dtype=torch.long)
    runs = {"bare": lambda: backend.decoder.run(names, bare),
            "loop": lambda: session.step(tokens, response_layout(1, session.start, 0, T, T, NOISY), keep=T)}
    times: dict[str, list[float]] = {"bare": [], "loop": []}
    for fn in runs.values():
        fn()                                                     # warm-up
    for _ in range(repeats):                                     # interleaved: drift hits both alike
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    t_bare, t_loop = (statistics.median(times[n]) for n in ("bare", "loop"))
    return {"T": T, "past": past, "cache_columns": session.cache.capacity, "bare_ms": round(1e3 * t_bare, 2),
            "loop_ms": round(1e3 * t_loop, 2), "loop_over_bare": round(t_loop / t_bare - 1, 4),
            "repeats": repeats}


def _bare_inputs(io: iospec.DecoderIO, T: int, past: int):
    """Dense step inputs at (T, past): random embeddings and past, positions after the past, nothing hidden."""
    f = io.dummy_feeds(batch=1, seq=T, past=past)
    x, pos, bias, kv, _, _ = io.unpack_feeds(f)
    return x, pos, bias, kv, None, T
