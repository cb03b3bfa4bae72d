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
    lm_head_matmuls,
    quantize,
    quantize_int4,
    sensitive_matmuls,
)
from bard_deploy.errors import ExportError
from bard_deploy.evaluate import evaluate
from bard_deploy.manifest import Manifest
from bard_deploy.runtimes.api import Pipeline
from bard_deploy.runtimes.ort_backend import OrtBackend, session

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
    return Pipeline.from_backend(OrtBackend(directory, variant=variant, manifest=manifest), directory)


def exact_match(directory: Path, manifest: Manifest, variant: str, prompts: ExportPrompts, ar: bool) -> float:
    """Exact match of one decoder variant of a (just written) export directory on the evaluation prompts."""
    pipe = _pipeline(directory, manifest, variant)
    ev = evaluate(pipe, prompts.evaluation, ar=ar, batch_size=16, **trajectory_options(pipe.config))
    return round(ev.exact_match, 4)


def generated(directory: Path, manifest: Manifest, variant: str, prompts: ExportPrompts, ar: bool
              ) -> list[list[int]]:
    """The tokens one decoder variant generates for each evaluation prompt (up to EOS)."""
    pipe = _pipeline(directory, manifest, variant)
    return [pipe.generate_batch([prompt_of(c)], ar=ar, **trajectory_options(pipe.config))[0].token_ids
            for c in prompts.evaluation]


def token_agreement(reference: list[list[int]], rows: list[list[int]]) -> float:
    """Fraction of the reference's generated tokens that `rows` reproduce at the same position, over all prompts."""
    total = sum(len(r) for r in reference)
    same = sum(sum(a == b for a, b in zip(r, q, strict=False)) for r, q in zip(reference, rows, strict=True))
    return same / max(total, 1)


class _Scorer:
    """The end-to-end half of the gate: exact match (synthetic task) or token agreement with fp32 (user data);
    the fp32 side is decoded once."""

    def __init__(self, directory: Path, manifest: Manifest, prompts: ExportPrompts, ar: bool, o: QuantOptions):
        self.directory, self.manifest, self.prompts, self.ar, self.o = directory, manifest, prompts, ar, o
        self.fp32 = self._run("fp32")

    def _run(self, variant: str):
        if self.prompts.score == "exact_match":
            return exact_match(self.directory, self.manifest, variant, self.prompts, self.ar)
        return generated(self.directory, self.manifest, variant, self.prompts, self.ar)

    def __call__(self, variant: str) -> tuple[bool, dict]:
        """(passed, report) of the end-to-end criterion for a quantized variant."""
        got = self._run(variant)
        if self.prompts.score == "exact_match":
            drop = round(self.fp32 - got, 4)
            return drop <= self.o.gate_em_drop, {"exact_match_fp32": self.fp32, f"exact_match_{variant}": got,
                                                 "exact_match_drop": drop}
        agree = round(token_agreement(self.fp32, got), 4)
        return agree >= self.o.gate_token_agreement, {"token_agreement": agree}


def quantize_and_gate(directory: Path, manifest: Manifest, prompts: ExportPrompts, o: QuantOptions,
                      variant: str = "int8", calibration: Trajectories | None = None, log=print) -> Manifest:
    """Write the `variant` ("int8" or "int4") decoder (and, for INT8, the calibration file of `calibration`, the
    recorded trajectories) into `directory`; returns the manifest with the variant, its gate report and the
    calibration entry. ExportError when the gate fails even with the sensitive layers in fp32.

    No PyTorch model is needed: the reference is the directory's fp32 graph (validated against PyTorch), so the
    caller frees its weights before the quantizers load the graph."""
    t0 = time.perf_counter()
    reference = _pipeline(directory, manifest, "fp32")
    cfg = reference.config
    ar = cfg.bard is None
    entry = None
    if variant == "int8":      # weight-only INT4 needs no activations; INT8 keeps them with the export
        assert calibration is not None, "INT8 needs the calibration trajectories"
        digest = calibration.save(directory / CALIBRATION_FILE, {"samples": len(prompts.calibration),
                                                                  "steps": len(calibration), "source": prompts.source})
        entry = {"file": CALIBRATION_FILE, "sha256": digest, "steps": len(calibration)}
    _, fp32 = manifest.decoder_graph("fp32")
    name = graph_name(variant, o.target)
    quantized = manifest.with_decoder(variant, name, default=variant == "int8" or manifest.default_variant == "fp32")
    decision = 1 if ar else cfg.bard.block_size
    end_to_end = _Scorer(directory, quantized, prompts, ar, o)
    head = [] if o.int4_lm_head else lm_head_matmuls(directory / fp32)
    exclude: list[str] = head if variant == "int4" else []
    for attempt in ATTEMPTS:
        if variant == "int8":
            quantize(directory / fp32, directory / name, o.target, calibration.feeds(), exclude)
        else:
            quantize_int4(directory / fp32, directory / name, o.int4_block_size, o.int4_accuracy_level, exclude)
        held_out = compare_live(reference, session(directory / name), prompts.held_out, decision, ar=ar,
                                outputs=[iospec.LOGITS], **trajectory_options(cfg))
        top1 = held_out.top1
        passed, scores = end_to_end(variant)
        scheme = (SCHEMES[o.target] if variant == "int8" else
                  int4_scheme(o.int4_block_size, o.int4_accuracy_level, o.int4_lm_head and attempt == ATTEMPTS[0]))
        gate = {"target": o.target if variant == "int8" else "cpu", "scheme": scheme, "top1_agreement": round(top1, 4),
                "held_out_steps": held_out.steps, "score": prompts.score, **scores, "attempt": attempt,
                "excluded_nodes": len(exclude), "eval_samples": len(prompts.evaluation),
                "thresholds": {"top1": o.gate_top1, "em_drop": o.gate_em_drop,
                               "token_agreement": o.gate_token_agreement}}
        gate["passed"] = top1 >= o.gate_top1 and passed
        log(f"export: {variant} gate ({attempt}): top-1 {top1:.4f}, "
            + ", ".join(f"{k} {v}" for k, v in scores.items()) + f" ({'pass' if gate['passed'] else 'fail'})")
        if gate["passed"]:
            log(f"export: {variant} done in {time.perf_counter() - t0:.1f} s")
            return replace(quantized, **{variant: gate}, **({"calibration": entry} if entry else {}))
        exclude = sorted(set(sensitive_matmuls(directory / fp32, cfg.text.num_hidden_layers)) | set(head))
    got = ", ".join(f"{k} {v}" for k, v in scores.items())
    raise ExportError(f"{variant.upper()} accuracy gate failed even with sensitive layers in fp32: top-1 "
                      f"{gate['top1_agreement']} (min {o.gate_top1}), {got} (limits: exact-match drop "
                      f"{o.gate_em_drop}, token agreement {o.gate_token_agreement})", gate)
