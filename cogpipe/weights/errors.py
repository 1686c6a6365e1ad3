"""The errors of cogpipe.weights: each message names the file and the rule."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and the rule."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle names code to run (a global outside the allowlist); nothing of it was executed."""


class CorruptCheckpointError(CheckpointError):
    """Truncated or malformed file."""


class ChecksumError(CheckpointError):
    """sha256 of the file differs from the expected digest."""


class WeightsMismatchError(CheckpointError):
    """Weights do not fit the model; the message names each key, both shapes, the likely cause and the fix."""
