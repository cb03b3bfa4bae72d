"""ONNX export of the decoder step and the vision tower, validated against PyTorch inside the export.

Graphs (IO names from `bard_deploy.iospec`, the one IO table):
- `decoder.onnx`: one graph for prefill, denoise and commit+denoise; dynamic batch, sequence and past length.
  Attention is lowered as MatMul + additive mask + Softmax (never ORT's GroupQueryAttention, which is always
  causal). Exported with the TorchScript exporter (`dynamo=False`): on this stack it takes 0.3 s instead of
  10-25 s, writes one self-contained file, and ORT reproduces PyTorch to ~1e-6 (environment.md section 3).
- `vision.onnx`: image patches -> image embeddings and DeepStack features, traced at the processor's fixed
  resolution (one image per call; the grid is recorded in the manifest and any other grid is refused).
- `embeddings.safetensors`: the token embedding table (a lookup is not worth a graph). For a tied model it is
  also the LM head's weight: stored once, transposed, and decoder.onnx's head initializer points into it
  (bard_deploy/onnx_files.py).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import onnx
import torch
from torch import nn

from bard_deploy import iospec
from bard_deploy.calibration.collect import track_worst
from bard_deploy.errors import ExportError
from bard_deploy.onnx_files import Shared, gather_external_data, logits_matmuls, write_table
from bard_deploy.runtimes.ort_backend import run
from bard_deploy.vision import grid_inputs

FP32_TOLERANCE = 1e-4   # max abs diff, ONNX vs PyTorch, every output, on recorded real step inputs
# fp16 graphs against the same model in fp16 PyTorch: both round to fp16 (~3 decimal digits) but accumulate in
# different orders. Relative to max(1, the output's largest magnitude); measured on the tiny test models (2 and 4
# layers): worst 1.8e-3 and 2.0e-3 (3.9e-3 and 5.9e-3 absolute), so the tolerance leaves a 10x margin.
FP16_TOLERANCE = 2e-2


class DecoderStep(nn.Module):
    """The step with flat positional IO in IO-table order, as the exporter needs it."""

    def __init__(self, model, io: iospec.DecoderIO):
        super().__init__()
        self.model, self.io = model, io

    def forward(self, *flat):
        """Flat inputs in IO-table order -> flat outputs in IO-table order."""
        args = self.io.unpack_feeds(dict(zip(self.io.input_names, flat, strict=True)))
        logits, kv = self.model.step(*args)
        top = None
        if self.io.fused_head:
            ids, probs = self.model.greedy_head(logits)
            top = ids, probs.to(logits.dtype)
        return tuple(self.io.outputs_of(logits, kv, top).values())


class VisionEncoder(nn.Module):
    """The vision tower for one image of any grid: (pixel patches, the grid-derived inputs of
    `vision.grid_inputs`) -> (image embeds, DeepStack features). transformers' own forward, given its precomputed
    tensors, with one attention segment per image (`whole_image_attention`)."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual

    def forward(self, pixel_values, interp_indices, interp_weights, position_ids):
        """(patches, patch_dim), (patches, 4), (patches, 4), (patches, 2) -> image embeds (tokens, hidden),
        DeepStack features (n_ds, tokens, hidden)."""
        n = pixel_values.shape[0]
        cu_seqlens = torch.stack([torch.zeros((), dtype=torch.int32), torch.tensor(n, dtype=torch.int32)])
        out = self.visual(pixel_values.to(self.visual.dtype), grid_thw=torch.zeros(1, 3, dtype=torch.long),
                          interp_indices=interp_indices, interp_weights=interp_weights.to(self.visual.dtype),
                          position_ids=position_ids, cu_seqlens=cu_seqlens, return_dict=True)
        ds = out.deepstack_features
        embeds = out.pooler_output
        return embeds, torch.stack(ds) if ds else embeds.new_zeros(0, *embeds.shape)


