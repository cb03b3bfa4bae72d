"""`bard-deploy export`: ONNX graphs + validation + (optionally) INT8 with its accuracy gate + manifest.

Steps, all into a temporary sibling directory that is renamed into place only when everything passed:
  1. decoder.onnx, vision.onnx, embeddings.safetensors, config and tokenizer / processor files;
  2. validation: ONNX vs PyTorch on step inputs recorded from real generations (image prompts, every
     denoising step), max abs diff per output <= 1e-4, else an ExportError naming the output;
  3. INT8 (`--int8`): calibration steps from real denoising trajectories (saved, hashed); CPU target: ORT
     dynamic int8 with 7-bit weights (reduce_range: U8S8 saturates without VNNI; S8S8 QDQ is 10x slower here);
     tensorrt / cuda targets: static per-channel S8S8 Q/DQ from the calibration steps (TensorRT's explicit
     quantization); then the gate: top-1 agreement with fp32 on held-out trajectory steps and the end-to-end
     exact-match drop on the test split; when it fails, lm_head and the first / last layers stay fp32;
  4. manifest.json: IO table, model facts, parity and gate numbers, calibration hash, sha256 of every file.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from bard_deploy import iospec
from bard_deploy.converters.checkpoint import SIDE_FILES, load_model
from bard_deploy.converters.onnx_export import FP32_TOLERANCE, compare, export_decoder, export_vision, session
from bard_deploy.errors import ExportError
from bard_deploy.manifest import write_manifest
from bard_deploy.runtimes.ort_backend import io_table

TARGETS = ("cpu", "cuda", "tensorrt")


@dataclass(frozen=True)
class Int8Options:
    target: str = "cpu"
    calibration_samples: int = 16      # prompts whose trajectories calibrate (static) / are held out (gate)
    gate_top1: float = 0.95            # min top-1 agreement with fp32 on held-out trajectory steps
    gate_em_drop: float = 0.01         # max end-to-end exact-match drop (fraction) on the test split
    eval_samples: int = 100


def _pipeline(backend, directory: Path):
    from bard_deploy.runtimes.api import Pipeline

    return Pipeline.from_backend(backend, directory)


def _conversations(split: str, n: int, offset: int = 0) -> list[list[dict]]:
    from bard_deploy.evaluate import synthetic_conversations

    return synthetic_conversations(split, n + offset)[offset:]


def _decode_options(cfg) -> dict:
    return {"max_new_tokens": 64} if cfg.bard is None else {"max_new_tokens": 64, "threshold": 0.9}


def top1_agreement(sess, records: list[tuple[dict, dict]], decision: int) -> float:
    """Fraction of *decision* positions whose argmax equals the fp32 PyTorch one, over recorded steps.

    Decision positions are the ones the decoder reads: the last `decision` positions of each step (AR: 1, the
    next token; BARD: the block's canvas). BARD never reads prefill logits, so prefills (empty past) are skipped;
    prompt positions would only measure noise in predictions nobody uses.
    """
    from bard_deploy.converters.onnx_export import to_numpy

    agree = total = 0
    for feeds, expected in records:
        if decision > 1 and feeds[iospec.past_key(0)].shape[2] == 0:
            continue
        logits = sess.run([iospec.LOGITS], to_numpy(feeds))[0][:, -decision:]
        ref = expected[iospec.LOGITS].numpy()[:, -decision:]
        agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
        total += ref.shape[0] * ref.shape[1]
    return agree / max(total, 1)


def _matmuls_to_keep(model_path: Path, layers: int) -> list[str]:
    """MatMul nodes of lm_head and of the first and last decoder layers (kept fp32 when the gate fails)."""
    import onnx

    keep = []
    for node in onnx.load(str(model_path), load_external_data=False).graph.node:
        if node.op_type != "MatMul":
            continue
        name = node.name
        if "lm_head" in name or "embed_tokens" in name or "layers.0/" in name or f"layers.{layers - 1}/" in name:
            keep.append(name)
    return keep


def quantize(fp32: Path, out: Path, target: str, calibration: list[dict], exclude: list[str]) -> None:
    """INT8 copy of decoder.onnx (in a temp dir: the ORT tools leave large scratch files behind)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from bard_deploy.converters.onnx_export import to_numpy

    with tempfile.TemporaryDirectory() as scratch:
        pre = Path(scratch) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        if target == "cpu":
            quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                             reduce_range=True, per_channel=True, nodes_to_exclude=exclude)
            return

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(calibration)

            def get_next(self):
                feeds = next(self.it, None)
                return None if feeds is None else to_numpy(feeds)

        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                        nodes_to_exclude=exclude, extra_options={"ActivationSymmetric": True,
                                                                 "WeightSymmetric": True})


