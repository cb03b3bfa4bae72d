"""`bard-deploy export`: ONNX graphs, validation against PyTorch, optionally INT8 with its gate, the manifest.

Everything goes into a temporary sibling directory that is put in place only when every step passed:

    export(model_dir, out_dir, prompts)
      1. write_graphs      decoder.onnx, vision.onnx, embeddings.safetensors, config and tokenizer / processor files
      2. record            PyTorch's steps on real generations (image prompts, every denoising step): the
                           validation reference (inputs and outputs) and, for INT8, the calibration trajectories;
                           then the PyTorch weights are freed
      3. validate          ONNX vs the recorded PyTorch steps, replayed: max abs diff per output <= 1e-4, else an
                           ExportError naming the output
      4. quantize_and_gate (--int8 / --int4, calibration/gate.py) each quantized decoder + its accuracy gate
      5. Manifest.write    IO tables, model facts, parity and gate numbers, calibration hash, sha256 of every file

Memory stays bounded at any size: at most one model is in memory at a time (PyTorch for steps 1-2, the ONNX graph
for 3, the quantizer in its own process and then the fp32 and quantized sessions of the gate for 4), and the
recorded steps are kept lean (calibration/collect.py).

`prompts` (calibration/prompts.py) are the conversations decoded for steps 2 and 3: the user's data
(`--calib-data`), else the synthetic task for the embedded default.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from bard_deploy import iospec
from bard_deploy.atomic import atomic_dir, publish_file, recover_dir, write_json
from bard_deploy.calibration.collect import Trajectories, record_trajectories, record_vision, vision_records
from bard_deploy.calibration.gate import QuantOptions, quantize_and_gate
from bard_deploy.calibration.prompts import ExportPrompts, trajectory_options
from bard_deploy.checkpoint import SIDE_FILES, load_model
from bard_deploy.config import ModelConfig, load_config, resolve_source
from bard_deploy.converters.onnx_export import (
    FP16_TOLERANCE,
    FP32_TOLERANCE,
    compare,
    export_decoder,
    export_vision,
)
from bard_deploy.devices import resolve_dtype
from bard_deploy.errors import ExportError
from bard_deploy.manifest import Manifest, VisionGraph, base_variant_of
from bard_deploy.prompting import pixel_budget
from bard_deploy.runtimes.api import Pipeline
from bard_deploy.runtimes.backend import TorchBackend
from bard_deploy.runtimes.ort_backend import session
from bard_deploy.vlm import greedy_head

DECODER, VISION, EMBEDDINGS = "decoder.onnx", "vision.onnx", "embeddings.safetensors"
GRAPH_DTYPES = ("fp32", "fp16")


def export(model_dir: str | Path, out_dir: str | Path, prompts: ExportPrompts | None = None, int8: bool = False,
           int4: bool = False, quant_options: QuantOptions = QuantOptions(), force: bool = False,
           image_size: int | None = None, block_size: int | None = None, external_data: bool | None = None,
           dtype: str = "fp32", min_pixels: int | None = None, max_pixels: int | None = None,
           keep_calibration: bool = False, log=print) -> Manifest:
    """Export a checkpoint directory into `out_dir`; returns the manifest written there.

    prompts: the conversations to validate and calibrate on (default: `ExportPrompts.for_checkpoint`).
    image_size: the square image size vision.onnx is traced at (default: the processor's smallest).
    block_size: the trained block size of an imported Bard-VL checkpoint (its config does not record it).
    external_data: graph weights in `<graph>.onnx.data` (None: only above the 2 GB protobuf limit).
    dtype: the graphs' precision: "fp32" (CPU, the base of INT8 / INT4) or "fp16" (GPU targets: half the
    weights; validated against the model in fp16 PyTorch, tolerance FP16_TOLERANCE).
    min_pixels / max_pixels: the image processor's pixel budget in the export (its preprocessor_config.json, so
    every runtime resizes images into it the way the processor does); None: the checkpoint's.
    keep_calibration: keep INT8's calibration inputs in the bundle; by default they go beside it, as
    `<out_dir>.calibration.safetensors` (no runtime reads them, and they outweigh a small INT8 decoder).
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    o = quant_options.check()
    if dtype not in GRAPH_DTYPES:
        raise ExportError(f"--dtype must be one of {GRAPH_DTYPES}, got {dtype!r}", dtype)
    if dtype != "fp32" and (int8 or int4):
        raise ExportError("--int8 / --int4 quantize the fp32 graph: export them without --dtype fp16 (an INT4 graph "
                          "already runs on GPUs)", dtype)
    config = load_config(model_dir, block_size=block_size)        # checked before any heavy work
    if config.bard is not None and config.bard.block_size is None:
        raise ExportError(f"{model_dir} is a Bard-VL checkpoint that records no block size: pass --block-size "
                          "(the size it was trained with)", "block_size")
    recover_dir(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise ExportError(f"{out_dir} exists and is not empty (use --force to replace it)", str(out_dir))
    if prompts is None:
        prompts = ExportPrompts.for_checkpoint(model_dir, int8 or int4, o.calibration_samples, o.eval_samples)
    beside = calibration_beside(out_dir)
    staged = out_dir.parent / f".{beside.name}.tmp-{os.getpid()}"
    try:
        with atomic_dir(out_dir, ExportError, "export") as tmp:
            t0 = time.perf_counter()
            model = load_model(model_dir, block_size=block_size, dtype=resolve_dtype(dtype))
            side = copy_side_files(model_dir, model.config, tmp)
            if min_pixels is not None or max_pixels is not None:
                set_pixel_budget(side, min_pixels, max_pixels)
            pipe = Pipeline.from_backend(TorchBackend(model), side)
            manifest = write_graphs(pipe, model_dir, tmp, image_size, external_data)
            log(f"export: graphs written in {time.perf_counter() - t0:.1f} s")
            options = {"ar": model.config.bard is None, **trajectory_options(model.config)}
            t1 = time.perf_counter()
            reference = record_trajectories(pipe, prompts.validation, outputs=True, **options)
            images = None
            if manifest.vision is not None:      # the prompts' own images, then the budget's extremes and shapes
                images = record_vision(pipe, prompts.validation)
                checks = [vision_records(pipe, e["pixel_values"], e["image_grid_thw"])[0]
                          for e in size_check_images(pipe.encoder.processor)]
                images += checks
                grids = sorted({tuple(iospec.VisionIO.for_config(model.config).grid_of(f)) for f, _ in images})
                manifest = replace(manifest, vision=replace(manifest.vision, validated_grids=[list(g) for g in grids]))
            calibration = record_trajectories(pipe, prompts.calibration, **options) if int8 else None
            log(f"export: {len(reference)} reference steps recorded in {time.perf_counter() - t1:.1f} s")
            del pipe, model                 # the PyTorch weights go before any graph is loaded
            gc.collect()
            manifest = validate(tmp, manifest, reference, images, dtype, log)
            del reference
            variants = tuple(v for v, wanted in (("int8", int8), ("int4", int4)) if wanted)
            if variants:
                manifest = quantize_and_gate(tmp, manifest, prompts, o, variants, calibration, log)
            if manifest.calibration is not None and not keep_calibration:
                shutil.move(tmp / manifest.calibration["file"], staged)
                manifest = replace(manifest, calibration={**manifest.calibration, "file": beside.name,
                                                          "where": "beside the export"})
            manifest = manifest.write(tmp)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    if staged.exists():
        publish_file(staged, beside)
        log(f"export: calibration inputs kept beside the bundle: {beside}")
    elif beside.is_file():
        beside.unlink()                     # an earlier export's, replaced by this one (--force)
    return manifest


def calibration_beside(out_dir: Path) -> Path:
    """Where an export's calibration inputs go when they are kept out of the bundle."""
    return out_dir.parent / f"{out_dir.name}.calibration.safetensors"


def with_head(records, manifest: Manifest):
    """The recorded PyTorch steps with the fused greedy head's outputs added (computed from their logits by the
    same function the graph runs), when the graphs have the head: every graph output is checked. Its ids must
    match exactly (the fraction that differ is compared with the tolerance)."""
    for feeds, outputs in records:
        if manifest.fused_head:
            ids, probs = greedy_head(outputs[iospec.LOGITS], manifest.mask_token_id)
            outputs = {**outputs, iospec.TOP_IDS: ids, iospec.TOP_PROBS: probs.to(outputs[iospec.LOGITS].dtype)}
        yield feeds, outputs


def copy_side_files(model_dir: Path, config: ModelConfig, directory: Path) -> Path:
    """Write the (resolved) config and copy the tokenizer / processor / generation files of a checkpoint; returns
    `directory`. The config is written, not copied: an imported Bard-VL one gains its bard section here."""
    if config.bard is not None and config.bard.source_model:     # relative to the checkpoint: absolute here
        found, _ = resolve_source(model_dir, config.bard.source_model)
        if found is not None:
            config = config.with_bard(source_model=str(found.resolve()))
    write_json(directory / "config.json", config.to_dict())
    for name in SIDE_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, directory / name)
    return directory