class FusedAttention(torch.autograd.Function):
    """softmax(q k^T * scale) v, unmasked, over (1, S, heads * head_dim) tensors; in the graph one
    com.microsoft MultiHeadAttention node, whose onnxruntime CPU kernel is a flash attention (no S x S score
    matrix: at 8160 patches the decomposed MatMul + Softmax holds 4.3 GB per score tensor)."""

    @staticmethod
    def forward(ctx, q, k, v, num_heads: int, scale: float):
        """The attention in PyTorch (what runs while tracing and what the node must equal)."""
        seq = q.shape[1]
        q, k, v = (t.view(1, seq, num_heads, -1).transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
        return out.transpose(1, 2).reshape(1, seq, -1)

    @staticmethod
    def symbolic(g, q, k, v, num_heads: int, scale: float):
        """The ONNX node the TorchScript exporter writes in its place."""
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=num_heads, scale_f=scale)
        out.setType(q.type())
        return out


def _whole_image_attention(self, hidden_states, cu_seqlens=None, position_embeddings=None, max_seqlen=None,
                           fused: bool = False, **kwargs):
    """Qwen3VLVisionAttention.forward for one segment (one image): the same projections, rotary and attention
    function over all patches, without transformers' split by `cu_seqlens.tolist()` (a trace would freeze those
    lengths into the graph)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import (
        ALL_ATTENTION_FUNCTIONS,
        apply_rotary_pos_emb_vision,
        eager_attention_forward,
    )

    seq = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    if fused:                                       # the CPU graph: onnxruntime's fused (flash) attention
        out = FusedAttention.apply(*(t.reshape(1, seq, -1) for t in (q, k, v)), self.num_heads, self.scaling)
        return self.proj(out.reshape(seq, -1))
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    out = attention(self, q, k, v, attention_mask=None, scaling=self.scaling, dropout=0.0, is_causal=False)[0]
    return self.proj(out.reshape(seq, -1).contiguous())


@contextmanager
def whole_image_attention(fused: bool):
    """Within: every Qwen3-VL vision attention computes one segment per call (what the vision graph traces);
    `fused`: fp32 attention as one FusedAttention node (else MatMul + Softmax, e.g. for fp16 graphs, which
    onnxruntime's CPU MultiHeadAttention does not run)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionAttention

    def forward(self, *args, **kwargs):
        return _whole_image_attention(self, *args, fused=fused, **kwargs)

    previous = Qwen3VLVisionAttention.forward
    Qwen3VLVisionAttention.forward = forward
    try:
        yield
    finally:
        Qwen3VLVisionAttention.forward = previous


def _dynamic_axes(specs) -> dict[str, dict[int, str]]:
    return {s.name: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)} for s in specs}


def _export(module: nn.Module, example: tuple, path: Path, inputs, outputs, external_data: bool | None,
            share=None, contrib_ops: bool = False) -> None:
    """torch.onnx.export with our settings: TorchScript exporter, opset 17, IO names and dynamic axes from specs.

    external_data: weights in one `<graph>.data` file beside the graph; None = only when the graph would pass
    protobuf's 2 GB limit (the exporter then writes one file per tensor, which this gathers into one).
    share(path) -> {initializer name: Shared}: initializers that point into another file instead.
    contrib_ops: the graph uses onnxruntime's com.microsoft operators (FusedAttention)."""
    before = set(path.parent.iterdir())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), example, str(path), input_names=[s.name for s in inputs],
                          output_names=[s.name for s in outputs], dynamic_axes=_dynamic_axes((*inputs, *outputs)),
                          opset_version=17, dynamo=False, do_constant_folding=True,
                          custom_opsets={"com.microsoft": 1} if contrib_ops else None)
    written = [p for p in set(path.parent.iterdir()) - before if p != path]      # per-tensor files, if any
    shared = share(path) if share is not None else {}
    if written or external_data or shared:
        # inline tensors stay inline unless external data is asked for or needed
        gather_external_data(path, written, shared=shared,
                             **({} if written or external_data else {"threshold": sys.maxsize}))


