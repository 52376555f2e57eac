"""Errors medsynth raises for bad input. The CLI turns them into one-line messages and exit code 2."""

from __future__ import annotations


class MedsynthError(Exception):
    """Base class: a user-facing problem (bad input, bad config) rather than a bug."""


class InputFileError(MedsynthError):
    """A file is missing, unreadable, corrupt or truncated. The message names the file."""


class LabelError(MedsynthError):
    """A label map has unknown, non-integer or non-finite values, or is empty."""


class GeometryError(MedsynthError):
    """Image and label disagree in shape, spacing or affine."""


class ManifestError(MedsynthError):
    """A manifest is malformed: missing columns or files, duplicate rows, paths outside the root, leaky splits."""


class ConfigError(MedsynthError):
    """A configuration file or key is invalid. The message names the key."""


class TrainingError(MedsynthError):
    """Training diverged (NaN/Inf loss) or cannot proceed. The message names the step."""
