"""Preprocessing of image–label volumes into model-ready 2-D short-axis slices.

Steps, per image–label pair (both RAS+ canonical ``(X, Y, Z)`` volumes from :mod:`medsynth.data.readers`):

1. **Orientation**: slices are taken along the last axis (the short-axis stack). In-plane, an output slice
   ``(H, W)`` of a volume with world geometry is shown radiologically (rows along -Y, columns along -X, see
   :data:`IN_PLANE_WORLD`); spacing-less PNG slices come out as they were stored (:data:`IN_PLANE_STORED`).
2. **In-plane resampling** to ``spacing_mm`` (images linear, labels nearest) and **crop/pad** to
   ``size × size`` around the heart are done in *one* resampling step: every output pixel is mapped to a
   source coordinate by a 2-D affine map ``source_xy = matrix @ (h, w) + offset``. The map is stored in the
   slice record, so :func:`slice_to_volume_space` can invert it exactly. The window is centred on the
   centroid of LV + myocardium (+ scar, MVO) + RV over the whole volume, so every slice of a volume shares it;
   the offset is rounded to whole source pixels so that "keep pixels" (PNG, ``spacing_mm=None``) copies
   pixels without interpolation. Outside the source field of view the image is padded with 0 (the
   ``p_low`` level) and the label with background.
3. **Robust intensity normalisation** per volume: ``(x - p_low) / (p_high - p_low)`` with the configured
   percentiles computed over all voxels of the source volume; not clipped above (bright scar keeps its
   contrast), clipped below at ``lower_clip``.

A single resampling via :func:`scipy.ndimage.affine_transform` is used instead of chaining MONAI's
``Spacing`` + ``SpatialCrop``/``SpatialPad``: one interpolation instead of two and an exactly invertible
record (MONAI's percentile scaling does not return the percentile values that the record needs either).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import field_validator, model_validator
from scipy import ndimage

from medsynth.config import StrictModel
from medsynth.data.manifest import load_manifest, resolve_path
from medsynth.data.slices import META_COLUMNS, SliceSet
from medsynth.data.volume import Volume
from medsynth.errors import LabelError, ManifestError, MedsynthError
from medsynth.labels import LABEL_MAPS, LV, MVO, MYO, RV, SCAR
from medsynth.utils.hashing import sha256_file, sha256_json

log = logging.getLogger(__name__)

#: Labels whose union locates the heart for cropping.
HEART_LABELS = (LV, MYO, RV, SCAR, MVO)
#: Labels that make a slice "labelled" (LV blood pool or any part of the LV wall).
LV_LABELS = (LV, MYO, SCAR, MVO)
#: In-plane orientation of output slices: output axis (H, W) → (source axis, direction).
#: Volumes with world geometry are shown radiologically: H runs along -Y (anterior at the top), W along -X
#: (patient right on the viewer's left, so the RV lies left of the LV in a short-axis view).
IN_PLANE_WORLD = {"h": ("y", -1), "w": ("x", -1)}
#: Spacing-less 2-D slices (PNG, read as X = column, Y = row) come out exactly as stored: H = +Y, W = +X.
IN_PLANE_STORED = {"h": ("y", +1), "w": ("x", +1)}
#: Bumped when the preprocessing output changes, so old caches are not reused.
CACHE_VERSION = 2


class PreprocessConfig(StrictModel):
    """How volumes become slices. ``spacing_mm``: in-plane target spacing (``None`` keeps pixels; sources
    without spacing, e.g. PNG, always keep pixels); ``size``: output H = W in pixels; ``percentiles``: the
    (low, high) percentiles mapped to 0 and 1; ``slices``: ``labelled`` keeps slices containing LV blood
    pool or myocardium (scar, MVO), ``all`` keeps every slice; ``lower_clip``: floor of normalised values."""

    spacing_mm: float | None = 1.5
    size: int = 128
    percentiles: tuple[float, float] = (1.0, 99.0)
    slices: Literal["labelled", "all"] = "labelled"
    lower_clip: float = -0.5

    @field_validator("spacing_mm")
    @classmethod
    def _positive_spacing(cls, v: float | None) -> float | None:
        if v is not None and not v > 0:
            raise ValueError("must be > 0 (or null to keep pixels)")
        return v

    @field_validator("size")
    @classmethod
    def _positive_size(cls, v: int) -> int:
        if v < 8:
            raise ValueError("must be >= 8")
        return v

    @model_validator(mode="after")
    def _ordered_percentiles(self) -> PreprocessConfig:
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")
        return self


# ---------------------------------------------------------------------------------------------------------
# geometry


def _in_plane_map(
    label: np.ndarray, spacing: tuple[float, ...] | None, cfg: PreprocessConfig
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """The output→source affine of the crop window: ``(matrix 2×2, offset 2, scale (sx, sy))``.

    ``scale`` = source pixels per output pixel along X and Y; ``offset`` is integer (whole source pixels).
    """
    if spacing is None or cfg.spacing_mm is None:
        sx = sy = 1.0
    else:
        sx, sy = cfg.spacing_mm / float(spacing[0]), cfg.spacing_mm / float(spacing[1])
    heart = np.isin(label, HEART_LABELS)
    if heart.any():
        xs, ys = np.nonzero(heart.any(axis=2))
        # centroid over all heart voxels of the volume: weight each (x, y) by its number of slices
        counts = heart.sum(axis=2)[xs, ys].astype(float)
        cx, cy = float(np.average(xs, weights=counts)), float(np.average(ys, weights=counts))
    else:
        cx, cy = (label.shape[0] - 1) / 2, (label.shape[1] - 1) / 2
    half = (cfg.size - 1) / 2
    dirs = {"x": 0, "y": 1}
    matrix = np.zeros((2, 2))
    scales = (sx, sy)
    in_plane = IN_PLANE_STORED if spacing is None else IN_PLANE_WORLD
    for out_axis, key in enumerate(("h", "w")):
        src_axis, sign = in_plane[key]
        matrix[dirs[src_axis], out_axis] = sign * scales[dirs[src_axis]]
    centre = np.array([cx, cy])
    # output pixel (half, half) lands on the centroid; round so "keep pixels" never interpolates
    offset = np.round(centre - matrix @ np.array([half, half]))
    return matrix, offset, (sx, sy)


def _resample_stack(
    stack: np.ndarray, matrix: np.ndarray, offset: np.ndarray, size: int, order: int, cval: float = 0.0
) -> np.ndarray:
    """Sample a (X, Y, Z) stack on the output grid: returns (Z, size, size)."""
    m3 = np.eye(3)
    m3[:2, :2] = matrix
    off3 = np.array([offset[0], offset[1], 0.0])
    out = ndimage.affine_transform(
        stack,
        m3,
        offset=off3,
        output_shape=(size, size, stack.shape[2]),
        order=order,
        mode="grid-constant",
        cval=cval,
        prefilter=False,
    )
    return np.moveaxis(out, 2, 0)


def _normalise(
    array: np.ndarray, cfg: PreprocessConfig, source: str, intensity_range: tuple[float, float] | None = None
) -> tuple[np.ndarray, float, float]:
    """Robust per-volume scaling: p_low → 0, p_high → 1, clipped below at ``lower_clip``.

    ``intensity_range`` gives (p_low, p_high) computed elsewhere (e.g. over a stack of 2-D slices)."""
    a = array.astype(np.float32, copy=False)
    if intensity_range is None:
        p_low, p_high = (float(v) for v in np.percentile(a, cfg.percentiles))
    else:
        p_low, p_high = (float(v) for v in intensity_range)
    denom = p_high - p_low
    if not denom > 0:
        log.warning("%s: image intensities are constant between the %s percentiles", source, cfg.percentiles)
        denom = 1.0
    out = (a - np.float32(p_low)) / np.float32(denom)
    np.maximum(out, np.float32(cfg.lower_clip), out=out)
    return out, p_low, p_high


def preprocess_pair(
    image: Volume,
    label: Volume,
    cfg: PreprocessConfig | None = None,
    intensity_range: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Turn one (X, Y, Z) image–label pair into slices.

    Returns ``images`` (Z', 1, H, W) float32 normalised, ``labels`` (Z', H, W) uint8 canonical and one
    JSON-serialisable record per slice (see :func:`slice_to_volume_space`). ``Z'`` counts the kept slices.
    Raises :class:`LabelError` when ``slices='labelled'`` and no slice holds LV or myocardium.
    ``intensity_range`` overrides the volume's own percentiles (used for stacks stored as 2-D slices).
    """
    cfg = cfg or PreprocessConfig()
    img, lab = np.asarray(image.array), np.asarray(label.array)
    source = str(image.path) if image.path is not None else "<image>"
    if img.ndim == 2:
        img, lab = img[:, :, None], lab[:, :, None] if lab.ndim == 2 else lab
    if img.ndim != 3 or img.shape != lab.shape:
        raise ValueError(f"image/label: expected matching (X, Y, Z) arrays, got {img.shape} and {lab.shape}")
    lab = lab.astype(np.uint8, copy=False)

    if cfg.slices == "labelled":
        keep = np.flatnonzero(np.isin(lab, LV_LABELS).any(axis=(0, 1)))
        if keep.size == 0:
            lname = str(label.path) if label.path is not None else "<label>"
            raise LabelError(f"{lname}: no slice contains LV blood pool or myocardium")
    else:
        keep = np.arange(img.shape[2])

    spacing = tuple(float(s) for s in image.spacing) if image.spacing is not None else None
    matrix, offset, (sx, sy) = _in_plane_map(lab, spacing, cfg)
    norm, p_low, p_high = _normalise(img, cfg, source, intensity_range)

    out_img = _resample_stack(norm[:, :, keep], matrix, offset, cfg.size, order=1).astype(np.float32)
    out_lab = _resample_stack(lab[:, :, keep], matrix, offset, cfg.size, order=0).astype(np.uint8)
    # linear interpolation never undershoots its inputs, but the pad value 0 may sit above lower_clip: fine.

    pad = _padding(matrix, offset, cfg.size, img.shape[:2])
    base = {
        "version": CACHE_VERSION,
        "source_path": str(image.path) if image.path is not None else None,
        "source_shape": [int(s) for s in img.shape],
        "source_spacing": list(spacing) if spacing is not None else None,
        "source_affine": np.asarray(image.affine, float).round(6).tolist(),
        "target_spacing": [cfg.spacing_mm, cfg.spacing_mm] if (spacing and cfg.spacing_mm) else None,
        "zoom": [1.0 / sx, 1.0 / sy],  # output pixels per source pixel along X, Y
        "size": [cfg.size, cfg.size],
        "in_plane": "H=+Y,W=+X" if spacing is None else "H=-Y,W=-X",
        "matrix": matrix.tolist(),  # source (x, y) = matrix @ (h, w) + offset
        "offset": offset.tolist(),
        "crop_offset": [float(offset[0]) * (1.0 / sx), float(offset[1]) * (1.0 / sy)],  # in resampled pixels
        "padding": pad,
        "p_low": p_low,
        "p_high": p_high,
        "percentiles": list(cfg.percentiles),
        "lower_clip": cfg.lower_clip,
    }
    records = [{**base, "slice_index": int(z)} for z in keep]
    return out_img[:, None], out_lab, records


