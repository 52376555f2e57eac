"""Errors medsynth raises for bad input. The CLI turns them into one-line messages and exit code 2.

One hierarchy for every family and command: a given input problem raises the same class wherever it is found
(e.g. a conditional family asked to sample without label maps raises :class:`LabelError` in every family).
"""

from __future__ import annotations


class MedsynthError(Exception):
    """Base class: a user-facing problem (bad input, bad config) rather than a bug."""


class InputFileError(MedsynthError):
    """A file is missing, unreadable, corrupt or truncated. The message names the file."""


class LabelError(MedsynthError):
    """A label map has unknown, non-integer or non-finite values, is empty, or is missing where the family is
    label-conditioned."""


class GeometryError(MedsynthError):
    """Image and label disagree in shape, spacing or affine."""


class ManifestError(MedsynthError):
    """A manifest is malformed: missing columns or files, duplicate rows, paths outside the root, leaky splits."""


class ConfigError(MedsynthError, ValueError):
    """A configuration file or key is invalid. The message names the key.

    Also a :class:`ValueError`, so constructors validating their arguments (which raise ``ValueError`` naming
    the argument) and config validation can be caught alike."""


class TrainingError(MedsynthError):
    """Training diverged (NaN/Inf loss) or cannot proceed. The message names the step."""


class CapabilityError(MedsynthError, AttributeError):
    """A model does not offer the requested capability (e.g. ``translate`` on a GMM, ``sample`` on a CycleGAN).

    The message names the family and the capability. Also an :class:`AttributeError`, because an undeclared
    capability is a missing method: ``getattr(model, "translate", None)`` is ``None`` for a non-translator."""

    def __init__(self, family: str, capability: str, detail: str = "") -> None:
        self.family, self.capability = family, capability
        msg = f"family {family!r} cannot {_VERBS.get(capability, capability)} (it does not declare {capability!r})"
        super().__init__(f"{msg}: {detail}" if detail else msg)


_VERBS = {"scar": "insert scar", "context": "sample in context"}