def write_graphs(pipe: Pipeline, model_dir: Path, directory: Path, image_size: int | None,
                 external_data: bool | None = None) -> Manifest:
    """decoder.onnx, embeddings.safetensors and (for a VLM) vision.onnx; the manifest so far (no parity yet)."""
    model, cfg = pipe.backend.model, pipe.config
    io = export_decoder(model, directory / DECODER, external_data, EMBEDDINGS)
    base = base_variant_of(io.float_dtype)
    vision = write_vision(pipe, model_dir, directory, image_size, external_data) if cfg.has_vision else None
    return Manifest(model=str(model_dir), io=io.table(), num_layers=io.num_layers, num_kv_heads=io.num_kv_heads,
                    head_dim=io.head_dim, hidden_size=io.hidden_size, vocab_size=io.vocab_size,
                    mask_token_id=cfg.bard.mask_token_id if cfg.bard else None,
                    block_size=cfg.bard.block_size if cfg.bard else None, embeddings=EMBEDDINGS, vision=vision,
                    graphs={"decoder": {base: DECODER}}, default_variant=base,
                    tokenizer_files=[n for n in SIDE_FILES if (directory / n).is_file()], parity={},
                    exporter=f"torch {torch.__version__} TorchScript exporter, opset 17")


def write_vision(pipe: Pipeline, model_dir: Path, directory: Path, image_size: int | None,
                 external_data: bool | None = None) -> VisionGraph:
    """vision.onnx traced on a grey square image of `image_size` (default: the processor's smallest)."""
    processor = pipe.encoder.processor
    if processor is None:
        raise ExportError(f"{model_dir} has a vision tower but no preprocessor_config.json", str(model_dir))
    size = image_size or int(round((4 * processor.size["shortest_edge"]) ** 0.5))
    out = processor(images=[Image.new("RGB", (size, size), (128, 128, 128))], return_tensors="pt")
    io = export_vision(pipe.backend.model, directory / VISION, out["pixel_values"], out["image_grid_thw"],
                       external_data)
    return VisionGraph(VISION, size, out["image_grid_thw"][0].tolist(), io.table())


