"""Quantization recipes for the decoder graph, each writing one graph (+ its one external-data file when the fp32
graph has one): INT8 for CPUs (ORT dynamic), INT8 Q/DQ for TensorRT and CUDA, INT4 weight-only (MatMulNBits).

INT8, CPU target: dynamic int8 with 7-bit weights (reduce_range: U8S8 saturates on AVX2 without VNNI; S8S8 QDQ
is 10x slower there), per channel, MatMul only. tensorrt / cuda targets: static per-channel S8S8 Q/DQ from the
calibration steps (TensorRT's explicit quantization). INT4: onnxruntime's MatMulNBits, symmetric, in blocks of
32 or 128 weights along the input dimension, `accuracy_level` choosing the compute type of the kernel
(0 = unset, 1 = fp32, 2 = fp16, 3 = bf16, 4 = int8). `sensitive_matmuls` names the nodes kept in fp32 when the
accuracy gate fails with everything quantized: lm_head and the first and last decoder layers.
"""

from __future__ import annotations

import logging
import multiprocessing
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from unittest.mock import patch

import numpy as np
import onnx
import torch
from onnx.external_data_helper import load_external_data_for_model
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, onnx_quantizer, quantize_static
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
from onnxruntime.quantization.quant_utils import QuantizationMode, add_infer_metadata, update_opset_version
from onnxruntime.quantization.shape_inference import quant_pre_process

from bard_deploy import iospec
from bard_deploy.calibration.collect import Trajectories
from bard_deploy.errors import ExportError
from bard_deploy.onnx_files import data_file, gather_external_data, logits_matmuls, shared_tensors
from bard_deploy.runtimes.ort_backend import to_numpy

TARGETS = ("cpu", "cuda", "tensorrt")
VARIANTS = ("int8", "int4")
SCHEMES = {"cpu": "dynamic, per-token u8 activations (symmetric, zero point 128), per-channel s8 weights with "
                  "reduce_range (7-bit), MatMul only",
           "cuda": "static QDQ S8S8, per-channel weights", "tensorrt": "static QDQ S8S8, per-channel weights"}


def graph_name(variant: str, target: str = "cpu") -> str:
    """The file name of a quantized decoder."""
    if variant == "int4":
        return "decoder.int4.onnx"
    return "decoder.int8.onnx" if target == "cpu" else "decoder.qdq.onnx"


def int4_scheme(block_size: int, accuracy_level: int, lm_head: bool) -> str:
    """What an INT4 graph holds, for the manifest and the export table."""
    return (f"weight-only int4 MatMulNBits, symmetric, blocks of {block_size}, accuracy_level {accuracy_level}, "
            f"lm_head {'int4' if lm_head else 'fp32'}")


class _Reader(CalibrationDataReader):
    """Feeds the recorded calibration steps to ORT's static quantizer, one step at a time."""

    def __init__(self, steps: Iterable[dict[str, torch.Tensor]]):
        self.it = iter(steps)

    def get_next(self):
        """The next step's feeds as numpy, or None when all were given."""
        feeds = next(self.it, None)
        return None if feeds is None else to_numpy(feeds)


def _publish(scratch_graph: Path, out: Path, fp32: Path) -> None:
    """Gather a quantizer's output into `<graph>` + `<graph>.data` and move both to `out` (the ORT tools leave
    large scratch files behind: they stay in the scratch directory). What the fp32 graph shares (a tied head kept
    in fp32) stays shared."""
    leftovers = [p for p in scratch_graph.parent.iterdir() if p.name.startswith(scratch_graph.name + ".")
                 or p.suffix == ".data"]
    gather_external_data(scratch_graph, leftovers, shared=shared_tensors(fp32))
    shutil.move(scratch_graph, out)
    if data_file(scratch_graph).is_file():
        shutil.move(data_file(scratch_graph), data_file(out))


def isolated(fn: Callable, *args) -> None:
    """Run `fn(*args)` (a quantizer) in a fresh child process when the graph (`args[0]`) has external data: the
    quantizers hold the whole graph and its quantized copy (at 2B: 8.5 + 2 GB), and only a process that exits
    surely gives all of that back before the gate loads its sessions. Small graphs are quantized in-process."""
    if not data_file(args[0]).is_file():
        fn(*args)
        return
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            pool.submit(fn, *args).result()
        except BrokenProcessPool as e:
            raise ExportError(f"the quantizer process for {Path(args[0]).name} died (out of memory?)",
                              str(args[0])) from e


