"""The one NIfTI writer: preprocessed slices and stacks with their true geometry.

Every NIfTI file medsynth writes (``medsynth sample`` / ``scar`` / ``translate``, the flows' ``dataset/``) goes
through this module, so every command agrees on orientation, spacing and position.

**Voxel axes.** A written file's array is ``(i, j, k) = (H, W, slice)``: ``nib.load(f).dataobj[:, :, 0]`` is
the (H, W) slice exactly as medsynth holds it (no flip, no transpose). The orientation lives in the affine.

**Geometry from the preprocessing record.** :func:`medsynth.data.preprocess.preprocess_pair` stores, per slice,
the in-plane map ``source (x, y) = matrix @ (h, w) + offset`` onto the canonical (RAS+) source voxel grid, the
source ``slice_index`` z and the source's canonical ``source_affine`` (world = ``source_affine @ [x, y, z, 1]``).
The written affine is their composition, so voxel ``(h, w, 0)`` lands on the world point (mm) of the source
position it was resampled from:

- column i (H) = ``source_affine[:3, :2] @ matrix[:, 0]``; its length is the resampled in-plane spacing;
- column j (W) = ``source_affine[:3, :2] @ matrix[:, 1]``;
- column k = ``source_affine[:3, 2]``: one source slice; its length is the source slice spacing;
- origin = ``source_affine @ [offset_x, offset_y, z, 1]``.

A real case in ``dataset/`` therefore overlays its source scan in ITK-SNAP / 3D Slicer. A synthetic slice is
written with the record of the label slice it was made from, so it takes that slice's geometry.

**Read-back.** :func:`medsynth.data.readers.read_volume` reorders a written file to RAS+ and
:func:`~medsynth.data.preprocess.preprocess_pair` shows world-geometry slices radiologically (H along -Y, W
along -X), which is the direction the record's ``matrix`` gave H and W: a written asymmetric slice comes back
in the orientation it went in, on every path.

**Sources without geometry (PNG, e.g. EMIDEC).** Their record has ``source_spacing = None`` and
``in_plane = "H=+Y,W=+X"`` (H = stored row, W = stored column). They are placed in a stand-in world where the
stored pixel (x = column, y = row, z) sits at ``(-s·x, -s·y, s·z)`` mm, ``s = default_spacing_mm`` (the
preprocessing config's ``spacing_mm``): then H runs along -Y and W along -X, so the stored image is what a
viewer shows and what the read-back returns. For a stack kept as one PNG per slice, z is the manifest's
``slice_index`` (``record["manifest_slice_index"]``).

**No record** (an unconditional family's sample, or a record without the geometry keys): the documented
default is spacing ``default_spacing_mm`` on all three axes, voxel (0, 0, 0) at the world origin, and the same
display convention (H along -Y, W along -X), so such a slice also reads back unchanged.

**Stacks.** :func:`stack_to_nifti` writes slices of one source volume that share one in-plane map and have
consecutive ``slice_index`` values (sorted by z; k = z - z_min). Kept slices with gaps (``slices: labelled``
dropping a slice inside the stack) or slices cropped differently (PNG slices, cropped one by one) are not
padded with invented slices: :func:`stack_groups` splits them into runs that are each written as one volume
with its own true origin.

**nnU-Net.** Real cases are (H, W, n) stacks and synthetic cases (H, W, 1) single slices, so a medsynth
dataset is meant for nnU-Net's ``2d`` configuration; :mod:`medsynth.data.export` says so in ``dataset.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medsynth.data.volume import shape_to_str, spacing_to_str
from medsynth.utils.hashing import sha256_file

log = logging.getLogger(__name__)

Record = str | dict[str, Any] | None

#: Keys a record needs to carry geometry (all written by ``preprocess_pair``).
GEOMETRY_KEYS = ("matrix", "offset", "slice_index", "source_affine")


def parse_record(record: Record) -> dict[str, Any] | None:
    """A slice record as a dict, or ``None`` when it is empty / missing or carries no geometry."""
    if record is None:
        return None
    if isinstance(record, str):
        text = record.strip()
        if not text or text in ("nan", "None"):
            return None
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"record: not valid JSON ({err})") from None
    elif isinstance(record, dict):
        rec = record
    else:  # e.g. NaN from a pandas column
        return None
    if not isinstance(rec, dict) or not all(k in rec and rec[k] is not None for k in GEOMETRY_KEYS):
        return None
    return rec


def _check_spacing(default_spacing_mm: float) -> float:
    s = float(default_spacing_mm)
    if not s > 0:
        raise ValueError(f"default_spacing_mm: must be > 0, got {default_spacing_mm}")
    return s


def source_world(rec: dict[str, Any], default_spacing_mm: float = 1.0) -> np.ndarray:
    """The 4×4 canonical source-voxel → world (mm) affine of a record; the PNG stand-in world for sources
    without spacing (see the module docstring)."""
    if rec.get("source_spacing"):
        return np.asarray(rec["source_affine"], dtype=float)
    s = _check_spacing(default_spacing_mm)
    return np.diag([-s, -s, s, 1.0])


def slice_position(rec: dict[str, Any]) -> int:
    """The slice's z on its source grid: ``slice_index``, or for spacing-less one-slice-per-file stacks the
    manifest's ``slice_index`` (each PNG file holds one slice, z = 0)."""
    z = int(rec["slice_index"])
    manifest_z = str(rec.get("manifest_slice_index", "") or "").strip()
    if not rec.get("source_spacing") and manifest_z:
        with contextlib.suppress(ValueError):  # a non-numeric manifest index: the file's own z
            z = int(float(manifest_z))
    return z