def set_pixel_budget(directory: Path, min_pixels: int | None, max_pixels: int | None) -> None:
    """Write the pixel budget into an export's preprocessor_config.json (the processor's own keys); a typed error
    naming a bad value (below one merged patch, min above max, or no image processor)."""
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        raise ExportError("--min-pixels / --max-pixels need an image processor (preprocessor_config.json); this "
                          "checkpoint has none", "max_pixels")
    cfg = json.loads(path.read_text())
    unit = (cfg.get("patch_size", 16) * cfg.get("merge_size", 2)) ** 2          # one LM image token
    size = dict(cfg.get("size") or {})
    known = {"shortest_edge": size.get("shortest_edge", cfg.get("min_pixels", unit)),
             "longest_edge": size.get("longest_edge", cfg.get("max_pixels", unit))}
    try:
        lo, hi = pixel_budget(known, unit, min_pixels, max_pixels)
    except ValueError as e:
        message = str(e).replace("min_pixels", "--min-pixels").replace("max_pixels", "--max-pixels")
        raise ExportError(message, max_pixels if max_pixels is not None else min_pixels) from e
    size.update(shortest_edge=lo, longest_edge=hi)
    cfg["size"] = size
    for key, value in (("min_pixels", lo), ("max_pixels", hi)):    # older processor configs carry these too
        if key in cfg:
            cfg[key] = value
    write_json(path, cfg)


# the largest image the export validates the vision graph at: a budget of 16 M pixels (Qwen3-VL's default) would
# need the PyTorch tower at 65536 patches, a 17 GB attention matrix per head
VALIDATION_MAX_PIXELS = 1024 * 1024


def size_check_images(processor) -> list[dict]:
    """The processor's outputs for grey images at the extremes of its pixel budget and of aspect ratio (the
    smallest it allows, the largest square, 2:1 wide and 1:3 tall at the budget, capped at
    VALIDATION_MAX_PIXELS): the vision graph is validated at each grid they give."""
    lo = processor.size["shortest_edge"]
    hi = min(processor.size["longest_edge"], VALIDATION_MAX_PIXELS)
    side = int(hi ** 0.5)
    sizes = [(int(lo ** 0.5),) * 2, (side, side), (int(side * 2 ** 0.5), int(side / 2 ** 0.5)),
             (int(side / 3 ** 0.5), int(side * 3 ** 0.5))]
    return [processor(images=[Image.new("RGB", wh, (96, 128, 160))], return_tensors="pt") for wh in sizes]


def validate(directory: Path, manifest: Manifest, reference: Trajectories, images: list | None, dtype: str,
             log) -> Manifest:
    """ONNX vs PyTorch on every recorded step of the validation prompts' trajectories (`reference`, recorded with
    their outputs) and on their images (vision, `images`); the manifest with the parity report. ExportError naming
    the worst output over the tolerance. One graph is loaded at a time. fp32: max abs diff <= FP32_TOLERANCE;
    fp16: relative to max(1, each output's magnitude), <= FP16_TOLERANCE."""
    tolerance, relative = (FP32_TOLERANCE, False) if dtype == "fp32" else (FP16_TOLERANCE, True)
    parity = {"tolerance": tolerance, "steps": len(reference), **({"relative": True} if relative else {}),
              "decoder": compare(DECODER, session(directory / DECODER), with_head(reference.records(), manifest),
                                 tolerance, relative)}
    if manifest.vision is not None:
        if not images:
            raise ExportError("no validation prompt has an image: vision.onnx cannot be validated", VISION)
        parity["vision"] = compare(VISION, session(directory / VISION), images, tolerance, relative)
    worst = parity["decoder"][iospec.LOGITS]
    log(f"export: parity logits {worst:.2e} (max over {parity['steps']} trajectory steps; tolerance "
        f"{tolerance:g})")
    return replace(manifest, parity=parity)
