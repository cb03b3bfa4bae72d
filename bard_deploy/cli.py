"""`bard-deploy`: a thin typer CLI over the library (no tensor code here).

Every `BardError` reaches the user as one line (`error: ...`) and exit code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from bard_deploy.converters.export import Int8Options
from bard_deploy.converters.export import export as export_model
from bard_deploy.errors import BardError, ConfigError, RuntimeInputError
from bard_deploy.runtimes.decode import DecodeOptions

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Convert Qwen3-VL models into BARD block-diffusion models, export and run them.")
console = Console()
DEVICE_HELP = ("Where to run: torch backend cpu, cuda, cuda:N or auto; onnxruntime cpu, cuda or tensorrt "
               "(execution provider); TensorRT engines always run on the GPU.")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors.")):
    """bard-deploy: train, export, generate, bench, inspect."""


@app.command()
def train(
    recipe: Path | None = typer.Option(None, "--recipe", help="A TOML recipe (top-level keys + [[stages]])."),
    preset: str = typer.Option("default", help="Stage and data sizes: default (~12 min here), quality "
                               "(~30 min, steadier across seeds) or smoke."),
    name: str | None = typer.Option(None, help="Run name: checkpoints go to OUT/NAME/<stage>."),
    out: str | None = typer.Option(None, help="Output root [default: runs]."),
    source: str | None = typer.Option(None, help="AR source checkpoint [default: the embedded default]."),
    data: str | None = typer.Option(None, help="Chat JSONL file or directory [default: the synthetic task]."),
    image_root: str | None = typer.Option(None, help="Root of relative image paths [default: the JSONL's folder]."),
    stages: str | None = typer.Option(None, help="name:block:steps[:distill_steps],... overriding the preset."),
    train_samples: int | None = typer.Option(None, help="Synthetic training samples."),
    prompt_attention: str | None = typer.Option(None, help="causal (default) or block."),
    t_min: float | None = typer.Option(None, help="Smallest noise level."),
    weight_cap: float | None = typer.Option(None, help="Cap of the 1/t loss weight."),
    distill_lambda: float | None = typer.Option(None, help="Weight of the distillation KL."),
    distill_topk: int | None = typer.Option(None, help="Teacher top-k."),
    ar_teacher: bool = typer.Option(False, "--ar-teacher", help="Ablation: distil from the AR source."),
    no_distill: bool = typer.Option(False, "--no-distill", help="Ablation: no distillation pass."),
    shift_distill: float | None = typer.Option(None, help="Experimental, B4 anchor: weight of the hidden-state "
                                               "distillation from the AR source one position earlier (0 = off)."),
    micro_batch: int | None = typer.Option(None, help="Samples per forward, grouped by length (gradient "
                                           "accumulation; default 16, 0 = the whole batch)."),
    activation_checkpointing: bool = typer.Option(False, "--activation-checkpointing"),
    device: str | None = typer.Option(None, help="auto (CUDA when present), cpu, cuda or cuda:N."),
    precision: str | None = typer.Option(None, help="auto (bf16 autocast on CUDA), fp32 or bf16."),
    strategy: str | None = typer.Option(None, help="Under torchrun: ddp (default) or fsdp (FSDP2, large models)."),
    seed: int | None = typer.Option(None),
    eval_samples: int | None = typer.Option(None, help="Test samples in the results table."),
    eval_threshold: float | None = typer.Option(None, help="Decode threshold of the results table."),
    on_error: str | None = typer.Option(None, help="Bad data rows: skip (default) or fail."),
    resume: bool = typer.Option(True, "--resume/--fresh", help="Reuse finished stages and continue a killed one."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Convert an AR VLM into BARD checkpoints (B4 -> B8 -> B16 [-> B32]) and print the results table."""
    from bard_deploy.train.recipe import PRESETS, load_recipe, parse_stages
    from bard_deploy.train.run import train as run_train

    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})", preset)
    spec, samples = PRESETS[preset]
    overrides = dict(name=name, out=out, source=source, data=data, image_root=image_root, train_samples=train_samples,
                     prompt_attention=prompt_attention, t_min=t_min, weight_cap=weight_cap,
                     distill_lambda=distill_lambda, distill_topk=distill_topk, ar_teacher=ar_teacher or None,
                     no_distill=no_distill or None, shift_distill=shift_distill, micro_batch=micro_batch,
                     activation_checkpointing=activation_checkpointing or None, device=device, precision=precision,
                     strategy=strategy, seed=seed, eval_samples=eval_samples,
                     eval_threshold=eval_threshold, on_error=on_error)
    if recipe is None:
        overrides["stages"] = parse_stages(stages) if stages else spec
        overrides["train_samples"] = train_samples or samples
    elif stages:
        overrides["stages"] = parse_stages(stages)
    r = load_recipe(recipe, **overrides)
    results = run_train(r, resume=resume, progress=progress)
    console.print(f"checkpoints: {r.run_dir}  results: {r.run_dir / 'results.json'}  "
                  f"({results['train_seconds']} s)")


