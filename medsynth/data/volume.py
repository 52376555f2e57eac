"""In-memory image and label volumes that keep their geometry."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Volume:
    """An image or label volume in RAS+ voxel order with its world geometry.

    ``array`` is (X, Y, Z) for volumes (Z = short-axis slice index, base→apex as stored) or (X, Y, 1)
    for single 2-D slices; ``affine`` maps voxel indices to world millimetres (4×4);
    ``spacing`` is the voxel size in mm, or ``None`` for spacing-less sources (PNG).
    """

    array: np.ndarray
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    spacing: tuple[float, float, float] | None = None
    path: Path | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


def spacing_to_str(spacing: tuple[float, ...] | None) -> str:
    """Manifest encoding of a spacing: ``'1.367x1.367x10'``, or ``''`` when unknown."""
    if spacing is None:
        return ""
    return "x".join(f"{s:.6g}" for s in spacing)


def spacing_from_str(text: str | float | None) -> tuple[float, ...] | None:
    """Inverse of :func:`spacing_to_str`."""
    if text is None or (isinstance(text, float) and np.isnan(text)) or str(text).strip() == "":
        return None
    return tuple(float(s) for s in str(text).split("x"))


def shape_to_str(shape: tuple[int, ...]) -> str:
    return "x".join(str(int(s)) for s in shape)


def shape_from_str(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in str(text).split("x"))
