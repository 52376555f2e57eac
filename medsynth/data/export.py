"""Write slice sets as training datasets: nnU-Net v2 raw format and a MONAI datalist.

nnU-Net requires consecutive label values, so canonical codes present in the data are renumbered
0..K-1 in order; ``dataset.json`` keeps the mapping back to the canonical scheme under ``medsynth``.

Files are written by :mod:`medsynth.data.writer` with each case's true affine (voxel axes (H, W, slice),
world mm of the source scan), so nnU-Net plans at the true spacing and a real case overlays its source scan.

**2-D only.** Real cases are stacks of short-axis slices, synthetic cases single slices (H, W, 1): such a
dataset trains nnU-Net's ``2d`` configuration. ``dataset.json`` says so under ``medsynth.configurations``
(``["2d"]``) and in its description; a user who wants ``3d_fullres`` plans it on the real cases alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsynth.data.writer import save_nifti
from medsynth.labels import CANONICAL

#: The nnU-Net configurations a medsynth dataset is meant for (synthetic cases are single slices).
CONFIGURATIONS = ["2d"]
_2D_NOTE = "2-D only: real cases are slice stacks, synthetic cases single slices; train nnU-Net's 2d configuration"


@dataclass
class Case:
    """One training case: ``image`` and ``label`` with voxel axes (i, j, k) as written, voxel ``spacing`` in mm
    along (i, j, k) and ``affine`` the 4×4 voxel → world (mm) map (from :mod:`medsynth.data.writer`; ``None``
    means the axis-aligned ``diag(spacing)``). medsynth's own cases are (H, W, slice)."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray | None = None

    def world_affine(self) -> np.ndarray:
        if self.affine is None:
            return np.diag([*(float(s) for s in self.spacing), 1.0])
        affine = np.asarray(self.affine, dtype=float)
        if affine.shape != (4, 4):
            raise ValueError(f"case {self.case_id}: affine must be 4x4, got {affine.shape}")
        if not np.allclose(np.linalg.norm(affine[:3, :3], axis=0), self.spacing, rtol=1e-5):
            raise ValueError(f"case {self.case_id}: spacing {self.spacing} disagrees with the affine")
        return affine


def label_renumbering(present: Iterable[int]) -> dict[int, int]:
    """Canonical code → consecutive nnU-Net code (background always 0)."""
    codes = sorted({0, *(int(c) for c in present)})
    return {c: i for i, c in enumerate(codes)}


def write_nnunet_dataset(
    out_dir: str | Path,
    cases: list[Case],
    channel_name: str,
    dataset_name: str,
    description: str = "",
) -> dict:
    """Write ``imagesTr/{case}_0000.nii.gz``, ``labelsTr/{case}.nii.gz`` and ``dataset.json`` into ``out_dir``.

    Also writes ``datalist.json`` (MONAI ``load_decathlon_datalist`` format, key ``training``). Returns the
    dataset.json content. ``out_dir`` should be inside an atomic directory owned by the caller.
    """
    out_dir = Path(out_dir)
    if not cases:
        raise ValueError("cases: no cases to write")
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        raise ValueError("cases: case ids must be unique")
    present = set()
    for c in cases:
        present.update(np.unique(c.label).tolist())
    remap = label_renumbering(present)
    lut = np.zeros(max(CANONICAL) + 1, dtype=np.uint8)
    for src, dst in remap.items():
        lut[src] = dst
    (out_dir / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out_dir / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for c in cases:
        if c.image.shape != c.label.shape:
            raise ValueError(f"case {c.case_id}: image {c.image.shape} and label {c.label.shape} differ")
        img_rel = f"imagesTr/{c.case_id}_0000.nii.gz"
        lab_rel = f"labelsTr/{c.case_id}.nii.gz"
        affine = c.world_affine()
        save_nifti(c.image, affine, out_dir / img_rel, np.float32)
        save_nifti(lut[c.label], affine, out_dir / lab_rel, np.uint8)
        training.append({"image": img_rel, "label": lab_rel})
    labels = {CANONICAL[src]: dst for src, dst in remap.items()}
    dataset = {
        "name": dataset_name,
        "description": f"{description} ({_2D_NOTE})" if description else _2D_NOTE,
        "channel_names": {"0": channel_name},
        "labels": labels,
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        "medsynth": {"canonical_codes": {CANONICAL[src]: src for src in remap}, "configurations": CONFIGURATIONS},
    }
    (out_dir / "dataset.json").write_text(json.dumps(dataset, indent=2), encoding="utf-8")
    (out_dir / "datalist.json").write_text(
        json.dumps({"training": training, "labels": labels}, indent=2), encoding="utf-8"
    )
    return dataset