@app.command()
def export(
    model: Path = typer.Option(..., "--model", help="A checkpoint directory (BARD stage or AR source)."),
    out: Path = typer.Option(..., "--out", help="The export directory to write."),
    int8: bool = typer.Option(False, "--int8", help="Also write an INT8 decoder (with its accuracy gate)."),
    target: str = typer.Option(Int8Options.target, help="INT8 target: cpu (ORT dynamic), cuda or tensorrt (Q/DQ)."),
    calibration_samples: int = typer.Option(Int8Options.calibration_samples, help="Calibration prompts."),
    gate_top1: float = typer.Option(Int8Options.gate_top1, help="Min top-1 agreement with fp32 (held-out steps)."),
    gate_em_drop: float = typer.Option(Int8Options.gate_em_drop, help="Max exact-match drop (fraction)."),
    eval_samples: int = typer.Option(Int8Options.eval_samples, help="Test samples of the end-to-end gate."),
    image_size: int | None = typer.Option(None, help="Square image size vision.onnx is traced at."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
):
    """Export the decoder step and vision tower to ONNX (validated against PyTorch), optionally INT8."""
    m = export_model(model, out, int8=int8, force=force, image_size=image_size, log=console.print,
                     int8_options=Int8Options(target=target, calibration_samples=calibration_samples,
                                              gate_top1=gate_top1, gate_em_drop=gate_em_drop,
                                              eval_samples=eval_samples))
    table = Table(title=f"export {out}")
    for col in ("graph", "size", "check"):
        table.add_column(col)
    parity = m["parity"]
    table.add_row(m["graphs"]["decoder"]["fp32"], _size(out / m["graphs"]["decoder"]["fp32"]),
                  f"max |ONNX - torch| logits {parity['decoder']['logits']:.2e} over {parity['steps']} real steps "
                  f"(tol {parity['tolerance']:g})")
    if m.get("vision"):
        table.add_row("vision.onnx", _size(out / "vision.onnx"),
                      f"max diff {max(parity['vision'].values()):.2e}, grid {m['vision']['grid_thw']}")
    if "int8" in m["graphs"]["decoder"]:
        g = m["int8"]
        table.add_row(m["graphs"]["decoder"]["int8"], _size(out / m["graphs"]["decoder"]["int8"]),
                      f"{g['scheme']}; top-1 {g['top1_agreement']:.4f} on {g['held_out_steps']} held-out steps; "
                      f"exact match {g['exact_match_fp32']:.3f} -> {g['exact_match_int8']:.3f} ({g['attempt']})")
    table.add_row("embeddings.safetensors", _size(out / "embeddings.safetensors"), "")
    console.print(table)


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.2f} MiB"