def _padding(matrix: np.ndarray, offset: np.ndarray, size: int, shape: tuple[int, int]) -> dict[str, int]:
    """How many output rows/columns fall outside the source field of view on each side."""
    hw = np.arange(size, dtype=float)
    out: dict[str, int] = {}
    for out_axis, name in enumerate(("h", "w")):
        col = matrix[:, out_axis]
        src_axis = int(np.flatnonzero(col)[0])
        coords = offset[src_axis] + col[src_axis] * hw
        inside = (coords >= -0.5) & (coords <= shape[src_axis] - 0.5)
        idx = np.flatnonzero(inside)
        before = int(idx[0]) if idx.size else size
        after = int(size - 1 - idx[-1]) if idx.size else size
        out[f"{name}_before"], out[f"{name}_after"] = before, after
    return out


def slice_to_volume_space(slice_2d: np.ndarray, record: dict[str, Any] | str, order: int = 0) -> np.ndarray:
    """Map an output slice (H, W) back onto its source slice grid (X, Y) (``record['slice_index']`` tells z).

    ``order`` 0 for labels (nearest), 1 for images (linear). Source pixels outside the crop window get 0.
    Intensities stay on the normalised scale (see :func:`denormalise`).
    """
    rec = json.loads(record) if isinstance(record, str) else record
    arr = np.asarray(slice_2d)
    if arr.ndim != 2:
        raise ValueError(f"slice_2d: expected (H, W), got shape {arr.shape}")
    matrix = np.asarray(rec["matrix"], float)
    offset = np.asarray(rec["offset"], float)
    inv = np.linalg.inv(matrix)
    nx, ny = rec["source_shape"][:2]
    src = arr if order == 0 else arr.astype(np.float32, copy=False)
    return ndimage.affine_transform(
        src,
        inv,
        offset=-inv @ offset,
        output_shape=(nx, ny),
        order=order,
        mode="grid-constant",
        cval=0,
        prefilter=False,
    )


