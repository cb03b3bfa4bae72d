"""`bard-deploy bench`: the AR baseline and BARD side by side, same backend, same prompts, batch 1.

Per configuration (model x block size x threshold): time to first block (TTFT), per-step latency p50/p90/p99,
the backend's and the host's (the decode loop's own work) time per step, steps per block, tokens per forward,
NFE per token, decode and end-to-end tokens/s (tokens counted up to EOS only), prefill and vision time, peak
memory, exact match; then the speed-up over AR. Configurations are interleaved request by request (prompt 1
through AR and every BARD configuration, then prompt 2, ...), so a slow spell of a shared machine hits every side
of a ratio alike instead of one configuration's whole run. With `repeats` > 1 all of that runs that many times,
and the rows give the median decode tokens/s and speed-up with their min / max. Plus the same AR task through
transformers' own `generate` (what a user would run without us). Outputs: a rich table, a PNG of exact match
vs decode tokens/s, a JSON file, the commit trace (`trace.json`, for `bench-step --replay`), and one JSON line
last on stdout.

The AR baseline always runs on the backend and variant BARD runs on: an export's baseline is the source's
export (`ar_model`), never the torch checkpoint, and a mismatch is refused.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnxruntime
import torch

from bard_deploy.checkpoint import INDEX, WEIGHTS
from bard_deploy.config import load_config, resolve_source
from bard_deploy.data.chat import assistant_text, read_conversations
from bard_deploy.devices import cpu_name, resolve_device, resolve_dtype
from bard_deploy.errors import ConfigError, RuntimeInputError
from bard_deploy.evaluate import synthetic_conversations
from bard_deploy.manifest import Manifest, is_export
from bard_deploy.prompting import PromptEncoder
from bard_deploy.replay import AR as AR_NAME
from bard_deploy.replay import CAUSAL_PREFIX, SPEC_PREFIX, trace_rows
from bard_deploy.runtimes.api import Pipeline, backend_kind, eos_ids_of


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty list."""
    s = sorted(values)
    if not s:
        return 0.0
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass(frozen=True)
class BenchOptions:
    """What `bard-deploy bench` runs: every model x block size x threshold beside the AR baseline, batch 1."""

    models: tuple[Path, ...] = ()              # checkpoint or export directories
    ar_model: Path | None = None               # None: the source recorded in the first model's bard section
    backend: str = "auto"                      # the same for AR and BARD
    variant: str | None = None                 # export decoder variant (fp32, int8); None: the manifest's
    device: str = "cpu"                        # Pipeline.load's device; the transformers baseline follows it
    dtype: str = "fp32"                        # the torch backend's weights; the transformers baseline follows it
    block_sizes: tuple[int, ...] | None = None  # None: each model's trained block size
    thresholds: tuple[float, ...] = (0.9,)
    requests: int = 30                         # timed requests per configuration
    warmup: int = 3                            # untimed requests first
    max_new_tokens: int = 64
    data: Path | None = None                   # a JSONL of messages instead of the synthetic test split
    out: Path | None = None                    # bench.json and bench.png go here (None: <first model's run>/bench)
    transformers_baseline: bool = True         # also time transformers' own generate on the source
    threads: int | None = None                 # the backend's CPU threads (None: the available cores)
    repeats: int = 1                           # runs of every configuration (median and spread reported)
    write: bool = True                         # write bench.json / bench.png
    # also each BARD configuration in lossless speculative mode: "source" (the AR baseline verifies; a SPEC row
    # must equal AR) or "self" (a dual-mode checkpoint verifies its own drafts; beside it the checkpoint's own
    # causal decode, a CAUSAL row, which the SPEC row must equal and is also compared with)
    speculative: str | None = None

    def check(self) -> BenchOptions:
        """A copy with paths as Path; a bad value raises a typed error naming it."""
        if not self.models:
            raise ConfigError("give at least one --model (a checkpoint or export directory)", None)
        resolve_dtype(self.dtype)
        if self.requests <= 0 or self.warmup < 0:
            raise RuntimeInputError(f"--requests must be > 0 and --warmup >= 0, got {self.requests}, "
                                    f"{self.warmup}", self.requests)
        if self.repeats < 1:
            raise RuntimeInputError(f"--repeats must be >= 1, got {self.repeats}", self.repeats)
        if self.speculative not in (None, "source", "self"):
            raise RuntimeInputError(f"--speculative must be source or self, got {self.speculative!r}",
                                    self.speculative)
        models = tuple(Path(m) for m in self.models)
        out = Path(self.out) if self.out is not None else models[0].resolve().parent / "bench"
        return replace(self, models=models, ar_model=None if self.ar_model is None else Path(self.ar_model), out=out)