@app.command()
def generate(
    model: Path = typer.Option(..., "--model", help="A checkpoint or export directory."),
    prompt: str = typer.Option(..., "--prompt", help="The user's question."),
    image: list[Path] = typer.Option([], "--image", help="An image file (repeatable)."),
    block_size: int | None = typer.Option(None, help="Tokens per block [default: the trained block size]."),
    threshold: float | None = typer.Option(None, help="Commit masked tokens with confidence >= this, in (0, 1] "
                                           f"[default: {DecodeOptions.threshold}]."),
    static: bool = typer.Option(False, "--static", help="No threshold: exactly --min-commit tokens per step."),
    min_commit: int | None = typer.Option(None, help=f"Tokens committed per step at least [default: "
                                                     f"{DecodeOptions.min_commit}]."),
    max_steps: int | None = typer.Option(None, help="Denoising steps per block at most [default: block size]."),
    max_new_tokens: int | None = typer.Option(None, help=f"[default: {DecodeOptions.max_new_tokens}]"),
    edit_threshold: float | None = typer.Option(None, help="Token revision threshold (mix-noise models)."),
    temperature: float | None = typer.Option(None, help="0 = greedy [default]."),
    top_k: int | None = typer.Option(None, help="Sample from the top k (with --temperature)."),
    top_p: float | None = typer.Option(None, help="Nucleus sampling mass (with --temperature)."),
    seed: int | None = typer.Option(None, help="Sampling seed."),
    ar: bool = typer.Option(False, "--ar", help="Decode an AR source model, one token per forward."),
    backend: str = typer.Option("auto", help="auto, torch, onnxruntime or tensorrt (auto: by directory kind)."),
    variant: str | None = typer.Option(None, help="Export decoder variant: fp32 or int8 [default: manifest's]."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    allow_block_size_mismatch: bool = typer.Option(False, help="Allow a block size other than the trained one."),
    stream: bool = typer.Option(False, "--stream", help="Print the answer block by block as it is decoded."),
    stats: bool = typer.Option(False, "--stats", help="Print decoding statistics."),
):
    """Decode with the block-diffusion runtime (or, with --ar, the AR baseline)."""
    from bard_deploy.runtimes.api import Pipeline
    from bard_deploy.runtimes.decode import Stats

    given = dict(block_size=block_size, threshold=threshold, min_commit=min_commit, max_steps=max_steps,
                 max_new_tokens=max_new_tokens, edit_threshold=edit_threshold, temperature=temperature,
                 top_k=top_k, top_p=top_p, seed=seed)
    options = {k: v for k, v in given.items() if v is not None}  # the rest: DecodeOptions' own defaults
    if static:
        if threshold is not None:
            raise RuntimeInputError("--static and --threshold exclude each other", threshold)
        options["threshold"] = None
    options["allow_block_size_mismatch"] = allow_block_size_mismatch
    pipe = Pipeline.load(model, backend=backend, variant=variant, device=device)
    images = [str(p) for p in image]
    if stream:
        st = Stats()
        for piece in pipe.stream(prompt, images=images, ar=ar, stats=st, **options):
            console.print(piece, end="", soft_wrap=True, highlight=False)
        console.print()
    else:
        result = pipe.generate(prompt, images=images, ar=ar, **options)
        console.print(result.text, highlight=False, soft_wrap=True)
        st = result.stats
    if stats:
        table = Table(title="decoding statistics", show_header=False)
        for key, value in st.as_dict().items():
            table.add_row(key, str(value))
        console.print(table)


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ConfigError(f"--{name} must be comma-separated numbers, got {text!r}", text) from e


@app.command()
def bench(
    model: list[Path] = typer.Option([], "--model", help="Checkpoint or export directory (repeatable)."),
    backend: str = typer.Option("auto", help="auto, torch, onnxruntime or tensorrt (the same for AR and BARD)."),
    variant: str | None = typer.Option(None, help="Export decoder variant: fp32 or int8."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    ar_model: Path | None = typer.Option(None, help="AR baseline [default: the source in the checkpoint]."),
    block_sizes: str | None = typer.Option(None, help="e.g. 4,8,16 [default: each model's trained size]."),
    thresholds: str = typer.Option("0.9", help="Comma-separated decode thresholds."),
    requests: int = typer.Option(30, help="Timed requests per configuration (test split)."),
    warmup: int = typer.Option(3, help="Untimed requests first."),
    max_new_tokens: int = typer.Option(64),
    data: Path | None = typer.Option(None, help="A JSONL of messages instead of the test split."),
    out: Path = typer.Option(Path("runs/bench"), help="Where bench.json and bench.png go."),
    transformers_baseline: bool = typer.Option(True, "--transformers/--no-transformers",
                                               help="Also time transformers' generate on the source."),
    step: bool = typer.Option(False, "--step", help="Step mode: one decoder step at real shapes."),
    shape: str = typer.Option("qwen3-vl-2b", help="Step mode: qwen3-vl-2b, qwen3-vl-4b or a config.json."),
    tokens: str = typer.Option("1,4,8,16,32", help="Step mode: tokens per step."),
    past: int = typer.Option(512, help="Step mode: past length."),
    layers_subset: str = typer.Option("1,4", help="Step mode: the two layer counts timed and extrapolated."),
):
    """AR vs BARD latency and throughput, side by side (or, with --step, one step at real shapes)."""
    if step:
        from bard_deploy.bench_step import step_bench

        ks = [int(x) for x in _floats(layers_subset, "layers-subset")]
        if len(ks) != 2 or not 0 < ks[0] < ks[1]:
            raise ConfigError(f"--layers-subset needs two increasing layer counts, got {layers_subset!r}", ks)
        res = step_bench(shape, [int(t) for t in _floats(tokens, "tokens")], past, tuple(ks), log=console.print)
        table = Table(title=f"decoder step, {shape} ({res['note']})")
        for col in ("backend", "T", "ms/step", "ms/token", "cost vs T=1", "weights GB/s", "note"):
            table.add_column(col)
        for r in res["rows"]:
            table.add_row(r["backend"], str(r["T"]), f"{r['ms_per_step']:.1f}", f"{r['ms_per_token']:.2f}",
                          "-" if r["cost_vs_T1"] is None else f"{r['cost_vs_T1']:.2f}x",
                          "-" if r["weight_GBps"] is None else f"{r['weight_GBps']:.1f}",
                          "" if r["reliable"] else "unreliable: timing noise swamped the layer slope")
        console.print(table)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_step.json").write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps(res))
        return
    from bard_deploy.bench import bench as run_bench

    if not model:
        raise ConfigError("give at least one --model (a checkpoint or export directory)", None)
    blocks = [int(b) for b in _floats(block_sizes, "block-sizes")] if block_sizes else None
    res = run_bench(model, ar_model, backend, variant, blocks, _floats(thresholds, "thresholds"), requests, warmup,
                    max_new_tokens, data, out, transformers_baseline, device=device, log=console.print)
    h = res["header"]
    where = f"{h['gpu']} ({h['device']})" if h["gpu"] else h["machine"]
    table = Table(title=f"{h['backend']} on {where} ({h['cores']} cores, {h['torch_threads']} threads), "
                        f"{h['date']}, batch 1, {requests} requests")
    cols = ("configuration", "B", "tau", "EM", "TTFT ms", "step ms p50/p90/p99", "steps/blk", "tok/fwd",
            "NFE/tok", "decode tok/s", "e2e tok/s", "prefill ms", "vision ms", "peak MB", "speed-up")
    for col in cols:
        table.add_column(col)
    for r in res["rows"]:
        table.add_row(r["name"], str(r["block_size"] or "-"), str(r["threshold"] or "-"),
                      f"{100 * r['exact_match']:.1f}%", f"{r['ttft_ms']:.1f}",
                      "-" if r["step_ms_p50"] is None else
                      f"{r['step_ms_p50']:.2f}/{r['step_ms_p90']:.2f}/{r['step_ms_p99']:.2f}",
                      str(r["steps_per_block"] or "-"), f"{r['tokens_per_forward']:.2f}", f"{r['nfe_per_token']:.2f}",
                      f"{r['decode_tokens_per_s']:.0f}", f"{r['e2e_tokens_per_s']:.0f}", f"{r['prefill_ms']:.1f}",
                      f"{r['vision_ms']:.1f}", f"{r['peak_rss_mb']:.0f}", f"{r['speedup_decode_vs_ar']:.2f}x")
    Console(width=max(console.width, 200)).print(table)   # 15 columns: never squeeze them to 80
    console.print(f"plot: {res['plot']}   json: {out / 'bench.json'}")
    print(json.dumps({"header": h, "rows": res["rows"], "plot": res["plot"]}))


@app.command()
def inspect(directory: Path = typer.Argument(..., help="A checkpoint directory.")):
    """Print a checkpoint's summary: architecture, sizes, bard section."""
    from bard_deploy.inspect import checkpoint_summary

    summary = checkpoint_summary(directory)
    table = Table(title=f"checkpoint {directory}", show_header=False)
    for key, value in summary.items():
        table.add_row(key, str(value))
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: run the app, turn user errors into one line and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        # standalone mode: typer prints its own one-line usage errors and exits 2; our errors come through.
        app(args=argv, prog_name="bard-deploy")
    except BardError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