def _tied_head(graph: Path, io: iospec.DecoderIO, table: Path, offset: int) -> dict[str, Shared]:
    """The tied LM head's weight initializer (the [hidden, vocab] input of the MatMul that writes the logits),
    shared with the transposed table written at `offset` of `table`."""
    proto = onnx.load(str(graph), load_external_data=False).graph
    inits = {t.name: t for t in proto.initializer}
    heads = [n.input[1] for n in logits_matmuls(proto, iospec.LOGITS)
             if n.input[1] in inits and list(inits[n.input[1]].dims) == [io.hidden_size, io.vocab_size]]
    if len(heads) != 1:
        raise ExportError(f"{graph.name}: cannot find the tied LM head's weight (found {heads})", graph.name)
    size = torch.finfo(iospec.FLOAT_DTYPES[io.float_dtype]).bits // 8
    return {heads[0]: Shared(table, table.name, offset, size * io.hidden_size * io.vocab_size)}


def float_dtype_of(model) -> str:
    """The graphs' float IO dtype for a model's weights: "float32" or "float16"."""
    dtype = next(model.parameters()).dtype
    names = {t: n for n, t in iospec.FLOAT_DTYPES.items()}
    if dtype not in names:
        raise ExportError(f"graphs are exported from fp32 or fp16 weights, not {dtype}", str(dtype))
    return names[dtype]


def export_decoder(model, path: Path, external_data: bool | None = None,
                   embeddings: str = "embeddings.safetensors", fused_head: bool = True) -> iospec.DecoderIO:
    """Write decoder.onnx (fp32, MatMul+Softmax attention; `external_data` as in `_export`; `fused_head`: with
    the greedy head's outputs) and the embedding table `embeddings` beside it (a tied head points into it);
    returns its IO."""
    io = iospec.DecoderIO.for_config(model.config, float_dtype_of(model), fused_head)
    table = path.with_name(embeddings)
    tied = model.lm_head is None
    offset = write_table(table, model.language_model.embed_tokens.weight, transposed=tied)
    example = io.dummy_feeds(batch=2, seq=3, past=4)     # sizes >= 2 so no dimension is specialised to 0 or 1
    lm = model.language_model
    previous = lm.use_sdpa
    lm.use_sdpa = False
    try:
        _export(DecoderStep(model, io), tuple(example.values()), path, io.inputs, io.outputs, external_data,
                (lambda graph: _tied_head(graph, io, table, offset)) if tied else None)
    finally:
        lm.use_sdpa = previous
    return io


def export_vision(model, path: Path, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                  external_data: bool | None = None) -> iospec.VisionIO:
    """Write vision.onnx, traced on one image (`pixel_values` of grid `grid_thw`) but taking any grid: the
    number of patches is dynamic and the grid-derived tensors are inputs; returns its IO."""
    io = iospec.VisionIO.for_config(model.config, float_dtype_of(model))
    feeds = io.feeds(pixel_values, grid_inputs(model.config.vision, grid_thw[0].tolist()))
    fused = io.float_dtype == "float32"         # onnxruntime's CPU MultiHeadAttention has no fp16 kernel
    with whole_image_attention(fused):
        _export(VisionEncoder(model.visual), tuple(feeds.values()), path, io.inputs, io.outputs, external_data,
                contrib_ops=fused)
    return io


def compare(graph: str, sess, recorded: Iterable[tuple[dict, dict]], tolerance: float,
            relative: bool = False) -> dict[str, float]:
    """Max abs diff per output of `sess` against recorded (feeds, torch outputs) (`relative`: as `track_worst`);
    an ExportError names the worst output over the tolerance. The one comparison of every exported graph."""
    worst: dict[str, float] = {}
    names = [o.name for o in sess.get_outputs()]
    for feeds, expected in recorded:
        track_worst(worst, run(sess, names, feeds), expected, relative)
    return check_tolerance(graph, worst, tolerance)


def check_tolerance(graph: str, worst: dict[str, float], tolerance: float) -> dict[str, float]:
    """`worst` (max abs diff per output) when every output is within `tolerance`; else an ExportError naming the
    worst output of `graph` and its difference."""
    bad = {n: d for n, d in worst.items() if not d <= tolerance}
    if bad:
        n, d = max(bad.items(), key=lambda kv: kv[1])
        raise ExportError(f"{graph}: output '{n}' differs from PyTorch by {d:.3g} (tolerance {tolerance:g})", n)
    return worst