def denormalise(values: np.ndarray, record: dict[str, Any] | str) -> np.ndarray:
    """Normalised intensities back to the source scale (values clipped at ``lower_clip`` stay clipped)."""
    rec = json.loads(record) if isinstance(record, str) else record
    denom = rec["p_high"] - rec["p_low"]
    return np.asarray(values, np.float32) * np.float32(denom if denom > 0 else 1.0) + np.float32(rec["p_low"])


# ---------------------------------------------------------------------------------------------------------
# manifests → SliceSet


def _frame(row: pd.Series) -> int | None:
    value = str(row.get("frame", "") or "").strip()
    if value in ("", "nan", "None"):
        return None
    try:
        return int(float(value))
    except ValueError:
        return None


def empty_slice_set(size: int) -> SliceSet:
    return SliceSet(
        np.zeros((0, 1, size, size), np.float32),
        np.zeros((0, size, size), np.uint8),
        pd.DataFrame(columns=list(META_COLUMNS)),
    )


def slices_from_manifest(
    df: pd.DataFrame,
    root: str | Path,
    cfg: PreprocessConfig | None = None,
    manifest: str | Path = "manifest",
    lenient: bool = False,
) -> SliceSet:
    """Read every manifest row through :func:`medsynth.data.readers.read_pair` and preprocess it.

    Strict mode raises the first :class:`~medsynth.errors.MedsynthError`; lenient mode skips the row with a
    warning. ``meta`` follows :data:`~medsynth.data.slices.META_COLUMNS` (``case`` = the image path,
    ``record`` = JSON).
    """
    from medsynth.data.readers import read_pair, read_volume
    from medsynth.data.validate import check_finite

    cfg = cfg or PreprocessConfig()
    root = Path(root)
    df = df.reset_index(drop=True)
    stack_ranges = _stack_intensity_ranges(df, root, cfg, manifest, lenient)
    images, labels, metas = [], [], []
    for i, row in df.iterrows():
        try:
            if row["label_map"] not in LABEL_MAPS:
                raise ManifestError(
                    f"{manifest}: row {i + 1}: unknown label_map {row['label_map']!r}; known: {sorted(LABEL_MAPS)}"
                )
            img_path = resolve_path(root, row["image"], manifest)
            if row["label"]:
                lab_path = resolve_path(root, row["label"], manifest)
                image, label = read_pair(img_path, lab_path, row["label_map"], frame=_frame(row))
                row_cfg = cfg
            else:
                # image-only row (e.g. an unconditional family's samples): all background, keep every slice
                image = read_volume(img_path, frame=_frame(row))
                check_finite(image, img_path)
                label = Volume(np.zeros(image.array.shape, np.uint8), image.affine, image.spacing, img_path)
                row_cfg = cfg.model_copy(update={"slices": "all"})
            x, y, records = preprocess_pair(image, label, row_cfg, stack_ranges.get(_stack_id(row)))
        except MedsynthError as err:
            if not lenient:
                raise
            log.warning("%s: row %d skipped: %s", manifest, i + 1, err)
            continue
        for rec in records:
            rec["case"] = row["image"]
            if str(row.get("slice_index", "")).strip():
                rec["manifest_slice_index"] = str(row["slice_index"])
        images.append(x)
        labels.append(y)
        stack = _stack_id(row)
        for rec in records:
            metas.append(
                {
                    "subject_id": str(row["subject_id"]),
                    # a stack stored as 2-D slices is one case (one volume), indexed by the manifest's slice
                    "case": stack or str(row["image"]),
                    "slice_index": str(row["slice_index"]).strip() if stack else str(rec["slice_index"]),
                    "dataset": str(row.get("dataset", "")),
                    "modality": str(row.get("modality", "")),
                    "vendor": str(row.get("vendor", "")),
                    "phase": str(row.get("phase", "")),
                    "pathology": str(row.get("pathology", "")),
                    "split": str(row.get("split", "")),
                    "record": json.dumps(rec, sort_keys=True),
                }
            )
    if not images:
        log.warning("%s: no slices produced", manifest)
        return empty_slice_set(cfg.size)
    return SliceSet(np.concatenate(images), np.concatenate(labels), pd.DataFrame(metas, columns=list(META_COLUMNS)))


