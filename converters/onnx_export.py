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
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bard_deploy import iospec
from bard_deploy.errors import ExportError
from bard_deploy.vision import encode_images

FP32_TOLERANCE = 1e-4   # max abs diff, ONNX vs PyTorch, every output, on recorded real step inputs


class DecoderStep(nn.Module):
    """The step with flat positional IO in IO-table order, as the exporter needs it."""

    def __init__(self, model, io: iospec.DecoderIO):
        super().__init__()
        self.model, self.io = model, io

    def forward(self, inputs_embeds, position_ids, attention_bias, *rest):
        n = self.io.num_layers
        past = [(rest[2 * i], rest[2 * i + 1]) for i in range(n)]
        deepstack = rest[2 * n] if self.io.num_deepstack else None
        logits, new_kv = self.model.step(inputs_embeds, position_ids, attention_bias, past, deepstack)
        return (logits, *[t for kv in new_kv for t in kv])


class VisionEncoder(nn.Module):
    def __init__(self, visual, grid_thw: torch.Tensor):
        super().__init__()
        self.visual = visual
        self.register_buffer("grid", grid_thw, persistent=False)

    def forward(self, pixel_values):
        return encode_images(self.visual, pixel_values, self.grid)


def _dims(spec: iospec.TensorSpec) -> dict[int, str]:
    return {i: d for i, d in enumerate(spec.shape) if isinstance(d, str)}


def export_decoder(model, path: Path) -> iospec.DecoderIO:
    """Write decoder.onnx (fp32, MatMul+Softmax attention)."""
    io = iospec.DecoderIO.for_config(model.config)
    c = model.config.text
    B, T, P = 2, 3, 4      # example sizes >= 2 so no dimension is specialised to 0 or 1
    ex = {iospec.INPUTS_EMBEDS: torch.randn(B, T, c.hidden_size),
          iospec.POSITION_IDS: torch.arange(T).expand(3, B, T).contiguous(),
          iospec.ATTENTION_BIAS: torch.zeros(B, 1, T, P + T)}
    for i in range(io.num_layers):
        ex[iospec.past_key(i)] = torch.randn(B, io.num_kv_heads, P, io.head_dim)
        ex[iospec.past_value(i)] = torch.randn(B, io.num_kv_heads, P, io.head_dim)
    if io.num_deepstack:
        ex[iospec.DEEPSTACK_EMBEDS] = torch.zeros(io.num_deepstack, B, T, c.hidden_size)
    names_in = [s.name for s in io.inputs]
    names_out = [s.name for s in io.outputs]
    assert list(ex) == names_in, (list(ex), names_in)
    dynamic = {s.name: _dims(s) for s in (*io.inputs, *io.outputs)}
    lm = model.language_model
    previous = lm.use_sdpa
    lm.use_sdpa = False
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(DecoderStep(model, io).eval(), tuple(ex.values()), str(path), input_names=names_in,
                              output_names=names_out, dynamic_axes=dynamic, opset_version=17, dynamo=False,
                              do_constant_folding=True)
    finally:
        lm.use_sdpa = previous
    return io


VISION_PIXELS = "pixel_values"
VISION_EMBEDS = "image_embeds"


def export_vision(model, path: Path, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> None:
    """Write vision.onnx for one image of the given grid (the processor's fixed resolution)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(VisionEncoder(model.visual, grid_thw).eval(), (pixel_values,), str(path),
                          input_names=[VISION_PIXELS], output_names=[VISION_EMBEDS, iospec.DEEPSTACK_EMBEDS],
                          opset_version=17, dynamo=False, do_constant_folding=True)


def session(path: Path, threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")   # as the runtime does
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def to_numpy(feeds: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().contiguous().numpy() for k, v in feeds.items()}


def compare(name: str, sess, recorded: list[tuple[dict, dict]], tolerance: float) -> dict[str, float]:
    """Max abs diff per output of `sess` against recorded (feeds, torch outputs); an error names the worst."""
    worst: dict[str, float] = {}
    out_names = [o.name for o in sess.get_outputs()]
    for feeds, expected in recorded:
        got = sess.run(out_names, to_numpy(feeds))
        for n, g in zip(out_names, got, strict=True):
            diff = float(np.abs(g - expected[n].detach().numpy()).max()) if g.size else 0.0
            worst[n] = max(worst.get(n, 0.0), diff)
    bad = {n: d for n, d in worst.items() if not d <= tolerance}
    if bad:
        n, d = max(bad.items(), key=lambda kv: kv[1])
        raise ExportError(f"{name}: output '{n}' differs from PyTorch by {d:.3g} (tolerance {tolerance:g})", n)
    return worst
