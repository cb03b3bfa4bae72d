"""`bard-deploy`: a thin typer CLI over the library (no tensor code, no tables, no defaults of its own).

Each command's options take their defaults from the library's option dataclasses (`Recipe`, `QuantOptions`,
`DecodeOptions`, `BenchOptions`, `StepOptions`), builds one, calls the library and prints the table the library
builds. Every `BardError` reaches the user as one line (`error: ...`) and exit code 2; `--debug` (anywhere on
the command line) shows the traceback instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import typer
from rich.console import Console

from bard_deploy import __version__
from bard_deploy.bench import BenchOptions
from bard_deploy.bench import bench as run_bench
from bard_deploy.bench_step import BACKENDS as BENCH_STEP_BACKENDS
from bard_deploy.bench_step import StepOptions, step_bench
from bard_deploy.calibration.gate import QuantOptions
from bard_deploy.calibration.prompts import ExportPrompts
from bard_deploy.converters.export import export as export_model
from bard_deploy.converters.importer import import_checkpoint
from bard_deploy.errors import BardError, ConfigError, RuntimeInputError
from bard_deploy.inspect import checkpoint_summary, export_tables, inspect_tables
from bard_deploy.prompting import DEFAULT_VIDEO_FPS, video_frames
from bard_deploy.runtimes.api import BACKENDS, Pipeline
from bard_deploy.runtimes.decode import DecodeOptions, Stats
from bard_deploy.serve import ServeOptions
from bard_deploy.serve import serve as run_serve
from bard_deploy.standins import SIZES, write_standin
from bard_deploy.tables import bench_table, loop_table, mapping_table, replay_table, step_table
from bard_deploy.train.recipe import Recipe, recipe_from_cli
from bard_deploy.train.run import train as run_train

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,           # plain help: "[default: ...]" and brackets are shown as written
                  context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
                  help="Convert Qwen3-VL models into BARD block-diffusion models, export and run them.")
console = Console()
DEVICE_HELP = ("Where to run: torch backend cpu, cuda, cuda:N or auto; onnxruntime cpu, cuda or tensorrt "
               "(execution provider); TensorRT engines always run on the GPU.")
DTYPE_HELP = "Torch backend weights: fp32, bf16 or fp16 (loaded straight into that dtype)."
THREADS_HELP = ("CPU threads of the backend (onnxruntime intra-op, or torch for the torch backend); with onnxruntime "
                "the decode loop's host work gets one torch thread.")
BACKEND_HELP = f"{', '.join(BACKENDS)} (auto: torch for a checkpoint, onnxruntime for an export directory)."


def _version(value: bool) -> None:
    if value:
        print(f"bard-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors (accepted "
                               "anywhere on the command line)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
):
    """bard-deploy: train, export, generate, bench, bench-step, inspect, standin, import."""


def _given(ctx: typer.Context, names) -> dict:
    """The options among `names` that the user set (on the command line or in the environment), not left at their
    default. Compared by name: typer's context may hand back its own click's ParameterSource enum, whose members
    are never `click.core.ParameterSource.DEFAULT` (so every option used to count as given: `--static` alone was
    refused as "--static and --threshold")."""
    def given(n: str) -> bool:
        source = ctx.get_parameter_source(n)
        return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")

    return {n: ctx.params[n] for n in names if n in ctx.params and given(n)}


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise ConfigError(f"--{name} must be comma-separated numbers, got {text!r}", text) from e


def _ints(text: str, name: str) -> tuple[int, ...]:
    values = _floats(text, name)
    if any(v != int(v) for v in values):
        raise ConfigError(f"--{name} must be comma-separated whole numbers, got {text!r}", text)
    return tuple(int(v) for v in values)


def _csv(values: tuple) -> str:
    return ",".join(str(v) for v in values)


R = Recipe
RECIPE_OPTIONS = ("name", "out", "source", "data", "image_root", "train_samples", "prompt_attention", "t_min",
                  "weight_cap", "distill_lambda", "distill_topk", "ar_teacher", "no_distill", "shift_distill",
                  "micro_batch", "activation_checkpointing", "device", "precision", "strategy", "seed",
                  "eval_samples", "eval_threshold", "on_error", "hold_out_every", "max_unknown_rate",
                  "dual_mode", "dual_mode_weight", "mix_keep_weight")


@app.command()
def train(
    ctx: typer.Context,
    recipe: Path | None = typer.Option(None, "--recipe", help="A TOML recipe (top-level keys + [[stages]]); "
                                       "options given on the command line override it."),
    preset: str = typer.Option("default", help="Stage and data sizes: default (32 min with its source alone at "
                               "2 threads on a 2-core VM, B16 within 1 point of its source on 9 of 10 cells), fast "
                               "(half the stage steps, ~18 min, B16 0.9-5.0 points lower on each of them), quality "
                               "(the default with mask noise, twice the data and a B32 stage) or smoke."),
    stages: str | None = typer.Option(None, help="name:block:steps[:distill_steps],... overriding the preset.",
                                      show_default="the preset's"),
    name: str = typer.Option(R.name, help="Run name: checkpoints go to OUT/NAME/<stage>."),
    out: str = typer.Option(R.out, help="Output root."),
    source: str | None = typer.Option(R.source, help="AR source checkpoint.", show_default="the embedded default"),
    data: str | None = typer.Option(R.data, help="Chat JSONL file or directory.", show_default="the synthetic task"),
    image_root: str | None = typer.Option(R.image_root, help="Root of relative image paths.",
                                          show_default="the JSONL's folder"),
    train_samples: int | None = typer.Option(None, help="Synthetic training samples.", show_default="the preset's"),
    prompt_attention: str = typer.Option(R.prompt_attention, help="causal or block."),
    t_min: float = typer.Option(R.t_min, help="Smallest noise level."),
    weight_cap: float = typer.Option(R.weight_cap, help="Cap of the 1/t loss weight."),
    distill_lambda: float = typer.Option(R.distill_lambda, help="Weight of the distillation KL."),
    distill_topk: int = typer.Option(R.distill_topk, help="Teacher top-k."),
    ar_teacher: bool = typer.Option(R.ar_teacher, "--ar-teacher", help="Ablation: distil from the AR source."),
    no_distill: bool = typer.Option(R.no_distill, "--no-distill", help="Ablation: no distillation pass."),
    shift_distill: float = typer.Option(R.shift_distill, help="Experimental, B4 anchor: weight of the hidden-state "
                                        "distillation from the AR source one position earlier (0 = off)."),
    dual_mode: bool = typer.Option(R.dual_mode, "--dual-mode", help="Also a next-token loss on the clean response "
                                   "in every BARD pass: the checkpoints decode causally too (--ar) and verify their "
                                   "own drafts (--speculative self)."),
    dual_mode_weight: float = typer.Option(R.dual_mode_weight, help="Weight of the dual-mode next-token loss."),
    mix_keep_weight: float = typer.Option(R.mix_keep_weight, help="Stages with mix noise: weight of the CE at the "
                                          "noisy tokens left unchanged (0 = the reference's loss; > 0 teaches the "
                                          "model to keep right tokens, which token revision relies on)."),
    micro_batch: int = typer.Option(R.micro_batch, help="Samples per forward, grouped by length (gradient "
                                    "accumulation; 0 = the whole batch)."),
    activation_checkpointing: bool = typer.Option(R.activation_checkpointing, "--activation-checkpointing",
                                                  help="Recompute each decoder layer in the backward pass."),
    device: str = typer.Option(R.device, help="auto (CUDA when present), cpu, cuda or cuda:N."),
    precision: str = typer.Option(R.precision, help="auto (bf16 autocast on CUDA), fp32 or bf16."),
    strategy: str = typer.Option(R.strategy, help="Under torchrun: ddp or fsdp (FSDP2, large models)."),
    seed: int = typer.Option(R.seed, help="Seed of data order, noise and initialisation."),
    eval_samples: int = typer.Option(R.eval_samples, help="Test samples in the results table."),
    eval_threshold: float = typer.Option(R.eval_threshold, help="Decode threshold of the results table."),
    on_error: str = typer.Option(R.on_error, help="Bad data rows: skip or fail."),
    hold_out_every: int = typer.Option(R.hold_out_every, help="--data: hold one row in N out of training for the "
                                       "results table (0 = none)."),
    max_unknown_rate: float = typer.Option(R.max_unknown_rate, help="--data: refuse data of which more text tokens "
                                           "than this fraction are unknown to the tokenizer."),
    resume: bool = typer.Option(True, "--resume/--fresh", help="Reuse finished stages and continue a killed one."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    threads: int | None = typer.Option(None, help="torch's CPU threads (another count rounds reductions "
                                       "differently, as another CPU does).", show_default="the available cores"),
):
    """Convert an AR VLM into BARD checkpoints (B4 -> B8 -> B16 [-> B32]) and print the results table."""
    r = recipe_from_cli(recipe, preset, stages, _given(ctx, RECIPE_OPTIONS))
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}", threads)
        torch.set_num_threads(threads)
    results = run_train(r, resume=resume, progress=progress)
    console.print(f"checkpoints: {r.run_dir}  results: {r.run_dir / 'results.json'}  "
                  f"({results['train_seconds']} s)")


Q = QuantOptions


@app.command()
def export(
    model: Path = typer.Option(..., "--model", help="A checkpoint directory (BARD stage or AR source)."),
    out: Path = typer.Option(..., "--out", help="The export directory to write."),
    int8: bool = typer.Option(False, "--int8", help="Also write an INT8 decoder (with its accuracy gate)."),
    int4: bool = typer.Option(False, "--int4", help="Also write a weight-only INT4 decoder (MatMulNBits, with "
                              "its accuracy gate)."),
    target: str = typer.Option(Q.target, help="INT8 target: cpu (ORT dynamic), cuda or tensorrt (Q/DQ)."),
    int4_block_size: int = typer.Option(Q.int4_block_size, help="INT4: weights per scale (32 or 128 usually)."),
    int4_accuracy_level: int = typer.Option(Q.int4_accuracy_level, help="INT4 kernel compute type: 0 unset, "
                                            "1 fp32, 2 fp16, 3 bf16, 4 int8."),
    int4_lm_head: bool = typer.Option(Q.int4_lm_head, "--int4-lm-head/--int4-keep-lm-head",
                                      help="INT4: quantize the LM head too, or keep it fp32."),
    calibration_samples: int = typer.Option(Q.calibration_samples, help="Calibration prompts."),
    gate_top1: float = typer.Option(Q.gate_top1, help="Min top-1 agreement with fp32 (held-out steps)."),
    gate_em_drop: float = typer.Option(Q.gate_em_drop, help="Max exact-match drop (fraction; synthetic task)."),
    gate_token_agreement: float = typer.Option(Q.gate_token_agreement, help="Min generated-token agreement with "
                                               "fp32 (--calib-data)."),
    calib_data: Path | None = typer.Option(None, help="Chat JSONL (the rows of train --data) to calibrate and gate "
                                           "on.", show_default="the synthetic task, for the embedded default only"),
    eval_samples: int = typer.Option(Q.eval_samples, help="Prompts of the end-to-end gate."),
    image_size: int | None = typer.Option(None, help="Square image size vision.onnx is traced at.",
                                          show_default="the processor's smallest"),
    block_size: int | None = typer.Option(None, help="Trained block size of an imported Bard-VL checkpoint (its "
                                          "config does not record it).", show_default="the checkpoint's"),
    external_data: bool | None = typer.Option(None, "--external-data/--no-external-data",
                                              help="Graph weights in <graph>.onnx.data beside each graph.",
                                              show_default="above the 2 GB protobuf limit"),
    dtype: str = typer.Option("fp32", "--dtype", help="Graph precision: fp32 (CPU; the base of --int8 / --int4) or "
                              "fp16 (GPU targets)."),
    min_pixels: int | None = typer.Option(None, help="Smallest image (pixels) the export's processor resizes to.",
                                          show_default="the checkpoint's processor"),
    max_pixels: int | None = typer.Option(None, help="Largest image (pixels) the export's processor resizes to.",
                                          show_default="the checkpoint's processor"),
    keep_calibration: bool = typer.Option(False, "--keep-calibration", help="Keep INT8's calibration inputs in "
                                          "the bundle (default: beside it, OUT.calibration.safetensors)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
):
    """Export the decoder step and vision tower to ONNX (validated against PyTorch), optionally INT8 / INT4."""
    o = QuantOptions(target, calibration_samples, gate_top1, gate_em_drop, gate_token_agreement, eval_samples,
                     int4_block_size, int4_accuracy_level, int4_lm_head).check()
    prompts = ExportPrompts.for_checkpoint(model, int8 or int4, o.calibration_samples, o.eval_samples, calib_data)
    m = export_model(model, out, prompts, int8=int8, int4=int4, quant_options=o, force=force, image_size=image_size,
                     block_size=block_size, external_data=external_data, dtype=dtype, min_pixels=min_pixels,
                     max_pixels=max_pixels, keep_calibration=keep_calibration, log=console.print)
    for table in export_tables(m, out, verified=False):    # the manifest just written: no second pass over files
        console.print(table)


D = DecodeOptions


@app.command()
def generate(
    ctx: typer.Context,
    model: Path = typer.Option(..., "--model", help="A checkpoint or export directory."),
    prompt: str | None = typer.Option(None, "--prompt", help="The user's question (or --prompt-ids).",
                                      show_default=False),
    prompt_ids: str | None = typer.Option(None, "--prompt-ids", help="Comma-separated prompt token ids, decoded "
                                          "as they are (no chat template, no tokenizer needed).", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line: token ids, text (with a tokenizer) "
                                 "and statistics."),
    image: list[Path] = typer.Option([], "--image", help="An image file (repeatable).", show_default=False,
                                     metavar="PATH"),
    video: list[Path] = typer.Option([], "--video", help="A video as a folder of frames, in file-name order "
                                     "(repeatable).", show_default=False, metavar="DIR"),
    video_fps: float = typer.Option(DEFAULT_VIDEO_FPS, help="The frame rate of the --video frames (timestamps)."),
    block_size: int | None = typer.Option(D.block_size, help="Tokens per block.",
                                          show_default="the trained block size"),
    threshold: float = typer.Option(D.threshold, help="Commit masked tokens with confidence >= this, in (0, 1]."),
    static: bool = typer.Option(False, "--static", help="No threshold: exactly --min-commit tokens per step."),
    min_commit: int = typer.Option(D.min_commit, help="Tokens committed per step at least."),
    max_steps: int | None = typer.Option(D.max_steps, help="Denoising steps per block at most.",
                                         show_default="the block size"),
    max_new_tokens: int = typer.Option(D.max_new_tokens, help="New tokens at most."),
    edit_threshold: float | None = typer.Option(D.edit_threshold, help="Token revision threshold (mix-noise "
                                                "models).", show_default="off"),
    max_edits: int = typer.Option(D.max_edits, help="Revisions per block and row at most."),
    temperature: float = typer.Option(D.temperature, help="0 = greedy."),
    top_k: int = typer.Option(D.top_k, help="Sample from the top k (with --temperature; 0 = off)."),
    top_p: float = typer.Option(D.top_p, help="Nucleus sampling mass (with --temperature; 1 = off)."),
    seed: int | None = typer.Option(D.seed, help="Sampling seed.", show_default="unseeded"),
    ar: bool = typer.Option(False, "--ar", help="Decode an AR source model, one token per forward."),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    variant: str | None = typer.Option(None, help="Export decoder variant: fp32 or int8.",
                                       show_default="the manifest's"),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: str = typer.Option("fp32", help=DTYPE_HELP),
    threads: int | None = typer.Option(None, help=THREADS_HELP, show_default="the available cores"),
    allow_block_size_mismatch: bool = typer.Option(D.allow_block_size_mismatch, "--allow-block-size-mismatch",
                                                   help="Allow a block size other than the trained one."),
    stream: bool = typer.Option(False, "--stream", help="Print the answer block by block as it is decoded."),
    stats: bool = typer.Option(False, "--stats", help="Print decoding statistics."),
    min_pixels: int | None = typer.Option(None, help="Resize smaller images up to this many pixels.",
                                          show_default="the model's processor"),
    max_pixels: int | None = typer.Option(None, help="Resize larger images down to this many pixels.",
                                          show_default="the model's processor"),
    schedule: str = typer.Option(D.schedule, help="min: at least --min-commit a step, the rest at the last; even: "
                                 "the block split evenly over --max-steps (the official generate)."),
    strict_threshold: bool = typer.Option(D.strict_threshold, "--strict-threshold",
                                          help="Commit above the threshold only (>, the official generate)."),
    raw_confidence: bool = typer.Option(not D.suppress_mask, "--raw-confidence",
                                        help="Let MASK be predicted (the official generate re-predicts it)."),
    reference: bool = typer.Option(False, "--reference", help="The official Bard-VL generate's semantics: "
                                   "--schedule even --strict-threshold --raw-confidence."),
    mask_token_id: int | None = typer.Option(None, help="Override the checkpoint's MASK token id (torch).",
                                             show_default="the checkpoint's"),
    prompt_attention: str | None = typer.Option(None, help="Override the prompt attention: block or causal "
                                                "(torch).", show_default="the checkpoint's"),
    eos_token_id: list[int] = typer.Option([], "--eos-token-id", help="Stop at this token id (repeatable).",
                                           show_default="generation_config.json and the tokenizer"),
    stop: list[str] = typer.Option([], "--stop", help="End the answer before this text (repeatable, up to 4).",
                                   show_default=False),
    speculative: str | None = typer.Option(None, help="source: lossless mode, the AR source verifies each drafted "
                                           "block (the output is its greedy decode); self: a dual-mode checkpoint "
                                           "verifies its own drafts.", show_default="off"),
    verifier: Path | None = typer.Option(None, help="The AR source for --speculative (same backend).",
                                         show_default="the source a checkpoint records"),
):
    """Decode with the block-diffusion runtime (or, with --ar, the AR baseline)."""
    if static and "threshold" in _given(ctx, ["threshold"]):
        raise RuntimeInputError("--static and --threshold exclude each other", threshold)
    options = dict(block_size=block_size, threshold=None if static else threshold, min_commit=min_commit,
                   max_steps=max_steps, max_new_tokens=max_new_tokens, edit_threshold=edit_threshold,
                   max_edits=max_edits, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                   allow_block_size_mismatch=allow_block_size_mismatch, schedule="even" if reference else schedule,
                   strict_threshold=strict_threshold or reference, suppress_mask=not (raw_confidence or reference),
                   stop=tuple(stop), speculative=speculative)
    if as_json and stream:
        raise RuntimeInputError("--json prints one object per result; it excludes --stream", None)
    pipe = Pipeline.load(model, backend=backend, variant=variant, device=device, dtype=dtype, threads=threads,
                         min_pixels=min_pixels, max_pixels=max_pixels, mask_token_id=mask_token_id,
                         prompt_attention=prompt_attention, eos_token_ids=eos_token_id or None, verifier=verifier)
    images = [str(p) for p in image]
    videos = [{"video": video_frames(d), "fps": video_fps} for d in video]
    if (prompt is None) == (prompt_ids is None):
        raise RuntimeInputError("give exactly one of --prompt and --prompt-ids", None)
    if prompt_ids is not None:
        try:
            ids = [int(x) for x in prompt_ids.split(",") if x.strip()]
        except ValueError as e:
            raise RuntimeInputError(f"--prompt-ids must be comma-separated integers, got {prompt_ids!r}",
                                    prompt_ids) from e
        if videos:
            raise RuntimeInputError("--video takes a --prompt (the chat template lays out its frames)", None)
        g = pipe.generate_ids(ids, images=images, ar=ar, **options)
        out = {"token_ids": g.token_ids[0], "finish_reason": g.stats.finish_reasons[0], "stats": g.stats.as_dict()}
        if pipe.tokenizer is not None:
            out["text"] = pipe.decode_text(g.token_ids[0])
        if as_json:
            print(json.dumps(out))
        else:
            console.print(out, highlight=False)
        return
    st = Stats()
    if stream:
        for piece in pipe.stream(prompt, images=images, videos=videos, ar=ar, stats=st, **options):
            console.print(piece, end="", soft_wrap=True, highlight=False)
        console.print()
    else:
        result = pipe.generate(prompt, images=images, videos=videos, ar=ar, **options)
        st = result.stats
        if as_json:
            print(json.dumps(result.as_dict()))
            return
        console.print(result.text, highlight=False, soft_wrap=True)
    if stats:
        console.print(mapping_table("decoding statistics", st.as_dict()))


B = BenchOptions


@app.command()
def bench(
    model: list[Path] = typer.Option([], "--model", help="Checkpoint or export directory (repeatable).",
                                     show_default=False, metavar="PATH"),
    backend: str = typer.Option(B.backend, help=BACKEND_HELP + " The same for AR and BARD."),
    variant: str | None = typer.Option(B.variant, help="Export decoder variant: fp32 or int8.",
                                       show_default="the manifest's"),
    device: str = typer.Option(B.device, help=DEVICE_HELP),
    dtype: str = typer.Option(B.dtype, help=DTYPE_HELP + " The transformers baseline uses it too."),
    ar_model: Path | None = typer.Option(B.ar_model, help="AR baseline.", show_default="the checkpoint's source"),
    block_sizes: str | None = typer.Option(None, help="Comma-separated block sizes, e.g. 4,8,16.",
                                           show_default="each model's trained size"),
    thresholds: str = typer.Option(_csv(B.thresholds), help="Comma-separated decode thresholds."),
    requests: int = typer.Option(B.requests, help="Timed requests per configuration."),
    warmup: int = typer.Option(B.warmup, help="Untimed requests first."),
    max_new_tokens: int = typer.Option(B.max_new_tokens, help="New tokens per request at most."),
    data: Path | None = typer.Option(B.data, help="A JSONL of messages.", show_default="the synthetic test split"),
    out: Path | None = typer.Option(B.out, help="Where bench.json and bench.png go.",
                                    show_default="bench/ beside the first model"),
    transformers_baseline: bool = typer.Option(B.transformers_baseline, "--transformers/--no-transformers",
                                               help="Also time transformers' generate on the source."),
    threads: int | None = typer.Option(B.threads, help=THREADS_HELP, show_default="the available cores"),
    repeats: int = typer.Option(B.repeats, help="Runs of every configuration, interleaved; the median and the "
                                "spread are reported."),
    speculative: str | None = typer.Option(None, help="Also each BARD configuration in lossless speculative mode: "
                                           "source (the AR model verifies; its outputs must equal AR's) or self "
                                           "(a dual-mode checkpoint verifies itself; its outputs must equal its own "
                                           "causal decode, timed beside it).", show_default="off"),
):
    """AR vs BARD latency and throughput, side by side, on the same backend and prompts; one JSON line last."""
    o = BenchOptions(tuple(model), ar_model, backend, variant, device, dtype,
                     _ints(block_sizes, "block-sizes") if block_sizes else None, _floats(thresholds, "thresholds"),
                     requests, warmup, max_new_tokens, data, out, transformers_baseline, threads, repeats,
                     speculative=speculative)
    res = run_bench(o, log=console.print)
    Console(width=max(console.width, 220)).print(bench_table(res))   # 16 columns: never squeeze them to 80
    console.print(f"plot: {res['plot']}   json: {Path(res['plot']).with_name('bench.json')}")
    print(json.dumps({"header": res["header"], "rows": res["rows"], "plot": res["plot"]}))


S = StepOptions


@app.command("bench-step")
def bench_step(
    shape: str = typer.Option(S.shape, help="qwen3-vl-2b, qwen3-vl-4b or a config.json."),
    tokens: str = typer.Option(_csv(S.tokens), help="Comma-separated tokens per step."),
    past: int = typer.Option(S.past, help="Past length (cached tokens)."),
    layers_subset: str = typer.Option(_csv(S.layers_subset), help="The two layer counts timed and extrapolated."),
    repeats: int = typer.Option(S.repeats, help="Timings per point (the median is kept)."),
    backends: str = typer.Option(_csv(S.backends), help=f"Comma-separated, of {_csv(BENCH_STEP_BACKENDS)}."),
    full_depth: bool = typer.Option(S.full_depth, "--full-depth", help="Time the real depth instead of two layer "
                                    "counts extrapolated (the graph exports with external data; needs its memory)."),
    out: Path = typer.Option(S.out, help="Where bench_step.json goes."),
    int4_accuracy_level: int = typer.Option(S.int4_accuracy_level, help="INT4 kernel compute type: 0 unset, "
                                            "1 fp32, 2 fp16, 3 bf16, 4 int8."),
    threads: int | None = typer.Option(S.threads, help="CPU threads of every backend timed.",
                                       show_default="the available cores"),
    loop: bool = typer.Option(S.loop, "--loop", help="Also time the decode loop's own step (IO-bound KV buffer, "
                              "bias, embeddings) against the bare graph's, per onnxruntime variant and T."),
    replay: Path | None = typer.Option(S.replay, help="A trace.json written by bench: replay its AR and BARD "
                                       "decodes through the loop at this shape (at the deepest layer count)."),
    replay_threshold: float | None = typer.Option(S.replay_threshold, help="The trace's BARD configuration.",
                                                  show_default="its only one"),
    prompt_tokens: int = typer.Option(S.prompt_tokens, help="Prompt tokens before each replayed request "
                                      "(330: a 640x480 photo and a question)."),
    replay_requests: int | None = typer.Option(S.replay_requests, help="Replay the first this many requests.",
                                               show_default="all"),
):
    """One decoder step at real model shapes (random weights) on torch and onnxruntime fp32 / INT8 / INT4; one JSON
    line last."""
    o = StepOptions(shape, _ints(tokens, "tokens"), past, _ints(layers_subset, "layers-subset"), repeats,
                    tuple(b.strip() for b in backends.split(",") if b.strip()), out, full_depth, int4_accuracy_level,
                    threads, loop, replay, replay_threshold, prompt_tokens, replay_requests)
    res = step_bench(o, log=console.print)
    console.print(step_table(res))
    if "loop" in res:
        console.print(loop_table(res))
    if "replay" in res:
        console.print(replay_table(res))
    print(json.dumps(res))


@app.command("import")
def import_command(
    src: Path = typer.Argument(..., help="A BARD checkpoint: an official Bard-VL directory or one of ours."),
    out: Path = typer.Argument(..., help="The checkpoint directory to write."),
    block_size: int | None = typer.Option(None, help="Trained block size (required for an official Bard-VL).",
                                          show_default="the checkpoint's"),
    mask_token_id: int | None = typer.Option(None, help="The MASK token id.",
                                             show_default="151671 for Bard-VL, else the checkpoint's"),
    eos_token_id: list[int] = typer.Option([], "--eos-token-id", help="An EOS token id (repeatable), written "
                                           "into generation_config.json.", show_default=False),
    tokenizer: Path | None = typer.Option(None, help="A directory to take tokenizer / processor files from when "
                                          "the source has none."),
    prompt_attention: str | None = typer.Option(None, help="block or causal.",
                                                show_default="block for Bard-VL, else the checkpoint's"),
    copy: bool = typer.Option(False, "--copy", help="Copy the weights instead of linking them."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
):
    """Make a BARD checkpoint a complete checkpoint of ours (block size, mask, EOS, tokenizer written once)."""
    config = import_checkpoint(src, out, block_size, mask_token_id, eos_token_id or None, tokenizer,
                               prompt_attention, copy, force)
    console.print(mapping_table(f"imported {out}", checkpoint_summary(out)))
    console.print(f"block size {config.bard.block_size}, mask id {config.bard.mask_token_id}, prompt attention "
                  f"{config.bard.prompt_attention}")


@app.command()
def standin(
    out: Path = typer.Option(..., "--out", help="The checkpoint directory to write."),
    size: str = typer.Option("2b", help=f"{', '.join(SIZES)} (tiny: the official layout at tiny widths)."),
    layers: int | None = typer.Option(None, help="Decoder layers (real widths and vocabulary).",
                                      show_default="the official depth"),
    bard_vl: bool = typer.Option(False, "--bard-vl", help="Relabel it as an official Bard-VL checkpoint."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
):
    """Write a random-weight stand-in of an official Qwen3-VL (or Bard-VL) checkpoint, in its on-disk format."""
    write_standin(out, size, layers, bard_vl, seed)
    for table in inspect_tables(out):
        console.print(table)


SV = ServeOptions


@app.command()
def serve(
    model: Path = typer.Option(..., "--model", help="A checkpoint or export directory."),
    host: str = typer.Option(SV.host, help="Address to listen on (127.0.0.1: this machine only; put a reverse "
                             "proxy in front to expose it)."),
    port: int = typer.Option(SV.port, help="TCP port."),
    max_batch: int = typer.Option(SV.max_batch, help="Requests decoded together at most."),
    max_queue: int = typer.Option(SV.max_queue, help="Requests waiting at most; a full queue answers 429."),
    image_root: str | None = typer.Option(SV.image_root, help="File paths in image_url parts resolve under this "
                                          "folder.", show_default="file paths refused; data: URLs only"),
    request_timeout: float = typer.Option(SV.request_timeout, help="Seconds a request may take (504 after)."),
    max_request_bytes: int = typer.Option(SV.max_request_bytes, help="Largest request body (413 above)."),
    model_name: str | None = typer.Option(SV.model_name, help="The model id clients send.",
                                          show_default="the model directory's name"),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    variant: str | None = typer.Option(None, help="Export decoder variant.", show_default="the manifest's"),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    threads: int | None = typer.Option(None, help=THREADS_HELP, show_default="the available cores"),
    verifier: Path | None = typer.Option(None, help="The AR source that requests with speculative=source verify "
                                         "with.", show_default="the source a checkpoint records"),
):
    """Serve the model over HTTP: OpenAI's chat-completions API, streaming per block, dynamic batching."""
    o = ServeOptions(host, port, max_batch, max_queue, image_root, request_timeout, max_request_bytes,
                     model_name=model_name)
    run_serve(model, o, backend=backend, variant=variant, device=device, threads=threads, verifier=verifier)


@app.command()
def inspect(directory: Path = typer.Argument(..., help="A checkpoint or export directory.")):
    """Summarise a checkpoint (architecture, sizes, bard section) or an export (variants, image size, parity,
    INT8 gate, files)."""
    for table in inspect_tables(directory):
        console.print(table)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: run the app, turn user errors into one line and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:    # accepted anywhere: moved in front of the subcommand, where the root option is parsed
        argv = ["--debug"] + [a for a in argv if a != "--debug"]
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
