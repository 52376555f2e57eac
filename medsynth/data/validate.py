"""Checks on loaded image / label volumes. Each raises a :mod:`medsynth.errors` error naming the file(s)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medsynth.data.volume import Volume
from medsynth.errors import GeometryError, InputFileError, LabelError

#: Largest allowed difference (mm, and unitless for the rotation part) between image and label affines.
AFFINE_ATOL = 1e-3


def _name(vol: Volume, fallback: str) -> str:
    return str(vol.path) if vol.path is not None else fallback


def check_finite(image: Volume, name: str | Path | None = None) -> None:
    """Refuse an image with NaN or Inf voxels (they poison normalisation and every statistic)."""
    arr = image.array
    if arr.dtype.kind in "fc":
        bad = ~np.isfinite(arr)
        n_bad = int(bad.sum())
        if n_bad:
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise InputFileError(
                f"{name or _name(image, '<image>')}: {n_bad} NaN/Inf voxel(s) in the image (first at index {where})"
            )


def check_not_blank(image: Volume, name: str | Path | None = None) -> None:
    """Refuse an all-zero image: an export that lost its pixel data, never a scan (normalisation would
    divide by zero and training would learn nothing)."""
    if not np.any(image.array):
        raise InputFileError(f"{name or _name(image, '<image>')}: image is all zero (no pixel data)")


def check_same_geometry(image: Volume, label: Volume, atol: float = AFFINE_ATOL) -> None:
    """Image and label must share the voxel grid: same (X, Y, Z) shape and the same affine within ``atol`` mm."""
    img_name, lab_name = _name(image, "<image>"), _name(label, "<label>")
    if image.shape != label.shape:
        raise GeometryError(
            f"{img_name} and {lab_name}: image shape {image.shape} does not match label shape {label.shape}"
        )
    diff = np.abs(np.asarray(image.affine, float) - np.asarray(label.affine, float))
    if not np.all(diff <= atol):
        raise GeometryError(
            f"{img_name} and {lab_name}: image and label affines differ by up to {diff.max():.4g} mm "
            f"(tolerance {atol:g})"
        )


def check_nonempty_label(label: Volume, name: str | Path | None = None) -> None:
    """Refuse a label map that is all background: it cannot drive cropping, training or evaluation."""
    if not np.any(label.array):
        raise LabelError(f"{name or _name(label, '<label>')}: label is empty (all background)")


def validate_pair(image: Volume, label: Volume, atol: float = AFFINE_ATOL) -> None:
    """All pair checks: finite, not all-zero image, matching geometry, non-empty (canonical) label."""
    check_finite(image)
    check_not_blank(image)
    check_same_geometry(image, label, atol=atol)
    check_nonempty_label(label)