def quantize(fp32: Path, out: Path, target: str, calibration: Path | None, exclude: list[str]) -> None:
    """Write an INT8 copy of the decoder graph `fp32` to `out`. `calibration`: the saved trajectories
    (`Trajectories.save`), read one step at a time (static targets only); `exclude`: node names kept in fp32.

    The static quantizer needs shapes inferred first (ORT's pre-processing); the dynamic one quantizes
    initializer weights and needs none, so its input is the validated graph itself (pre-processing it would load
    the whole graph into an ORT session and write a second copy: at 2B another 8.5 GB)."""
    external = data_file(fp32).is_file()
    with tempfile.TemporaryDirectory() as scratch, _quiet_quantizer():
        pre, q = Path(scratch) / "pre.onnx", Path(scratch) / out.name
        if target == "cpu":
            quantize_dynamic_lean(fp32, q, exclude, external)
            per_token_activations(q)
        else:
            assert calibration is not None, "a static INT8 target needs calibration trajectories"
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True, save_as_external_data=external,
                              all_tensors_to_one_file=True, external_data_location="pre.onnx.data")
            quantize_static(str(pre), str(q), _Reader(Trajectories.load(calibration).feeds()),
                            quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                            op_types_to_quantize=["MatMul"], nodes_to_exclude=exclude,
                            use_external_data_format=external,
                            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
        _publish(q, out, fp32)


def quantize_dynamic_lean(fp32: Path, out: Path, exclude: list[str], external: bool) -> None:
    """ORT's `quantize_dynamic` (int8 per-channel weights with reduce_range, MatMul only, MatMulConstBOnly) with the
    graph held in memory once. ORT's own keeps up to three copies: its quantizer re-infers shapes by deep-copying
    the model, saving the copy and loading it again (measured at 2B: the process passed 20 GiB and was killed).
    Shapes are inferred here on the graph without its weights (shape inference needs only their dims), then the
    weights are loaded into that same model and ORT's quantizer runs on it with its re-inference a no-op, which is
    exact because a decoder graph has no Gemm for it to rewrite first. `test_lean_dynamic_int8_is_ort_s_own`
    checks the result is the graph `quantize_dynamic` writes."""
    model = onnx.load(str(fp32), load_external_data=False)
    gemms = [n.name for n in model.graph.node if n.op_type == "Gemm"]
    if gemms:
        raise ExportError(f"{fp32.name} has Gemm nodes {gemms[:3]}: the lean INT8 path expects MatMul only",
                          gemms[0])
    inferred = onnx.shape_inference.infer_shapes(model)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    del inferred
    load_external_data_for_model(model, str(fp32.parent))
    add_infer_metadata(model)
    model = update_opset_version(model, QuantType.QInt8)
    with patch.object(onnx_quantizer, "save_and_reload_model_with_shape_infer", lambda m: m):
        quantizer = ONNXQuantizer(model, True, True, QuantizationMode.IntegerOps, False, QuantType.QInt8,
                                  QuantType.QUInt8, None, [], list(exclude), ["MatMul"], {"MatMulConstBOnly": True})
        quantizer.quantize_model()
    quantizer.model.save_model_to_file(str(out), external)


TOKEN_AXIS_ZERO_POINT = 128     # u8 activations hold round(x / scale) + 128: symmetric values, one zero point


def per_token_activations(graph: Path) -> int:
    """Rewrite every DynamicQuantizeLinear of a dynamic-INT8 graph (one scale and zero point for the whole
    activation tensor: over every row of a batch and every token of a step, so a row's answer would depend on
    the rows beside it) into per-token quantization: scale = max |x| over the hidden axis / 127 per token, values
    round(x / scale) + 128 in u8, zero point the constant 128 (MatMulInteger takes only a scalar one). The scale
    (..., 1) broadcasts through the Mul nodes that already multiply it with the weights' per-channel scales, and
    MatMulInteger's output row m depends on input row m alone, so each token is quantized, multiplied and
    rescaled on its own: batch- and step-invariant. Only the graph file is rewritten (the weights' data file is
    untouched); returns the number of nodes rewritten."""
    model = onnx.load(str(graph), load_external_data=False)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    g = model.graph
    consts = {"pt_inv127": np.float32(1 / 127), "pt_eps": np.float32(1e-30), "pt_zp_f": np.float32(
        TOKEN_AXIS_ZERO_POINT), "pt_lo": np.float32(0), "pt_hi": np.float32(255), "pt_zp": np.uint8(
        TOKEN_AXIS_ZERO_POINT), "pt_axes": np.array([-1], dtype=np.int64)}
    g.initializer.extend(onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items())
    nodes, rewritten = [], 0
    for n in g.node:
        if n.op_type != "DynamicQuantizeLinear":
            nodes.append(n)
            continue
        (x,), (q, scale, zp), p = n.input, n.output, n.name
        if opset >= 18:
            reduce = onnx.helper.make_node("ReduceMax", [p + "_abs", "pt_axes"], [p + "_max"], keepdims=1)
        else:
            reduce = onnx.helper.make_node("ReduceMax", [p + "_abs"], [p + "_max"], axes=[-1], keepdims=1)
        nodes += [onnx.helper.make_node("Abs", [x], [p + "_abs"]), reduce,
                  onnx.helper.make_node("Mul", [p + "_max", "pt_inv127"], [p + "_raw_scale"]),
                  onnx.helper.make_node("Max", [p + "_raw_scale", "pt_eps"], [scale]),
                  onnx.helper.make_node("Div", [x, scale], [p + "_div"]),
                  onnx.helper.make_node("Round", [p + "_div"], [p + "_round"]),
                  onnx.helper.make_node("Add", [p + "_round", "pt_zp_f"], [p + "_shift"]),
                  onnx.helper.make_node("Clip", [p + "_shift", "pt_lo", "pt_hi"], [p + "_clip"]),
                  onnx.helper.make_node("Cast", [p + "_clip"], [q], to=onnx.TensorProto.UINT8),
                  onnx.helper.make_node("Identity", ["pt_zp"], [zp])]
        rewritten += 1
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]              # shape hints of the per-tensor scales (and their products) are stale now
    onnx.save(model, str(graph))
    return rewritten