def export(model_dir: str | Path, out_dir: str | Path, int8: bool = False, int8_options: Int8Options = Int8Options(),
           force: bool = False, image_size: int | None = None, log=print) -> dict:
    """Export a checkpoint directory; returns the manifest."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if int8 and int8_options.target not in TARGETS:
        raise ExportError(f"--target must be one of {TARGETS}, got {int8_options.target!r}", int8_options.target)
    from bard_deploy.converters.checkpoint import new_tmp_dir, recover_dir, replace_dir
    recover_dir(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise ExportError(f"{out_dir} exists and is not empty (use --force to replace it)", str(out_dir))
    tmp = new_tmp_dir(out_dir)
    try:
        manifest = _export_into(model_dir, tmp, int8, int8_options, image_size, log)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _export_into(model_dir: Path, tmp: Path, int8: bool, o: Int8Options, image_size: int | None, log) -> dict:
    from bard_deploy.calibration.collect import record
    from bard_deploy.runtimes.backend import TorchBackend

    t0 = time.perf_counter()
    model = load_model(model_dir)
    cfg = model.config
    shutil.copy2(model_dir / "config.json", tmp / "config.json")
    for name in SIDE_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, tmp / name)
    torch_pipe = _pipeline(TorchBackend(model), tmp)
    # 1. graphs
    io = export_decoder(model, tmp / "decoder.onnx")
    save_file({"embed_tokens": model.language_model.embed_tokens.weight.detach().contiguous()},
              tmp / "embeddings.safetensors")
    vision = None
    if cfg.has_vision:
        if torch_pipe.encoder.processor is None:
            raise ExportError(f"{model_dir} has a vision tower but no preprocessor_config.json", str(model_dir))
        from PIL import Image

        size = image_size or int(round((4 * torch_pipe.encoder.processor.size["shortest_edge"]) ** 0.5))
        out = torch_pipe.encoder.processor(images=[Image.new("RGB", (size, size), (128, 128, 128))],
                                           return_tensors="pt")
        export_vision(model, tmp / "vision.onnx", out["pixel_values"], out["image_grid_thw"])
        vision = {"graph": "vision.onnx", "image_size": size, "grid_thw": out["image_grid_thw"][0].tolist()}
    log(f"export: graphs written in {time.perf_counter() - t0:.1f} s")
    # 2. validation on real step inputs (prompts with images, every denoising step)
    opts = _decode_options(cfg)
    ar = cfg.bard is None
    val = record(torch_pipe, _conversations("validation", 3), ar=ar, **opts)
    parity = {"tolerance": FP32_TOLERANCE, "steps": len(val),
              "decoder": compare("decoder.onnx", session(tmp / "decoder.onnx"), val, FP32_TOLERANCE)}
    if vision is not None:
        vis_sess = session(tmp / "vision.onnx")
        worst = {}
        for conv in _conversations("validation", 3):
            enc = torch_pipe.encoder.encode(conv[:-1])
            with torch.no_grad():
                e, d = torch_pipe.backend.encode_images(enc.pixel_values, enc.image_grid_thw)
            got = vis_sess.run(None, {"pixel_values": enc.pixel_values.numpy()})
            for name, g, ref in (("image_embeds", got[0], e), ("deepstack_embeds", got[1], d)):
                worst[name] = max(worst.get(name, 0.0), float(np.abs(g - ref.numpy()).max()))
        for name, diff in worst.items():
            if not diff <= FP32_TOLERANCE:
                raise ExportError(f"vision.onnx: output '{name}' differs from PyTorch by {diff:.3g} "
                                  f"(tolerance {FP32_TOLERANCE:g})", name)
        parity["vision"] = worst
    log("export: parity " + ", ".join(f"{k} {v:.2e}" for k, v in parity["decoder"].items() if k == iospec.LOGITS)
        + f" (max over {len(val)} recorded steps; tolerance {FP32_TOLERANCE:g})")
    body = {"model": str(model_dir), "io": io_table(io), "num_layers": io.num_layers, "num_kv_heads": io.num_kv_heads,
            "head_dim": io.head_dim, "hidden_size": io.hidden_size, "vocab_size": io.vocab_size,
            "mask_token_id": cfg.bard.mask_token_id if cfg.bard else None,
            "block_size": cfg.bard.block_size if cfg.bard else None, "embeddings": "embeddings.safetensors",
            "vision": vision, "graphs": {"decoder": {"fp32": "decoder.onnx"}}, "default_variant": "fp32",
            "tokenizer_files": [n for n in SIDE_FILES if (tmp / n).is_file()], "parity": parity,
            "exporter": f"torch {torch.__version__} TorchScript exporter, opset 17"}
    # 3. INT8
    if int8:
        body.update(_int8(model, torch_pipe, tmp, o, opts, ar, log, body))
    return write_manifest(tmp, body)


def _int8(model, torch_pipe, tmp: Path, o: Int8Options, opts: dict, ar: bool, log, body: dict) -> dict:
    from bard_deploy.calibration.collect import record, save_calibration

    t0 = time.perf_counter()
    calib = record(torch_pipe, _conversations("validation", o.calibration_samples, offset=3), ar=ar, **opts)
    held_out = record(torch_pipe, _conversations("validation", max(4, o.calibration_samples // 4),
                                                 offset=3 + o.calibration_samples), ar=ar, **opts)
    calib_hash = save_calibration(tmp / "calibration.safetensors", calib,
                                  {"samples": o.calibration_samples, "steps": len(calib), "source": "validation split"})
    name = "decoder.int8.onnx" if o.target == "cpu" else "decoder.qdq.onnx"
    exclude: list[str] = []
    gate: dict = {}
    for attempt in ("all MatMuls", "lm_head and first/last layers kept fp32"):
        quantize(tmp / "decoder.onnx", tmp / name, o.target, [f for f, _ in calib], exclude)
        top1 = top1_agreement(session(tmp / name), held_out, 1 if ar else model.config.bard.block_size)
        write_manifest(tmp, {**body, "graphs": {"decoder": {"fp32": "decoder.onnx", "int8": name}}})
        em = _exact_match_pair(tmp, o.eval_samples, opts, ar)
        gate = {"target": o.target, "scheme": ("dynamic, per-channel s8 weights with reduce_range (7-bit), MatMul only"
                                               if o.target == "cpu" else "static QDQ S8S8, per-channel weights"),
                "top1_agreement": round(top1, 4), "held_out_steps": len(held_out), "exact_match_fp32": em[0],
                "exact_match_int8": em[1], "exact_match_drop": round(em[0] - em[1], 4), "attempt": attempt,
                "excluded_nodes": len(exclude), "thresholds": {"top1": o.gate_top1, "em_drop": o.gate_em_drop},
                "eval_samples": o.eval_samples}
        gate["passed"] = top1 >= o.gate_top1 and gate["exact_match_drop"] <= o.gate_em_drop
        log(f"export: int8 gate ({attempt}): top-1 {top1:.4f}, exact match {em[0]:.3f} -> {em[1]:.3f} "
            f"({'pass' if gate['passed'] else 'fail'})")
        if gate["passed"]:
            break
        exclude = _matmuls_to_keep(tmp / "decoder.onnx", model.config.text.num_hidden_layers)
    if not gate["passed"]:
        raise ExportError(f"INT8 accuracy gate failed even with sensitive layers in fp32: top-1 "
                          f"{gate['top1_agreement']} (min {o.gate_top1}), exact-match drop {gate['exact_match_drop']} "
                          f"(max {o.gate_em_drop})", gate)
    log(f"export: int8 done in {time.perf_counter() - t0:.1f} s")
    return {"graphs": {"decoder": {"fp32": "decoder.onnx", "int8": name}}, "default_variant": "int8",
            "int8": gate, "calibration": {"file": "calibration.safetensors", "sha256": calib_hash,
                                          "steps": len(calib)}}


def _exact_match_pair(tmp: Path, n: int, opts: dict, ar: bool) -> tuple[float, float]:
    from bard_deploy.evaluate import evaluate
    from bard_deploy.runtimes.ort_backend import OrtBackend

    convs = _conversations("test", n)
    out = []
    for variant in ("fp32", "int8"):
        pipe = _pipeline(OrtBackend(tmp, variant=variant), tmp)
        out.append(round(evaluate(pipe, convs, ar=ar, batch_size=16, **opts).exact_match, 4))
    return out[0], out[1]
