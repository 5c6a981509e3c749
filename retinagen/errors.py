"""The project's own error types.

Every error a user can cause (bad input, bad config, a checkpoint from another run) is a
`RetinagenError`; the CLI turns these into one clear line on stderr and exit code 2. Anything
else escaping the CLI is a bug (exit code 1).
"""

from __future__ import annotations

from pathlib import Path


class RetinagenError(Exception):
    """Base class for errors caused by the user's input, not by a bug. CLI exit code 2."""


class ConfigError(RetinagenError):
    """A config file or flag is invalid; the message names the key."""


class BadInputError(RetinagenError):
    """A file could not be used. Carries the file and the reason so reports can list both."""

    def __init__(self, path: str | Path | None, reason: str) -> None:
        self.path = str(path) if path is not None else None
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


class ImageDecodeError(BadInputError):
    """Zero-byte, truncated, non-image, unsupported mode/bit depth, or oversized image."""


class UnsafePathError(BadInputError):
    """A path that escapes the data root (``..``, absolute, or a symlink pointing out)."""


class NoFundusError(BadInputError):
    """No retinal field of view could be found in the image."""


class DicomError(BadInputError):
    """A DICOM file that is malformed, has no pixel data, or is of an unsupported modality."""


class CheckpointError(RetinagenError):
    """A checkpoint is missing, corrupt, unsafe (pickle), or does not match the config."""
