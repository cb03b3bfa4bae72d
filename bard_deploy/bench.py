"""`bard-deploy bench`: the AR baseline and BARD side by side, same backend, same prompts, batch 1.

Per configuration (model x block size x threshold): time to first block (TTFT), per-step latency p50/p90/p99,
steps per block, tokens per forward, NFE per token, decode and end-to-end tokens/s (tokens counted up to EOS
only), prefill and vision time, peak memory, exact match; then the speed-up over AR. Plus the same AR task
through transformers' own `generate` (what a user would run without us). Outputs: a rich table, a PNG of
exact match vs decode tokens/s, a JSON file, and one JSON line last on stdout.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bard_deploy.errors import RuntimeInputError


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty list."""
    s = sorted(values)
    if not s:
        return 0.0
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


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

    @property
    def ttft_s(self) -> float:
        """Prefill plus the first block's denoising steps (AR: the prefill yields the first token)."""
        first = self.steps_per_block[0] if self.steps_per_block else 0
        return self.prefill_s + sum(self.step_s[:first])


@dataclass
class Summary:
    name: str
    block_size: int | None
    threshold: float | None
    requests: list[Request] = field(default_factory=list)
    peak_rss_mb: float = 0.0

    def as_dict(self) -> dict:
        r = self.requests
        tokens = sum(x.tokens for x in r)
        nfe = sum(x.nfe for x in r)
        decode = sum(x.decode_s for x in r)
        total = sum(x.prefill_s + x.decode_s for x in r)
        steps = [s for x in r for s in x.step_s]
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
            "prefill_ms": round(1e3 * statistics.median([x.prefill_s for x in r]), 3) if r else 0.0,
            "vision_ms": round(1e3 * statistics.median([x.vision_s for x in r]), 3) if r else 0.0,
            "decode_tokens_per_s": round(tokens / decode, 2) if decode else 0.0,
            "e2e_tokens_per_s": round(tokens / total, 2) if total else 0.0,
            "peak_rss_mb": round(self.peak_rss_mb, 1),
        }


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter (Linux), so each configuration reports its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_config(pipe, convs: list[list[dict]], name: str, ar: bool, warmup: int, **options) -> Summary:
    """Time batch-1 requests of one configuration (the first `warmup` conversations are not counted)."""
    from bard_deploy.data.chat import assistant_text

    block = None if ar else options.get("block_size") or pipe.config.bard.block_size
    summary = Summary(name, block, None if ar else options.get("threshold"))
    for conv in convs[:warmup]:
        pipe.generate(messages=conv[:-1], ar=ar, **options)
    reset_peak_rss()
    for conv in convs[warmup:]:
        res = pipe.generate(messages=conv[:-1], ar=ar, **options)
        st = res.stats
        summary.requests.append(Request(st.total_tokens, st.nfe, st.prefill_s, st.vision_s, st.decode_s,
                                        list(st.step_s), list(st.steps_per_block),
                                        res.text == assistant_text(conv[-1]).strip()))
    summary.peak_rss_mb = peak_rss_mb()
    return summary


