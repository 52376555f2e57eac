"""The one NIfTI writer of image–label slices (``medsynth sample`` / ``scar`` / ``translate``).

Placeholder of the geometry work (issue #15 item 1): same signature as the geometry-true writer, which takes
each slice's geometry from its preprocessing record; until then ``records`` is accepted and unused and every
slice is written with isotropic ``default_spacing_mm``. Slices are written as (X, Y, 1) volumes laid out so
that :func:`medsynth.data.preprocess.load_slices` reads them back in the same (H, W) orientation (rows along
-Y, columns along -X, RAS+ affine).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medsynth.utils.hashing import sha256_file


def slice_to_nifti(array: np.ndarray, spacing_mm: float, dtype: Any) -> nib.Nifti1Image:
    """(H, W) slice → (X, Y, 1) NIfTI whose radiological display (rows -Y, columns -X) is the slice."""
    vol = np.ascontiguousarray(array[::-1, ::-1].T[:, :, None]).astype(dtype)
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    img = nib.Nifti1Image(vol, affine)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    return img


def write_pairs(
    tmp: Path,
    images: np.ndarray,
    labels: np.ndarray | None,
    names: Sequence[str],
    records: Sequence[str] | None,
    default_spacing_mm: float,
) -> list[dict[str, str]]:
    """Write ``images`` (n, 1, H, W) float32 / ``labels`` (n, H, W) uint8 under ``tmp`` as
    ``images/<name>.nii.gz`` / ``labels/<name>.nii.gz``; ``records``: the per-slice preprocessing record JSON
    of each slice's source (or None). Returns the manifest path columns (image, label, spacing, shape, sha256)."""
    del records  # geometry from the records: see the module docstring
    tmp = Path(tmp)
    (tmp / "images").mkdir(parents=True, exist_ok=True)
    if labels is not None:
        (tmp / "labels").mkdir(parents=True, exist_ok=True)
    spacing_mm = float(default_spacing_mm)
    rows = []
    for i, name in enumerate(names):
        rel_img = f"images/{name}.nii.gz"
        nib.save(slice_to_nifti(images[i, 0], spacing_mm, np.float32), str(tmp / rel_img))
        rel_lab = ""
        if labels is not None:
            rel_lab = f"labels/{name}.nii.gz"
            nib.save(slice_to_nifti(labels[i], spacing_mm, np.uint8), str(tmp / rel_lab))
        h, w = images.shape[2:]
        rows.append(
            {
                "image": rel_img,
                "label": rel_lab,
                "spacing": f"{spacing_mm:.6g}x{spacing_mm:.6g}x{spacing_mm:.6g}",
                "shape": f"{w}x{h}x1",
                "sha256": sha256_file(tmp / rel_img),
            }
        )
    return rows