def _stack_id(row: pd.Series) -> str | None:
    """Rows that are slices of one stack (a ``slice_index`` column, e.g. PNG slices) share a case id."""
    if not str(row.get("slice_index", "")).strip():
        return None
    return f"{row['subject_id']}/{row.get('phase', 'none') or 'none'}"


def _stack_intensity_ranges(
    df: pd.DataFrame, root: Path, cfg: PreprocessConfig, manifest: str | Path, lenient: bool
) -> dict[str, tuple[float, float]]:
    """Percentiles over each whole stack stored as 2-D slices, so its slices are normalised together
    (per-slice percentiles would give every slice of a subject a different intensity scale)."""
    from medsynth.data.readers import read_volume

    groups: dict[str, list[np.ndarray]] = {}
    for _, row in df.iterrows():
        stack = _stack_id(row)
        if stack is None:
            continue
        try:
            groups.setdefault(stack, []).append(read_volume(resolve_path(root, row["image"], manifest)).array.ravel())
        except MedsynthError:
            if not lenient:
                raise
    return {k: tuple(float(v) for v in np.percentile(np.concatenate(a), cfg.percentiles)) for k, a in groups.items()}


def cache_key(manifest_path: str | Path, root: Path, cfg: PreprocessConfig, lenient: bool) -> str:
    """Cache identity: the manifest's bytes, the data root, the config, the mode and the code version."""
    return sha256_json(
        {
            "manifest": sha256_file(manifest_path),
            "root": str(Path(root).resolve()),
            "config": cfg.model_dump(mode="json"),
            "lenient": lenient,
            "version": CACHE_VERSION,
        }
    )