def quantize_int4(fp32: Path, out: Path, block_size: int = 32, accuracy_level: int = 0,
                  exclude: list[str] = ()) -> None:
    """Write a weight-only INT4 (MatMulNBits) copy of the decoder graph `fp32` to `out`; `exclude`: node names
    kept in fp32 (lm_head among them to keep it fp32)."""
    with _quiet_quantizer():
        quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=4, block_size=block_size, is_symmetric=True,
                                         accuracy_level=accuracy_level or None, nodes_to_exclude=list(exclude),
                                         op_types_to_quantize=("MatMul",))
        quantizer.process()
    with tempfile.TemporaryDirectory() as scratch:
        q = Path(scratch) / out.name
        quantizer.model.save_model_to_file(str(q), use_external_data_format=data_file(fp32).is_file())
        del quantizer
        _publish(q, out, fp32)


def lm_head_matmuls(model_path: Path) -> list[str]:
    """The MatMul nodes of the LM head: the one that writes the logits output (a tied head is a bare `/MatMul`
    over the transposed embedding, with no lm_head in its name) and any named after lm_head."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    head = {n.name for n in logits_matmuls(graph, iospec.LOGITS)}
    return [n.name for n in graph.node if n.op_type == "MatMul" and (n.name in head or "lm_head" in n.name)]


def sensitive_matmuls(model_path: Path, layers: int) -> list[str]:
    """MatMul nodes of the LM head and of the first and last decoder layers (kept fp32 when the gate fails)."""
    keep = lm_head_matmuls(model_path)
    for node in onnx.load(str(model_path), load_external_data=False).graph.node:
        if node.op_type == "MatMul" and ("layers.0/" in node.name or f"layers.{layers - 1}/" in node.name):
            keep.append(node.name)
    return keep


def _not_the_pre_processing_advice(record: logging.LogRecord) -> bool:
    # the dynamic quantizer's advice to pre-process, skipped on purpose (see `quantize`)
    return not record.getMessage().startswith("Please consider to run pre-processing")


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """ORT's quantizers log every node at INFO on the root logger: keep that out of the user's terminal."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    root.addFilter(_not_the_pre_processing_advice)
    for h in root.handlers:
        h.addFilter(_not_the_pre_processing_advice)
    try:
        yield
    finally:
        root.setLevel(level)
        root.removeFilter(_not_the_pre_processing_advice)
        for h in root.handlers:
            h.removeFilter(_not_the_pre_processing_advice)