def default_affine(default_spacing_mm: float = 1.0) -> np.ndarray:
    """Affine of a slice without a record: ``s`` mm on every axis, H along -Y, W along -X, origin 0."""
    s = _check_spacing(default_spacing_mm)
    affine = np.zeros((4, 4))
    affine[1, 0] = -s  # i = H along -Y
    affine[0, 1] = -s  # j = W along -X
    affine[2, 2] = s
    affine[3, 3] = 1.0
    return affine


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    sp = np.linalg.norm(affine[:3, :3], axis=0)
    return float(sp[0]), float(sp[1]), float(sp[2])


def slice_affine(record: Record, default_spacing_mm: float = 1.0) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The 4×4 affine of voxel ``(i, j, k) = (h, w, slice)`` → world mm of one preprocessed slice, and its voxel
    spacing ``(H, W, through-plane)`` in mm.

    With a record: in-plane spacing = the resampled spacing, through-plane = the source slice spacing, and the
    slice sits where it was cut from the source scan. ``record`` ``None`` / empty / without geometry: the
    default of :func:`default_affine` (``default_spacing_mm`` everywhere, origin 0).
    """
    rec = parse_record(record)
    if rec is None:
        affine = default_affine(default_spacing_mm)
        return affine, _spacing(affine)
    src = source_world(rec, default_spacing_mm)
    matrix = np.asarray(rec["matrix"], dtype=float).reshape(2, 2)
    offset = np.asarray(rec["offset"], dtype=float).reshape(2)
    affine = np.eye(4)
    affine[:3, 0] = src[:3, :2] @ matrix[:, 0]
    affine[:3, 1] = src[:3, :2] @ matrix[:, 1]
    affine[:3, 2] = src[:3, 2]
    affine[:3, 3] = src[:3, :3] @ np.array([offset[0], offset[1], float(slice_position(rec))]) + src[:3, 3]
    return affine, _spacing(affine)


def _grid_key(rec: dict[str, Any] | None, default_spacing_mm: float) -> str:
    """Slices with equal keys share one in-plane grid (same source world, map and crop)."""
    if rec is None:
        return "none"
    src = source_world(rec, default_spacing_mm)
    return json.dumps(
        [np.round(src, 6).tolist(), np.round(rec["matrix"], 9).tolist(), np.round(rec["offset"], 6).tolist()]
    )


def stack_groups(records: Sequence[Record], default_spacing_mm: float = 1.0) -> list[list[int]]:
    """Split slices (their records, in any order) into writable stacks: positions into ``records`` sorted by z,
    each group one shared in-plane grid and consecutive z. Slices without a record are one group each."""
    parsed = [parse_record(r) for r in records]
    by_grid: dict[str, list[int]] = {}
    singles: list[list[int]] = []
    for i, rec in enumerate(parsed):
        if rec is None:
            singles.append([i])
        else:
            by_grid.setdefault(_grid_key(rec, default_spacing_mm), []).append(i)
    groups: list[list[int]] = []
    for members in by_grid.values():
        members = sorted(members, key=lambda i: slice_position(parsed[i]))
        run = [members[0]]
        for i in members[1:]:
            z_prev, z = slice_position(parsed[run[-1]]), slice_position(parsed[i])
            if z == z_prev:
                raise ValueError(f"records: two slices at the same source position z={z}")
            if z == z_prev + 1:
                run.append(i)
            else:
                groups.append(run)
                run = [i]
        groups.append(run)
    groups.sort(key=lambda g: (slice_position(parsed[g[0]]), g[0]))
    return groups + singles


def stack_affine(records: Sequence[Record], default_spacing_mm: float = 1.0) -> tuple[np.ndarray, list[int]]:
    """Affine of a stack of slices (one :func:`stack_groups` group) and the order (positions into ``records``)
    in which the slices go along k. Raises ``ValueError`` when the slices are not one writable stack."""
    groups = stack_groups(records, default_spacing_mm)
    if len(groups) != 1:
        raise ValueError(
            f"records: {len(records)} slices do not form one stack (consecutive slice_index, one crop); "
            f"split them with stack_groups ({len(groups)} groups)"
        )
    order = groups[0]
    affine, _ = slice_affine(records[order[0]], default_spacing_mm)
    return affine, order


def nifti_image(array: np.ndarray, affine: np.ndarray, dtype: Any) -> nib.Nifti1Image:
    """A NIfTI image of a (i, j, k) array with ``affine`` as both sform and qform (code 1, scanner), units mm."""
    img = nib.Nifti1Image(np.ascontiguousarray(np.asarray(array).astype(dtype, copy=False)), affine)
    img.header.set_xyzt_units("mm")
    img.header.set_sform(affine, code=1)
    img.header.set_qform(affine, code=1)
    return img


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | Path, dtype: Any) -> None:
    """Write a (i, j, k) array with ``affine`` (see :func:`nifti_image`)."""
    nib.save(nifti_image(array, affine, dtype), str(path))


def slice_to_nifti(
    slice_2d: np.ndarray, record: Record, dtype: Any = np.float32, default_spacing_mm: float = 1.0
) -> nib.Nifti1Image:
    """One (H, W) slice → an (H, W, 1) NIfTI image with the geometry of :func:`slice_affine`."""
    arr = np.asarray(slice_2d)
    if arr.ndim != 2:
        raise ValueError(f"slice_2d: expected (H, W), got shape {arr.shape}")
    affine, _ = slice_affine(record, default_spacing_mm)
    return nifti_image(arr[:, :, None], affine, dtype)


def stack_to_nifti(
    slices: np.ndarray, records: Sequence[Record], dtype: Any = np.float32, default_spacing_mm: float = 1.0
) -> nib.Nifti1Image:
    """(n, H, W) slices of one source volume → an (H, W, n) NIfTI image, sorted by source z.

    The slices must form one stack (:func:`stack_groups`): consecutive ``slice_index``, one in-plane map.
    """
    arr = np.asarray(slices)
    if arr.ndim != 3 or arr.shape[0] != len(records):
        raise ValueError(f"slices: expected (n, H, W) with n = {len(records)} records, got shape {arr.shape}")
    affine, order = stack_affine(records, default_spacing_mm)
    return nifti_image(np.moveaxis(arr[order], 0, -1), affine, dtype)


def canonical_shape_spacing(
    shape: Sequence[int], affine: np.ndarray
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Shape and spacing of a written file in canonical RAS+ (X, Y, Z) order, as
    :func:`medsynth.data.readers.read_header` reports them (the manifest's ``shape`` / ``spacing`` columns)."""
    ornt = nib.orientations.io_orientation(affine)
    spacing = _spacing(affine)
    shp, sp = [0, 0, 0], [0.0, 0.0, 0.0]
    for src, dst in enumerate(int(a) for a in ornt[:, 0]):
        shp[dst], sp[dst] = int(shape[src]), spacing[src]
    return (shp[0], shp[1], shp[2]), (sp[0], sp[1], sp[2])