@dataclass
class Request:
    """What one timed request left behind (from the runtime's Stats)."""

    tokens: int                       # up to and including EOS
    nfe: int
    prefill_s: float
    vision_s: float
    decode_s: float
    step_s: list[float]
    steps_per_block: list[int]
    correct: bool
    backend_s: list[float] = field(default_factory=list)     # the backend's share of each step
    image_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)        # speculative: draft tokens kept per round
    verify_nfe: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0

    @property
    def host_s(self) -> float:
        """Decode wall time outside the backend (the loop's own work: embedding, bias, sampling, commits)."""
        return max(self.decode_s - sum(self.backend_s), 0.0) if self.backend_s else 0.0

    @property
    def ttft_s(self) -> float:
        """Prefill plus the first block's denoising steps (AR: the prefill yields the first token)."""
        first = self.steps_per_block[0] if self.steps_per_block else 0
        return self.prefill_s + sum(self.step_s[:first])


@dataclass
class Summary:
    """The timed requests of one configuration."""

    name: str
    block_size: int | None
    threshold: float | None
    requests: list[Request] = field(default_factory=list)
    peak_rss_mb: float = 0.0

    def as_dict(self) -> dict:
        """The configuration's bench row: accuracy, tokens per forward, latency percentiles, throughput, memory."""
        r = self.requests
        tokens = sum(x.tokens for x in r)
        nfe = sum(x.nfe for x in r)
        decode = sum(x.decode_s for x in r)
        total = sum(x.prefill_s + x.decode_s for x in r)
        steps = [s for x in r for s in x.step_s]
        backend = [s for x in r for s in x.backend_s]
        host = sum(x.host_s for x in r)
        blocks = [b for x in r for b in x.steps_per_block]
        return {
            "name": self.name, "block_size": self.block_size, "threshold": self.threshold, "requests": len(r),
            "exact_match": round(sum(x.correct for x in r) / max(len(r), 1), 4),
            "tokens": tokens, "nfe": nfe,
            "tokens_per_forward": round(tokens / nfe, 3) if nfe else 0.0,
            "nfe_per_token": round(nfe / tokens, 3) if tokens else 0.0,
            "steps_per_block": round(statistics.mean(blocks), 3) if blocks else None,
            "ttft_ms": round(1e3 * statistics.median([x.ttft_s for x in r]), 3) if r else 0.0,
            # None when the steps were not timed one by one (transformers' generate is one call)
            **{f"step_ms_p{q}": round(1e3 * percentile(steps, q), 3) if steps else None for q in (50, 90, 99)},
            # per decode step: the graph alone, and the rest of the decode loop's wall time (None: not timed)
            "backend_ms_per_step": round(1e3 * sum(backend) / len(backend), 3) if backend else None,
            "host_ms_per_step": round(1e3 * host / len(backend), 3) if backend else None,
            "host_fraction": round(host / decode, 4) if backend and decode else None,
            "prefill_ms": round(1e3 * statistics.median([x.prefill_s for x in r]), 3) if r else 0.0,
            "vision_ms": round(1e3 * statistics.median([x.vision_s for x in r]), 3) if r else 0.0,
            "image_tokens": round(statistics.median([x.image_tokens for x in r]), 1) if r else 0,
            "decode_tokens_per_s": round(tokens / decode, 2) if decode else 0.0,
            "e2e_tokens_per_s": round(tokens / total, 2) if total else 0.0,
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            **(self._speculative() if any(x.accepted for x in r) else {}),
        }

    def _speculative(self) -> dict:
        """A speculative configuration's columns: draft tokens kept per round (of the block), rounds, and the
        draft and verify cost per round."""
        r = self.requests
        kept = [k for x in r for k in x.accepted]
        rounds = sum(x.verify_nfe - 1 for x in r)                    # a verify forward per round, + the prefill
        return {"mean_accepted": round(statistics.mean(kept), 3), "rounds": rounds,
                "draft_ms_per_round": round(1e3 * sum(x.draft_s for x in r) / max(rounds, 1), 3),
                "verify_ms_per_round": round(1e3 * sum(x.verify_s for x in r) / max(rounds, 1), 3)}


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter (Linux), so each configuration reports its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB) since the last `reset_peak_rss`."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_configs(configs: list[tuple], convs: list[list[dict]], warmup: int, max_new_tokens: int) -> list[Summary]:
    """Time batch-1 requests of every configuration (pipe, name, ar, options), interleaved request by request;
    the first `warmup` conversations warm every configuration up and are not counted. Peak memory: the whole
    interleaved run's (one process holds every configuration's pipeline)."""
    summaries = []
    for pipe, name, ar, options in configs:
        block = None if ar else options.get("block_size") or pipe.config.bard.block_size
        summaries.append(Summary(name, block, None if ar else options.get("threshold")))
        for conv in convs[:warmup]:
            pipe.generate(messages=conv[:-1], ar=ar, max_new_tokens=max_new_tokens, **options)
    reset_peak_rss()
    for conv in convs[warmup:]:
        for summary, (pipe, _, ar, options) in zip(summaries, configs, strict=True):
            res = pipe.generate(messages=conv[:-1], ar=ar, max_new_tokens=max_new_tokens, **options)
            st = res.stats
            summary.requests.append(Request(st.total_tokens, st.nfe, st.prefill_s, st.vision_s, st.decode_s,
                                            list(st.step_s), list(st.steps_per_block),
                                            res.text == assistant_text(conv[-1]).strip(), list(st.backend_s),
                                            st.image_tokens, list(res.token_ids), list(st.accepted), st.verify_nfe,
                                            st.draft_s, st.verify_s))
    peak = peak_rss_mb()
    for summary in summaries:
        summary.peak_rss_mb = peak
    return summaries


