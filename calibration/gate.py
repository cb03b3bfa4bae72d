"""INT8 and INT4 with their accuracy gate: calibrate on recorded trajectories (INT8), quantize, compare with fp32,
retry with the sensitive layers in fp32, fail with a typed error when even that is not good enough.

The gate has two parts, both on the caller's prompts (`ExportPrompts`): top-1 agreement of the quantized decoder
with fp32 (the validated fp32 graph, run beside it step by step) where the decoder is read (AR: the next token;
BARD: the block's canvas) on the held-out prompts' trajectories, and an end-to-end score against fp32
onnxruntime on the evaluation prompts: the exact-match drop on the synthetic task (answers are right or wrong
there), the generated-token agreement on the user's data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from bard_deploy import iospec
from bard_deploy.calibration.collect import Trajectories, compare_live, prompt_of
from bard_deploy.calibration.prompts import ExportPrompts, trajectory_options
from bard_deploy.calibration.quantize import (
    SCHEMES,
    TARGETS,
    graph_name,
    int4_scheme,
    isolated,
    lm_head_matmuls,
    quantize,
    quantize_int4,
    sensitive_matmuls,
)
from bard_deploy.errors import ExportError
from bard_deploy.evaluate import evaluate
from bard_deploy.manifest import Manifest
from bard_deploy.runtimes.api import Pipeline
from bard_deploy.runtimes.ort_backend import OrtBackend

CALIBRATION_FILE = "calibration.safetensors"
ATTEMPTS = ("all MatMuls", "lm_head and first/last layers kept fp32")


@dataclass(frozen=True)
class QuantOptions:
    """How `export --int8 / --int4` quantize and what their gate accepts."""

    target: str = "cpu"                # INT8: cpu (ORT dynamic), cuda or tensorrt (static Q/DQ)
    calibration_samples: int = 16      # prompts whose trajectories calibrate (static) / are held out (gate)
    gate_top1: float = 0.95            # min top-1 agreement with fp32 on held-out trajectory steps
    gate_em_drop: float = 0.01         # max end-to-end exact-match drop (fraction) on the evaluation prompts
    gate_token_agreement: float = 0.9  # user data: min fraction of fp32's generated tokens reproduced
    eval_samples: int = 100            # evaluation prompts of the end-to-end gate
    int4_block_size: int = 32          # INT4: weights per scale along the input dimension (32 or 128)
    int4_accuracy_level: int = 0       # INT4: MatMulNBits compute type (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8)
    int4_lm_head: bool = True          # INT4: quantize the LM head too (False: keep it fp32)

    def check(self) -> QuantOptions:
        """ExportError naming a bad value."""
        if self.target not in TARGETS:
            raise ExportError(f"--target must be one of {TARGETS}, got {self.target!r}", self.target)
        if self.int4_block_size not in (16, 32, 64, 128, 256):
            raise ExportError(f"--int4-block-size must be 16, 32, 64, 128 or 256, got {self.int4_block_size}",
                              self.int4_block_size)
        if self.int4_accuracy_level not in range(5):
            raise ExportError(f"--int4-accuracy-level must be 0..4, got {self.int4_accuracy_level}",
                              self.int4_accuracy_level)
        return self


def _pipeline(directory: Path, manifest: Manifest, variant: str) -> Pipeline:
    """A Pipeline over one decoder variant of a (just written) export directory; the manifest is the caller's."""
    return Pipeline.from_backend(OrtBackend(directory, variant=variant, manifest=manifest), directory)


def exact_match(pipe: Pipeline, prompts: ExportPrompts, ar: bool) -> float:
    """Exact match of a pipeline on the evaluation prompts."""
    ev = evaluate(pipe, prompts.evaluation, ar=ar, batch_size=16, **trajectory_options(pipe.config))
    return round(ev.exact_match, 4)


def generated(pipe: Pipeline, prompts: ExportPrompts, ar: bool) -> list[list[int]]:
    """The tokens a pipeline generates for each evaluation prompt (up to EOS)."""
    return [pipe.generate_batch([prompt_of(c)], ar=ar, **trajectory_options(pipe.config))[0].token_ids
            for c in prompts.evaluation]


def token_agreement(reference: list[list[int]], rows: list[list[int]]) -> float:
    """Fraction of the reference's generated tokens that `rows` reproduce at the same position, over all prompts."""
    total = sum(len(r) for r in reference)
    same = sum(sum(a == b for a, b in zip(r, q, strict=False)) for r, q in zip(reference, rows, strict=True))
    return same / max(total, 1)


