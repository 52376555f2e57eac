"""Built-in procedural cardiac MR phantom: short-axis cine/LGE stacks with canonical labels.

Entry points: :func:`generate_dataset` (NIfTI + manifest + ground-truth parameters on disk) and
:func:`phantom_subject` (one subject in memory). Geometry lives in :mod:`.anatomy`, tissue intensities
in :mod:`.contrast`, scanner styles in :mod:`.scanner`.
"""

from medsynth.phantom.generate import generate_dataset, phantom_subject, subject_id
from medsynth.phantom.scanner import SCANNERS, ScannerStyle

__all__ = ["generate_dataset", "phantom_subject", "subject_id", "SCANNERS", "ScannerStyle"]