def _hf_model(source_dir: Path, device: torch.device, dtype: torch.dtype):
    """transformers' own model (in `dtype`, on `device`), its tokenizer and our prompt encoder for a source
    checkpoint."""
    # transformers takes ~2 s to import: only commands that use it pay for it (not `bard-deploy --help`)
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer, Qwen2VLImageProcessorPil

    cfg = load_config(source_dir)
    tok = AutoTokenizer.from_pretrained(source_dir, trust_remote_code=False)
    proc = Qwen2VLImageProcessorPil.from_pretrained(source_dir) if cfg.has_vision else None
    auto = AutoModelForImageTextToText if cfg.has_vision else AutoModelForCausalLM
    model = auto.from_pretrained(source_dir, dtype=dtype).eval().to(device)
    return cfg, model, tok, PromptEncoder(tok, proc, cfg.image_token_id, cfg.spatial_merge_size)


def run_transformers(source_dir: Path, convs: list[list[dict]], warmup: int, max_new_tokens: int,
                     device: str = "cpu", dtype: str = "fp32") -> Summary:
    """The AR task through transformers' own greedy `generate` on the source checkpoint, timed the same way
    (the prefill is timed as one separate forward over the prompt, to split prefill from decode), on the
    torch device and in the dtype the runtime rows ran with."""
    dev = resolve_device(device)
    cfg, model, tok, enc = _hf_model(source_dir, dev, resolve_dtype(dtype))
    eos_ids = eos_ids_of(source_dir, tok)
    summary = Summary("transformers generate (AR)", None, None)
    reset_peak_rss()
    for i, conv in enumerate(convs):
        e = enc.encode(conv[:-1])
        ids = torch.tensor([e.input_ids], device=dev)
        kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if e.pixel_values is not None:
            kw.update(pixel_values=e.pixel_values.to(dev), image_grid_thw=e.image_grid_thw.to(dev),
                      mm_token_type_ids=(ids == cfg.image_token_id).int())
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(**kw)
            _sync(dev)
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = model.generate(**kw, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_ids,
                                 pad_token_id=tok.pad_token_id)
            _sync(dev)
            total = time.perf_counter() - t0
        if i < warmup:
            continue
        new = out[0, ids.shape[1]:].tolist()
        cut = next((j for j, t in enumerate(new) if t in eos_ids), None)
        new = new if cut is None else new[:cut + 1]
        text = tok.decode(new, skip_special_tokens=True).strip()
        summary.requests.append(Request(len(new), len(new), prefill, 0.0, max(total - prefill, 1e-9), [], [],
                                        text == assistant_text(conv[-1]).strip()))
    summary.peak_rss_mb = peak_rss_mb()
    return summary


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def header(backend: str, device: str = "cpu", dtype: str = "fp32", threads: dict | None = None,
           variant: str | None = None, repeats: int = 1) -> dict:
    """The settings a bench result was measured under: date, machine, backend, variant, device, threads (the
    policy's backend / host threads), repeats, versions."""
    import transformers

    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": cpu_name(), "cores": os.cpu_count(),
            "backend": backend, "variant": variant, "device": device, "dtype": dtype, "gpu": _gpu_name(device),
            "threads": threads, "repeats": repeats, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def _gpu_name(device: str) -> str | None:
    if device == "cpu" or not torch.cuda.is_available():
        return None
    dev = resolve_device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else None