class _Gate:
    """What every quantized variant is judged against: the fp32 graph (validated against PyTorch), the reference of
    the held-out top-1, and its end-to-end result (exact match on the synthetic task, generated tokens on the
    user's data), decoded once for all variants and attempts.

    The fp32 session is opened only while a variant is judged: at 2B it holds 8.5 GB, which must not sit beside
    the quantizer."""

    def __init__(self, directory: Path, manifest: Manifest, prompts: ExportPrompts, o: QuantOptions):
        self.directory, self.prompts, self.o = directory, prompts, o
        reference = _pipeline(directory, manifest, "fp32")
        self.config = reference.config
        self.ar = self.config.bard is None
        self.decision = 1 if self.ar else self.config.bard.block_size
        self.fp32 = self._end_to_end(reference)

    def _end_to_end(self, pipe: Pipeline):
        if self.prompts.score == "exact_match":
            return exact_match(pipe, self.prompts, self.ar)
        return generated(pipe, self.prompts, self.ar)

    def judge(self, manifest: Manifest, variant: str) -> tuple[bool, dict]:
        """(passed, report) of the variant's graph as it is now in the directory (`manifest` lists it)."""
        pipe = _pipeline(self.directory, manifest, variant)         # the graph is loaded once per attempt
        held_out = compare_live(_pipeline(self.directory, manifest, "fp32"), pipe.backend.decoder,
                                self.prompts.held_out, self.decision, ar=self.ar, outputs=[iospec.LOGITS],
                                **trajectory_options(self.config))
        got = self._end_to_end(pipe)
        if self.prompts.score == "exact_match":
            drop = round(self.fp32 - got, 4)
            scores = {"exact_match_fp32": self.fp32, f"exact_match_{variant}": got, "exact_match_drop": drop}
            passed = drop <= self.o.gate_em_drop
        else:
            scores = {"token_agreement": round(token_agreement(self.fp32, got), 4)}
            passed = scores["token_agreement"] >= self.o.gate_token_agreement
        report = {"top1_agreement": round(held_out.top1, 4), "held_out_steps": held_out.steps,
                  "score": self.prompts.score, **scores}
        return passed and held_out.top1 >= self.o.gate_top1, report


def quantize_and_gate(directory: Path, manifest: Manifest, prompts: ExportPrompts, o: QuantOptions,
                      variants: tuple[str, ...] = ("int8",), calibration: Trajectories | None = None,
                      log=print) -> Manifest:
    """Write each of `variants` ("int8", "int4") into `directory` (and, for INT8, the calibration file of
    `calibration`, the recorded trajectories), each through the gate; returns the manifest with the variants,
    their gate reports and the calibration entry. ExportError when a gate fails even with the sensitive layers
    in fp32.

    No PyTorch model is needed: the reference is the directory's fp32 graph (validated against PyTorch), so the
    caller frees its weights before the quantizers load the graph."""
    gate = _Gate(directory, manifest, prompts, o)
    entry = None
    if calibration is not None:     # saved first: the static quantizer reads it in its own process
        digest = calibration.save(directory / CALIBRATION_FILE, {"samples": len(prompts.calibration),
                                                                  "steps": len(calibration), "source": prompts.source})
        entry = {"file": CALIBRATION_FILE, "sha256": digest, "steps": len(calibration)}
    for variant in variants:
        manifest = _quantize_one(gate, manifest, variant, entry, log)
    return manifest


def _quantize_one(gate: _Gate, manifest: Manifest, variant: str, calibration: dict | None, log) -> Manifest:
    """One variant: quantize, judge, retry once with the sensitive layers in fp32. `calibration`: the manifest
    entry of the saved calibration file (INT8 keeps it with the export; weight-only INT4 needs no activations)."""
    t0 = time.perf_counter()
    o, directory, prompts, cfg = gate.o, gate.directory, gate.prompts, gate.config
    entry = calibration if variant == "int8" else None
    assert variant != "int8" or entry is not None, "INT8 needs the calibration trajectories"
    _, fp32 = manifest.decoder_graph("fp32")
    name = graph_name(variant, o.target)
    quantized = manifest.with_decoder(variant, name, default=variant == "int8" or manifest.default_variant == "fp32")
    head = [] if o.int4_lm_head else lm_head_matmuls(directory / fp32)
    exclude: list[str] = head if variant == "int4" else []
    for attempt in ATTEMPTS:
        if variant == "int8":
            isolated(quantize, directory / fp32, directory / name, o.target, directory / CALIBRATION_FILE, exclude)
        else:
            isolated(quantize_int4, directory / fp32, directory / name, o.int4_block_size, o.int4_accuracy_level,
                     exclude)
        passed, report = gate.judge(quantized, variant)
        scheme = (SCHEMES[o.target] if variant == "int8" else
                  int4_scheme(o.int4_block_size, o.int4_accuracy_level, o.int4_lm_head and attempt == ATTEMPTS[0]))
        scores = {k: v for k, v in report.items() if k not in ("top1_agreement", "held_out_steps", "score")}
        g = {"target": o.target if variant == "int8" else "cpu", "scheme": scheme, **report, "attempt": attempt,
             "excluded_nodes": len(exclude), "eval_samples": len(prompts.evaluation),
             "thresholds": {"top1": o.gate_top1, "em_drop": o.gate_em_drop, "token_agreement": o.gate_token_agreement},
             "passed": passed}
        log(f"export: {variant} gate ({attempt}): top-1 {g['top1_agreement']:.4f}, "
            + ", ".join(f"{k} {v}" for k, v in scores.items()) + f" ({'pass' if passed else 'fail'})")
        if passed:
            log(f"export: {variant} done in {time.perf_counter() - t0:.1f} s")
            return replace(quantized, **{variant: g}, **({"calibration": entry} if entry else {}))
        exclude = sorted(set(sensitive_matmuls(directory / fp32, cfg.text.num_hidden_layers)) | set(head))
    got = ", ".join(f"{k} {v}" for k, v in scores.items())
    raise ExportError(f"{variant.upper()} accuracy gate failed even with sensitive layers in fp32: top-1 "
                      f"{g['top1_agreement']} (min {o.gate_top1}), {got} (limits: exact-match drop "
                      f"{o.gate_em_drop}, token agreement {o.gate_token_agreement})", g)
