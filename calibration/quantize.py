"""INT8 recipes for the decoder graph: ORT dynamic quantization for CPUs, static Q/DQ for TensorRT and CUDA.

CPU target: dynamic int8 with 7-bit weights (reduce_range: U8S8 saturates on AVX2 without VNNI; S8S8 QDQ is 10x
slower there), per channel, MatMul only. tensorrt / cuda targets: static per-channel S8S8 Q/DQ from the
calibration steps (TensorRT's explicit quantization). `sensitive_matmuls` names the nodes kept in fp32 when the
accuracy gate fails with everything quantized: lm_head and the first and last decoder layers.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from bard_deploy.runtimes.ort_backend import to_numpy

TARGETS = ("cpu", "cuda", "tensorrt")
SCHEMES = {"cpu": "dynamic, per-channel s8 weights with reduce_range (7-bit), MatMul only",
           "cuda": "static QDQ S8S8, per-channel weights", "tensorrt": "static QDQ S8S8, per-channel weights"}


def int8_graph_name(target: str) -> str:
    """The file name of the INT8 decoder for a target."""
    return "decoder.int8.onnx" if target == "cpu" else "decoder.qdq.onnx"


class _Reader(CalibrationDataReader):
    """Feeds the recorded calibration steps to ORT's static quantizer, one step at a time."""

    def __init__(self, steps: list[dict[str, torch.Tensor]]):
        self.it = iter(steps)

    def get_next(self):
        """The next step's feeds as numpy, or None when all were given."""
        feeds = next(self.it, None)
        return None if feeds is None else to_numpy(feeds)


def quantize(fp32: Path, out: Path, target: str, calibration: list[dict[str, torch.Tensor]],
             exclude: list[str]) -> None:
    """Write an INT8 copy of the decoder graph `fp32` to `out` (scratch in a temp dir: the ORT tools leave large
    files behind). `calibration`: step feeds (static targets only); `exclude`: node names kept in fp32."""
    with tempfile.TemporaryDirectory() as scratch:
        pre = Path(scratch) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        if target == "cpu":
            quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                             reduce_range=True, per_channel=True, nodes_to_exclude=exclude)
            return
        quantize_static(str(pre), str(out), _Reader(calibration), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                        op_types_to_quantize=["MatMul"], nodes_to_exclude=exclude,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})


def sensitive_matmuls(model_path: Path, layers: int) -> list[str]:
    """MatMul nodes of lm_head and of the first and last decoder layers (kept fp32 when the gate fails)."""
    keep = []
    for node in onnx.load(str(model_path), load_external_data=False).graph.node:
        if node.op_type != "MatMul":
            continue
        name = node.name
        if "lm_head" in name or "embed_tokens" in name or "layers.0/" in name or f"layers.{layers - 1}/" in name:
            keep.append(name)
    return keep
