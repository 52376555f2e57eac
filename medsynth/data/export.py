"""Write slice sets as training datasets: nnU-Net v2 raw format and a MONAI datalist.

nnU-Net requires consecutive label values, so canonical codes present in the data are renumbered
0..K-1 in order; ``dataset.json`` keeps the mapping back to the canonical scheme under ``medsynth``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from medsynth.labels import CANONICAL


@dataclass
class Case:
    """One training case: ``image`` and ``label`` (X, Y, Z), voxel ``spacing`` in mm (X, Y, Z)."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]


def _affine(spacing: tuple[float, float, float]) -> np.ndarray:
    return np.diag([*spacing, 1.0]).astype(np.float64)


def _save(array: np.ndarray, spacing: tuple[float, float, float], path: Path, dtype: type) -> None:
    img = nib.Nifti1Image(np.asarray(array, dtype=dtype), _affine(spacing))
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


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
        _save(c.image, c.spacing, out_dir / img_rel, np.float32)
        _save(lut[c.label], c.spacing, out_dir / lab_rel, np.uint8)
        training.append({"image": img_rel, "label": lab_rel})
    labels = {CANONICAL[src]: dst for src, dst in remap.items()}
    dataset = {
        "name": dataset_name,
        "description": description,
        "channel_names": {"0": channel_name},
        "labels": labels,
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        "medsynth": {"canonical_codes": {CANONICAL[src]: src for src in remap}},
    }
    (out_dir / "dataset.json").write_text(json.dumps(dataset, indent=2), encoding="utf-8")
    (out_dir / "datalist.json").write_text(
        json.dumps({"training": training, "labels": labels}, indent=2), encoding="utf-8"
    )
    return dataset