def write_pairs(
    tmp: Path,
    images: np.ndarray,
    labels: np.ndarray | None,
    names: list[str],
    records: list[Record],
    default_spacing_mm: float = 1.0,
) -> list[dict[str, str]]:
    """Write ``images`` (n, 1, H, W) float32 / ``labels`` (n, H, W) uint8 as single-slice NIfTI pairs
    ``images/{name}.nii.gz`` / ``labels/{name}.nii.gz`` under ``tmp``, slice ``i`` with the geometry of
    ``records[i]`` (:func:`slice_affine`; a synthetic slice passes the record of its label slice).

    Returns per pair the manifest path columns ``image, label, spacing, shape, sha256`` (``label`` empty when
    ``labels`` is None; ``shape`` / ``spacing`` in canonical (X, Y, Z) order like the manifest builder's).
    """
    tmp = Path(tmp)
    n = len(names)
    if images.ndim != 4 or images.shape[0] != n or images.shape[1] != 1:
        raise ValueError(f"images: expected (n, 1, H, W) with n = {n}, got shape {images.shape}")
    if labels is not None and labels.shape != (n, *images.shape[2:]):
        raise ValueError(f"labels: expected shape {(n, *images.shape[2:])}, got {labels.shape}")
    if len(records) != n:
        raise ValueError(f"records: expected {n} records (one per name), got {len(records)}")
    (tmp / "images").mkdir(parents=True, exist_ok=True)
    if labels is not None:
        (tmp / "labels").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, name in enumerate(names):
        affine, _ = slice_affine(records[i], default_spacing_mm)
        rel_img = f"images/{name}.nii.gz"
        save_nifti(images[i, 0][:, :, None], affine, tmp / rel_img, np.float32)
        rel_lab = ""
        if labels is not None:
            rel_lab = f"labels/{name}.nii.gz"
            save_nifti(labels[i][:, :, None], affine, tmp / rel_lab, np.uint8)
        shape, spacing = canonical_shape_spacing((*images.shape[2:], 1), affine)
        rows.append(
            {
                "image": rel_img,
                "label": rel_lab,
                "spacing": spacing_to_str(spacing),
                "shape": shape_to_str(shape),
                "sha256": sha256_file(tmp / rel_img),
            }
        )
    return rows