def run_transformers(source_dir: Path, convs: list[list[dict]], warmup: int, max_new_tokens: int,
                     device: str = "cpu") -> Summary:
    """The AR task through transformers' own greedy `generate` on the source checkpoint, timed the same way
    (the prefill is timed as one separate forward over the prompt, to split prefill from decode), on the
    torch device the runtime rows ran on."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer, Qwen2VLImageProcessorPil

    from bard_deploy.config import load_config
    from bard_deploy.data.chat import assistant_text
    from bard_deploy.devices import resolve_device
    from bard_deploy.prompting import PromptEncoder

    cfg = load_config(source_dir)
    tok = AutoTokenizer.from_pretrained(source_dir, trust_remote_code=False)
    proc = Qwen2VLImageProcessorPil.from_pretrained(source_dir) if cfg.has_vision else None
    if cfg.has_vision:
        model = AutoModelForImageTextToText.from_pretrained(source_dir, dtype=torch.float32).eval()
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    dev = resolve_device(device)
    model.to(dev)
    enc = PromptEncoder(tok, proc, cfg.image_token_id, cfg.spatial_merge_size)
    from bard_deploy.runtimes.api import eos_ids_of

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


def header(backend: str, device: str = "cpu") -> dict:
    import onnxruntime
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": cpu, "cores": os.cpu_count(),
            "backend": backend, "device": device, "gpu": _gpu_name(device),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def _gpu_name(device: str) -> str | None:
    if device == "cpu" or not torch.cuda.is_available():
        return None
    from bard_deploy.devices import resolve_device

    dev = resolve_device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else None


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Exact match vs decode tokens/s: one curve per block size over thresholds, AR points marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    for block in sorted({r["block_size"] for r in rows if r["block_size"]}):
        pts = sorted((r["decode_tokens_per_s"], 100 * r["exact_match"], r["threshold"]) for r in rows
                     if r["block_size"] == block)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"BARD B{block}")
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


def bench(models: list[Path], ar_model: Path | None, backend: str = "auto", variant: str | None = None,
          block_sizes: list[int] | None = None, thresholds: list[float] = (0.9,), requests: int = 30,
          warmup: int = 3, max_new_tokens: int = 64, data: Path | None = None, out: Path | None = None,
          transformers_baseline: bool = True, device: str = "cpu", log=print) -> dict:
    """Run every configuration; return {"header", "rows"} and write JSON + PNG next to `out`.

    device: where the runtimes run (Pipeline.load's `device`); the transformers baseline follows it."""
    from bard_deploy.runtimes.api import Pipeline

    if requests <= 0 or warmup < 0:
        raise RuntimeInputError(f"--requests must be > 0 and --warmup >= 0, got {requests}, {warmup}", requests)
    convs = _conversations(data, requests + warmup)
    pipes = [(m, Pipeline.load(m, backend=backend, variant=variant, device=device)) for m in models]
    if ar_model is None:
        bard = pipes[0][1].config.bard
        if bard is None or not bard.source_model:
            raise RuntimeInputError("no --ar-model given and the checkpoint records no source model", "ar-model")
        ar_model = Path(bard.source_model)
    rows: list[dict] = []
    ar_pipe = Pipeline.load(ar_model, backend=backend, variant=variant, device=device)
    torch_device = "cuda" if "tensorrt" in (backend, device) else device   # the GPU the runtime rows used
    kind = type(ar_pipe.backend).__name__
    log(f"bench: AR baseline {ar_model} ({kind})")
    rows.append(run_config(ar_pipe, convs, "AR baseline", True, warmup, max_new_tokens=max_new_tokens).as_dict())
    for path, pipe in pipes:
        trained = pipe.config.bard.block_size if pipe.config.bard else None
        for block in block_sizes or [trained]:
            for th in thresholds:
                name = f"BARD {path.name}"
                log(f"bench: {name} block {block} threshold {th}")
                s = run_config(pipe, convs, name, False, warmup, block_size=block, threshold=th,
                               max_new_tokens=max_new_tokens, allow_block_size_mismatch=True)
                rows.append(s.as_dict())
    if transformers_baseline:
        source = ar_model if (ar_model / "model.safetensors").is_file() or (
            ar_model / "model.safetensors.index.json").is_file() else _source_of_export(ar_model)
        if source is not None:
            log(f"bench: transformers generate on {source}")
            rows.append(run_transformers(source, convs, warmup, max_new_tokens, torch_device).as_dict())
    base = rows[0]["decode_tokens_per_s"] or 1.0
    base_e2e = rows[0]["e2e_tokens_per_s"] or 1.0
    for r in rows:
        r["speedup_decode_vs_ar"] = round(r["decode_tokens_per_s"] / base, 3)
        r["speedup_e2e_vs_ar"] = round(r["e2e_tokens_per_s"] / base_e2e, 3)
    result = {"header": header(kind, torch_device), "rows": rows}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
        plot(rows, out / "bench.png", f"{kind}, {result['header']['machine']}, batch 1, {requests} requests")
        result["plot"] = str(out / "bench.png")
    return result


def _source_of_export(directory: Path) -> Path | None:
    """The checkpoint an export directory was made from (recorded in its manifest)."""
    m = directory / "manifest.json"
    if m.is_file():
        src = Path(json.loads(m.read_text()).get("model", ""))
        if (src / "config.json").is_file():
            return src
    return None


def _conversations(data: Path | None, n: int) -> list[list[dict]]:
    """The test split, or the first n rows of a JSONL of messages (image paths resolved inside its folder)."""
    if data is None:
        from bard_deploy.evaluate import synthetic_conversations
        return synthetic_conversations("test", n)
    from bard_deploy.data.chat import check_messages
    from bard_deploy.errors import DataError
    from bard_deploy.prompting import resolve_image_path

    rows = []
    with open(data, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                msgs = check_messages(json.loads(line).get("messages"))
            except (json.JSONDecodeError, AttributeError, DataError) as e:
                raise DataError(f"{data}:{lineno}: {e}", lineno) from e
            for m in msgs:
                for part in m["content"] if isinstance(m["content"], list) else []:
                    if part["type"] == "image" and isinstance(part.get("image"), str) and not part["image"].startswith(
                            "data:"):
                        part["image"] = str(resolve_image_path(part["image"], Path(data).parent))
            rows.append(msgs)
            if len(rows) == n:
                break
    return rows
