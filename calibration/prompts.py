"""The conversations an export decodes, as one parameter: validation (ONNX vs PyTorch parity), calibration and
held-out trajectories (INT8, INT4), evaluation prompts (the gate's end-to-end score).

The synthetic task is the right data only for the embedded default, which was trained on it; `for_checkpoint`
gives it there. Any other model is calibrated and gated on the user's chat JSONL (`--calib-data`); without it, it
is validated on the synthetic task's image prompts (parity holds on any real step inputs) and a quantized
variant is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bard_deploy.data.chat import read_conversations
from bard_deploy.embedded import is_embedded_default
from bard_deploy.errors import CheckpointError, DataError, ExportError
from bard_deploy.evaluate import synthetic_conversations
from bard_deploy.manifest import sha256

VALIDATION_PROMPTS = 3


def _cut(rows: list[list[dict]], calibration_samples: int) -> tuple[list, list, list]:
    """(validation, calibration, held-out) in that order from the front of `rows`: 3, N and max(4, N / 4)."""
    c = VALIDATION_PROMPTS + calibration_samples
    return rows[:VALIDATION_PROMPTS], rows[VALIDATION_PROMPTS:c], rows[c:c + max(4, calibration_samples // 4)]


def _needed(calibration_samples: int) -> int:
    """Rows `_cut` takes."""
    return VALIDATION_PROMPTS + calibration_samples + max(4, calibration_samples // 4)


def trajectory_options(config) -> dict:
    """Decode options of recorded trajectories: greedy, 64 new tokens, threshold 0.9 for BARD."""
    return {"max_new_tokens": 64} if config.bard is None else {"max_new_tokens": 64, "threshold": 0.9}


@dataclass(frozen=True)
class ExportPrompts:
    """Conversations (chat messages; a final assistant turn is the reference answer) for each use in export."""

    validation: list[list[dict]]
    calibration: list[list[dict]]
    held_out: list[list[dict]]
    evaluation: list[list[dict]]
    source: str                        # where they come from, recorded with the calibration file
    # how the gate scores the evaluation prompts: "exact_match" against their reference answers (the synthetic
    # task, where answers are right or wrong) or "token_agreement" of the quantized model's generated tokens with
    # the fp32 model's (the user's data: the question is whether quantization changed the model, not the task)
    score: str = "exact_match"

    @classmethod
    def synthetic(cls, calibration_samples: int = 16, eval_samples: int = 100) -> ExportPrompts:
        """The synthetic task: validation split (3 validation prompts, then the calibration and held-out ones),
        the test split for evaluation."""
        val = synthetic_conversations("validation", _needed(calibration_samples))
        return cls(*_cut(val, calibration_samples), synthetic_conversations("test", eval_samples), "validation split")

    @classmethod
    def from_jsonl(cls, path: str | Path, calibration_samples: int = 16, eval_samples: int = 100) -> ExportPrompts:
        """The user's chat JSONL (the rows of `train --data`), in file order: 3 validation prompts, then the
        calibration, held-out and (up to `eval_samples`) evaluation ones; scored by token agreement with fp32."""
        need = _needed(calibration_samples)
        rows = read_conversations(path, need + eval_samples)
        if len(rows) < need + 1:
            raise DataError(f"--calib-data {path}: {len(rows)} rows; calibrating on {calibration_samples} prompts "
                            f"needs at least {need + 1} ({VALIDATION_PROMPTS} validation, "
                            f"{max(4, calibration_samples // 4)} held out, one or more evaluation)", len(rows))
        return cls(*_cut(rows, calibration_samples), rows[need:], f"{path} (sha256 {sha256(Path(path))[:16]})",
                   "token_agreement")

    @classmethod
    def for_checkpoint(cls, model_dir: str | Path, quantize: bool, calibration_samples: int = 16,
                       eval_samples: int = 100, calib_data: str | Path | None = None) -> ExportPrompts:
        """The user's `calib_data` when given; else the synthetic task for the embedded default; for any other
        model, the synthetic image prompts for validation only, and an ExportError when a quantized variant is
        asked for (it must be calibrated and gated on the model's own data)."""
        if not (Path(model_dir) / "config.json").is_file():
            raise CheckpointError(f"{model_dir} is not a checkpoint directory (no config.json)", str(model_dir))
        if calib_data is not None:
            return cls.from_jsonl(calib_data, calibration_samples, eval_samples)
        if is_embedded_default(model_dir):
            return cls.synthetic(calibration_samples, eval_samples)
        if quantize:
            raise ExportError(f"{model_dir} is not the embedded default: a quantized decoder must be calibrated "
                              "and gated on prompts from its own data: pass --calib-data rows.jsonl (the chat JSONL "
                              "of train --data)", str(model_dir))
        return cls(synthetic_conversations("validation", VALIDATION_PROMPTS), [], [], [],
                   "synthetic validation prompts")