def load_slices(
    manifest_path: str | Path,
    data_root: str | Path | None = None,
    cfg: PreprocessConfig | None = None,
    lenient: bool = False,
    cache_dir: str | Path | None = None,
) -> SliceSet:
    """Load and preprocess every row of a manifest into a :class:`SliceSet`.

    With ``cache_dir`` the result is stored as ``slices-<key>.npz`` keyed on the manifest's SHA-256, the data
    root and the config; a later call with the same inputs loads it instead of re-reading the volumes.
    (The key covers the manifest's bytes, whose ``sha256`` column pins the files' content.)
    """
    cfg = cfg or PreprocessConfig()
    df, root = load_manifest(manifest_path, data_root=data_root, lenient=lenient)
    cache_path = None
    if cache_dir is not None:
        key = cache_key(manifest_path, root, cfg, lenient)
        cache_path = Path(cache_dir) / f"slices-{key[:24]}.npz"
        if cache_path.is_file():
            try:
                cached = SliceSet.load(cache_path)
                log.info("%s: slices loaded from cache %s", manifest_path, cache_path)
                return cached
            except MedsynthError as err:
                log.warning("%s: ignoring unreadable cache: %s", cache_path, err)
    slices = slices_from_manifest(df, root, cfg, manifest=manifest_path, lenient=lenient)
    if cache_path is not None:
        slices.save(cache_path)
    return slices
