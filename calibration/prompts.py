"""The conversations an export decodes, as one parameter: validation (ONNX vs PyTorch parity), calibration and
held-out trajectories (INT8), evaluation prompts (the INT8 gate's exact match).

The synthetic task is the right data only for the embedded default, which was trained on it; `for_checkpoint`
gives it there. Any other model is validated on the synthetic task's image prompts (parity holds on any real
step inputs) but refuses to calibrate on them: INT8 of a real model must be calibrated on its own data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bard_deploy.embedded import is_embedded_default
from bard_deploy.errors import CheckpointError, ExportError
from bard_deploy.evaluate import synthetic_conversations

VALIDATION_PROMPTS = 3


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

    @classmethod
    def synthetic(cls, calibration_samples: int = 16, eval_samples: int = 100) -> ExportPrompts:
        """The synthetic task: validation split (3 validation prompts, then the calibration and held-out ones),
        the test split for evaluation."""
        held = max(4, calibration_samples // 4)
        val = synthetic_conversations("validation", VALIDATION_PROMPTS + calibration_samples + held)
        return cls(val[:VALIDATION_PROMPTS], val[VALIDATION_PROMPTS:VALIDATION_PROMPTS + calibration_samples],
                   val[VALIDATION_PROMPTS + calibration_samples:], synthetic_conversations("test", eval_samples),
                   "validation split")

    @classmethod
    def for_checkpoint(cls, model_dir: str | Path, int8: bool, calibration_samples: int = 16,
                       eval_samples: int = 100) -> ExportPrompts:
        """The synthetic task for the embedded default; for any other model, its image prompts for validation
        only, and an ExportError when INT8 is asked for (it needs the model's own data)."""
        if not (Path(model_dir) / "config.json").is_file():
            raise CheckpointError(f"{model_dir} is not a checkpoint directory (no config.json)", str(model_dir))
        if is_embedded_default(model_dir):
            return cls.synthetic(calibration_samples, eval_samples)
        if int8:
            raise ExportError(f"{model_dir} is not the embedded default: INT8 must be calibrated on prompts from "
                              "its own data, and the synthetic task is not that (calibration data for real "
                              "models is not supported yet)", str(model_dir))
        return cls(synthetic_conversations("validation", VALIDATION_PROMPTS), [], [], [],
                   "synthetic validation prompts")