def plot_curves(rows: list[dict]) -> dict[str, list[tuple]]:
    """The plot's curves: per block size and mode (BARD, and the lossless SPEC rows beside it) the
    (decode tokens/s, exact match %, threshold) points in speed order."""
    curves = {}
    for spec, block in sorted({(r["name"].startswith(SPEC_PREFIX), r["block_size"]) for r in rows
                               if r["block_size"]}):
        curves[f"{'SPEC (lossless)' if spec else 'BARD'} B{block}"] = sorted(
            (r["decode_tokens_per_s"], 100 * r["exact_match"], r["threshold"]) for r in rows
            if r["block_size"] == block and r["name"].startswith(SPEC_PREFIX) == spec)
    return curves


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Exact match vs decode tokens/s: one curve per block size over thresholds, AR points marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    for label, pts in plot_curves(rows).items():
        spec = label.startswith("SPEC")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="s" if spec else "o", ls="--" if spec else "-",
                label=label)
        for x, y, t in pts:
            ax.annotate(f"{t}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    for r in rows:
        if r["block_size"] is None:
            ax.scatter([r["decode_tokens_per_s"]], [100 * r["exact_match"]], marker="*", s=140, zorder=5,
                       label=r["name"])
    ax.set_xlabel("decode tokens / s (batch 1)")
    ax.set_ylabel("exact match (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def bench(opts: BenchOptions, log=print) -> dict:
    """Run every configuration of `opts`; return {"header", "rows"[, "plot"]} and write JSON + PNG to `opts.out`."""
    o = opts.check()
    convs = _conversations(o.data, o.requests + o.warmup)
    load = {"backend": o.backend, "variant": o.variant, "device": o.device, "dtype": o.dtype, "threads": o.threads}
    pipes = [(m, Pipeline.load(m, **load)) for m in o.models]
    ar_model = o.ar_model or recorded_source(o.models[0], pipes[0][1].config)
    ar_pipe = Pipeline.load(ar_model, **load)
    kind, variant = same_backend([(ar_model, ar_pipe)] + pipes)
    torch_device = "cuda" if "tensorrt" in (o.backend, o.device) else o.device   # the GPU the runtime rows used
    log(f"bench: AR baseline {ar_model} ({kind}{f', {variant}' if variant else ''}; threads "
        f"{ar_pipe.threads.backend} backend / {ar_pipe.threads.host} host)")
    configs = [(ar_pipe, AR_NAME, True, {})]
    twin = {}                          # a SPEC configuration's index -> the one its outputs must equal
    for path, pipe in pipes:
        trained = pipe.config.bard.block_size if pipe.config.bard else None
        if o.speculative == "self":
            if pipe.config.bard is None or not pipe.config.bard.dual_mode:
                raise RuntimeInputError(f"--speculative self needs dual-mode checkpoints (train --dual-mode); "
                                        f"{path} is not one", str(path))
            causal = len(configs)
            configs.append((pipe, f"{CAUSAL_PREFIX}{path.name}", True, {}))   # its own causal decode
        for block in o.block_sizes or [trained]:
            for th in o.thresholds:
                configs.append((pipe, f"BARD {path.name}", False, {"block_size": block, "threshold": th,
                                                                   "allow_block_size_mismatch": True}))
                if o.speculative:
                    spec = pipe.with_backend(pipe.backend)
                    if o.speculative == "source":
                        spec.verifier = ar_pipe.backend      # the AR baseline's own backend verifies the drafts
                    twin[len(configs)] = 0 if o.speculative == "source" else causal
                    configs.append((spec, f"{SPEC_PREFIX}{path.name}", False, {
                        "block_size": block, "threshold": th, "allow_block_size_mismatch": True,
                        "speculative": o.speculative}))
    runs: list[list[dict]] = [[] for _ in configs]        # per configuration, one row per repeat
    first: list[Summary] = []                              # the first repeat's requests: the commit trace
    log("bench: " + "; ".join(name + (f" block {opt['block_size']} threshold {opt['threshold']}" if opt else "")
                              for _, name, _, opt in configs) + ", interleaved request by request")
    for rep in range(o.repeats):
        if o.repeats > 1:
            log(f"bench: repeat {rep + 1}/{o.repeats}")
        summaries = run_configs(configs, convs, o.warmup, o.max_new_tokens)
        for i, summary in enumerate(summaries):
            runs[i].append(summary.as_dict())
        first = first or summaries
    rows = merge_repeats(runs)
    mismatches = []
    for i, j in twin.items():      # lossless: every speculative answer is the greedy causal one it verifies with
        summary, ref = first[i], first[j]
        same = [a.token_ids == b.token_ids for a, b in zip(summary.requests, ref.requests, strict=True)]
        rows[i]["identical_to_ar" if j == 0 else "identical_to_causal"] = f"{sum(same)}/{len(same)}"
        if j:
            rows[i]["speedup_decode_vs_causal"] = round(statistics.median(ratios(runs[i], runs[j])), 3)
        if not all(same):
            mismatches.append(f"{summary.name} threshold {summary.threshold}: {len(same) - sum(same)} requests "
                              f"differ from {ref.name}")
    source = _checkpoint_of(ar_model) if o.transformers_baseline else None
    if source is not None:
        log(f"bench: transformers generate on {source}")
        hf = run_transformers(source, convs, o.warmup, o.max_new_tokens, torch_device, o.dtype).as_dict()
        hf["speedup_decode_vs_ar"] = round(hf["decode_tokens_per_s"] / (rows[0]["decode_tokens_per_s"] or 1.0), 3)
        hf["speedup_e2e_vs_ar"] = round(hf["e2e_tokens_per_s"] / (rows[0]["e2e_tokens_per_s"] or 1.0), 3)
        rows.append(hf)
    result = {"header": header(kind, torch_device, o.dtype, ar_pipe.threads.as_dict(), variant, o.repeats),
              "rows": rows}
    if o.write:
        o.out.mkdir(parents=True, exist_ok=True)
        (o.out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
        # what `bench-step --replay` replays at a real shape: per configuration and request, tokens and steps
        trace = {"header": result["header"], "models": [str(m.resolve()) for m in o.models],
                 "configs": trace_rows(first)}
        (o.out / "trace.json").write_text(json.dumps(trace) + "\n")
        title = (f"{kind}{f' {variant}' if variant else ''}, {result['header']['machine']}, batch 1, "
                 f"{o.requests} requests")
        plot(rows, o.out / "bench.png", title)
        result["plot"] = str(o.out / "bench.png")
    if mismatches:
        raise RuntimeInputError("speculative decoding differed from the greedy decode it verifies with (it must not): "
                                + "; ".join(mismatches) + (f" (see {o.out / 'bench.json'})" if o.write else ""),
                                mismatches)
    return result


def merge_repeats(runs: list[list[dict]]) -> list[dict]:
    """One row per configuration from its repeats (runs[0]: the AR baseline's): the median repeat's row (by
    decode tokens/s), the speed-ups over AR computed repeat by repeat (repeat i of a configuration against repeat
    i of AR, which ran just before it) and reported as their median, and every repeat's figures with min / max."""
    ar = runs[0]
    rows = []
    for reps in runs:
        speed, e2e = ratios(reps, ar), ratios(reps, ar, "e2e_tokens_per_s")
        by_speed = sorted(reps, key=lambda r: r["decode_tokens_per_s"])
        row = dict(by_speed[(len(reps) - 1) // 2])            # the lower median: a real run, not an average
        row["speedup_decode_vs_ar"] = round(statistics.median(speed), 3)
        row["speedup_e2e_vs_ar"] = round(statistics.median(e2e), 3)
        if len(reps) > 1:
            tps = [r["decode_tokens_per_s"] for r in reps]
            row["decode_tokens_per_s"] = round(statistics.median(tps), 2)
            row["repeats"] = {"decode_tokens_per_s": tps, "speedup_decode_vs_ar": [round(x, 3) for x in speed],
                              "decode_tokens_per_s_max_over_min": round(max(tps) / max(min(tps), 1e-9), 3),
                              "speedup_max_over_min": round(max(speed) / max(min(speed), 1e-9), 3)}
        rows.append(row)
    return rows


def ratios(reps: list[dict], base: list[dict], key: str = "decode_tokens_per_s") -> list[float]:
    """Repeat i of a configuration over repeat i of `base` (which ran interleaved with it), for `key`."""
    return [r[key] / (b[key] or 1.0) for r, b in zip(reps, base, strict=True)]


def same_backend(pipes: list[tuple[Path, Pipeline]]) -> tuple[str, str | None]:
    """(backend kind, decoder variant or None for torch) shared by every pipeline; a RuntimeInputError naming the
    first one that differs from the AR baseline's (pipes[0]): a ratio across backends or variants measures them,
    not BARD."""
    def what(pipe: Pipeline) -> tuple[str, str | None]:
        return backend_kind(pipe.backend), getattr(pipe.backend, "variant", None)

    base = what(pipes[0][1])
    for path, pipe in pipes[1:]:
        if what(pipe) != base:
            hint = (" (an export's baseline is the AR source's export: bard-deploy export --model SOURCE --out DIR, "
                    "then --ar-model DIR)" if base[0] == "torch" else "")
            raise RuntimeInputError(f"the AR baseline {pipes[0][0]} runs on {'/'.join(filter(None, base))} but "
                                    f"{path} on {'/'.join(filter(None, what(pipe)))}: a speed-up must compare the "
                                    f"same backend and variant{hint}", str(path))
    return base


def recorded_source(model_dir: Path, config) -> Path:
    """The AR source a BARD checkpoint records (--ar-model's default), resolved against the checkpoint directory
    (checkpoints written before lineage paths were relative to it recorded a path relative to the training's
    working directory: that is tried second)."""
    bard = config.bard
    if bard is None or not bard.source_model:
        raise RuntimeInputError(f"no --ar-model given and {model_dir} records no source model", "ar-model")
    found, candidates = resolve_source(model_dir, bard.source_model)
    if found is not None:
        return found
    raise RuntimeInputError(f"{model_dir} records its source as {bard.source_model!r}, which is not a checkpoint "
                            f"(looked at {', '.join(map(str, candidates))}): pass --ar-model", bard.source_model)


def _checkpoint_of(directory: Path) -> Path | None:
    """The checkpoint behind a directory: itself, or the one an export was made from (recorded in its manifest;
    None when it is not there any more)."""
    if (directory / WEIGHTS).is_file() or (directory / INDEX).is_file():
        return directory
    if is_export(directory):
        src = Path(Manifest.read(directory, verify=False).model)
        if (src / "config.json").is_file():
            return src
    return None


def _conversations(data: Path | None, n: int) -> list[list[dict]]:
    """The synthetic test split, or the first n rows of a JSONL of messages."""
    return synthetic_conversations("test", n) if data is None else read_conversations(data, n)
