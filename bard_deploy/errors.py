"""Typed errors raised at every boundary (CLI arguments, config, checkpoints, data, exports, runtime input).

Each error carries the offending value so the CLI can print one line that names it. Internal shape
invariants use `assert`; these classes are for input that came from outside the process.
"""

from __future__ import annotations


class BardError(Exception):
    """Base of every error the CLI turns into one line and exit code 2."""

    def __init__(self, message: str, value: object = None):
        super().__init__(message)
        self.value = value


class ConfigError(BardError):
    """A config.json / recipe field is missing, has the wrong type or an impossible value."""


class CheckpointError(BardError):
    """A checkpoint directory or weight file is missing, corrupt, or does not match its config."""


class DataError(BardError):
    """A data row, image or data path is invalid."""


class ExportError(BardError):
    """An export failed, did not validate, or an export directory is tampered or mismatched."""


class RuntimeInputError(BardError):
    """A decode option or prompt passed to the runtime is invalid."""
