"""ONNX export of the decoder step and the vision tower, validated against PyTorch inside the export.

Graphs (IO names from `bard_deploy.iospec`, the one IO table):
- `decoder.onnx`: one graph for prefill, denoise and commit+denoise; dynamic batch, sequence and past length.
  Attention is lowered as MatMul + additive mask + Softmax (never ORT's GroupQueryAttention, which is always
  causal). Exported with the TorchScript exporter (`dynamo=False`): on this stack it takes 0.3 s instead of
  10-25 s, writes one self-contained file, and ORT reproduces PyTorch to ~1e-6 (environment.md section 3).
- `vision.onnx`: image patches -> image embeddings and DeepStack features, traced at the processor's fixed
  resolution (one image per call; the grid is recorded in the manifest and any other grid is refused).
- `embeddings.safetensors`: the token embedding table (a lookup is not worth a graph).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from bard_deploy import iospec
from bard_deploy.calibration.collect import track_worst
from bard_deploy.errors import ExportError
from bard_deploy.onnx_files import gather_external_data
from bard_deploy.runtimes.ort_backend import run
from bard_deploy.vision import encode_images

FP32_TOLERANCE = 1e-4   # max abs diff, ONNX vs PyTorch, every output, on recorded real step inputs


class DecoderStep(nn.Module):
    """The step with flat positional IO in IO-table order, as the exporter needs it."""

    def __init__(self, model, io: iospec.DecoderIO):
        super().__init__()
        self.model, self.io = model, io

    def forward(self, *flat):
        """Flat inputs in IO-table order -> flat outputs in IO-table order."""
        x, pos, bias, past, ds = self.io.unpack_feeds(dict(zip(self.io.input_names, flat, strict=True)))
        return tuple(self.io.outputs_of(*self.model.step(x, pos, bias, past, ds)).values())


class VisionEncoder(nn.Module):
    """The vision tower for one image of a fixed grid: pixel patches -> (image embeds, DeepStack features)."""

    def __init__(self, visual, grid_thw: torch.Tensor):
        super().__init__()
        self.visual = visual
        self.register_buffer("grid", grid_thw, persistent=False)

    def forward(self, pixel_values):
        """(patches, patch_dim) -> image embeds (tokens, hidden), DeepStack features (n_ds, tokens, hidden)."""
        return encode_images(self.visual, pixel_values, self.grid)


def _dynamic_axes(specs) -> dict[str, dict[int, str]]:
    return {s.name: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)} for s in specs}


def _export(module: nn.Module, example: tuple, path: Path, inputs, outputs, external_data: bool | None) -> None:
    """torch.onnx.export with our settings: TorchScript exporter, opset 17, IO names and dynamic axes from specs.

    external_data: weights in one `<graph>.data` file beside the graph; None = only when the graph would pass
    protobuf's 2 GB limit (the exporter then writes one file per tensor, which this gathers into one)."""
    before = set(path.parent.iterdir())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), example, str(path), input_names=[s.name for s in inputs],
                          output_names=[s.name for s in outputs], dynamic_axes=_dynamic_axes((*inputs, *outputs)),
                          opset_version=17, dynamo=False, do_constant_folding=True)
    written = [p for p in set(path.parent.iterdir()) - before if p != path]      # per-tensor files, if any
    if written or external_data:
        gather_external_data(path, written)


def export_decoder(model, path: Path, external_data: bool | None = None) -> iospec.DecoderIO:
    """Write decoder.onnx (fp32, MatMul+Softmax attention; `external_data` as in `_export`); returns its IO."""
    io = iospec.DecoderIO.for_config(model.config)
    example = io.dummy_feeds(batch=2, seq=3, past=4)     # sizes >= 2 so no dimension is specialised to 0 or 1
    lm = model.language_model
    previous = lm.use_sdpa
    lm.use_sdpa = False
    try:
        _export(DecoderStep(model, io), tuple(example.values()), path, io.inputs, io.outputs, external_data)
    finally:
        lm.use_sdpa = previous
    return io


def export_vision(model, path: Path, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                  external_data: bool | None = None) -> iospec.VisionIO:
    """Write vision.onnx for one image of the given grid (the processor's fixed resolution); returns its IO."""
    io = iospec.VisionIO.for_grid(model.config, grid_thw[0].tolist())
    _export(VisionEncoder(model.visual, grid_thw), (pixel_values,), path, io.inputs, io.outputs, external_data)
    return io


def compare(graph: str, sess, recorded: Iterable[tuple[dict, dict]], tolerance: float) -> dict[str, float]:
    """Max abs diff per output of `sess` against recorded (feeds, torch outputs); an ExportError names the worst
    output over the tolerance. The one comparison of every exported graph (decoder and vision)."""
    worst: dict[str, float] = {}
    names = [o.name for o in sess.get_outputs()]
    for feeds, expected in recorded:
        track_worst(worst, run(sess, names, feeds), expected)
    return check_tolerance(graph, worst, tolerance)


def check_tolerance(graph: str, worst: dict[str, float], tolerance: float) -> dict[str, float]:
    """`worst` (max abs diff per output) when every output is within `tolerance`; else an ExportError naming the
    worst output of `graph` and its difference."""
    bad = {n: d for n, d in worst.items() if not d <= tolerance}
    if bad:
        n, d = max(bad.items(), key=lambda kv: kv[1])
        raise ExportError(f"{graph}: output '{n}' differs from PyTorch by {d:.3g} (tolerance {tolerance:g})", n)
    return worst
