"""Inspection of a manifest: per-pair label volumes (``summary.csv``) and a montage of labelled slices.

``summary.csv`` has one row per image–label pair: ``subject_id, phase, image, dataset, lv, myo, rv, scar, mvo,
unit``. Volumes are voxel count × voxel volume / 1000 in millilitres (``unit = ml``); for sources without a
spacing (PNG slices) they are plain pixel counts (``unit = pixels``).

``montage.png`` shows, per pair (at most :data:`MAX_PANELS`, evenly spread over the manifest), the
mid-ventricular slice — the middle of the slices holding the LV — preprocessed as the models see it (crop
around the heart, normalised intensities) with the canonical labels overlaid in colour.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from medsynth.data.manifest import load_manifest, resolve_path
from medsynth.data.preprocess import PreprocessConfig, _frame, preprocess_pair
from medsynth.errors import ManifestError, MedsynthError
from medsynth.labels import CANONICAL, LABEL_MAPS, LV, MVO, MYO, RV, SCAR
from medsynth.utils.atomic import atomic_dir

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.csv"
MONTAGE_FILE = "montage.png"
MAX_PANELS = 24
VOLUME_LABELS = (LV, MYO, RV, SCAR, MVO)
SUMMARY_COLUMNS = ("subject_id", "phase", "image", "dataset", *(CANONICAL[c] for c in VOLUME_LABELS), "unit")
#: Overlay colours (RGB) per canonical label.
COLOURS: dict[int, tuple[float, float, float]] = {
    LV: (0.90, 0.10, 0.10),
    MYO: (0.10, 0.80, 0.20),
    RV: (0.15, 0.35, 1.00),
    SCAR: (1.00, 0.85, 0.00),
    MVO: (0.85, 0.20, 0.90),
}


@dataclass
class InspectResult:
    summary: pd.DataFrame
    panels: list[tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)  # (title, image, label)
    skipped: int = 0


def label_volumes(label: np.ndarray, spacing: tuple[float, ...] | None) -> tuple[dict[str, float], str]:
    """Volume of each canonical label: ml when ``spacing`` (mm) is known, else the voxel count."""
    counts = np.bincount(np.asarray(label, np.uint8).ravel(), minlength=max(VOLUME_LABELS) + 1)
    if spacing is None:
        return {CANONICAL[c]: float(counts[c]) for c in VOLUME_LABELS}, "pixels"
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return {CANONICAL[c]: float(counts[c]) * voxel_ml for c in VOLUME_LABELS}, "ml"


def _panel_rows(df: pd.DataFrame, max_panels: int) -> set[int]:
    """Rows to show: one per (subject, phase) — the middle one, so that for PNG slice stacks (one row per
    slice) the mid-ventricular slice is shown — evenly spread over the groups when there are too many."""
    if df.empty:
        return set()
    keys = df["subject_id"].astype(str) + "|" + df.get("phase", pd.Series("", index=df.index)).astype(str)
    order = pd.to_numeric(df.get("slice_index", pd.Series("", index=df.index)), errors="coerce")
    picks = []
    for _, idx in keys.groupby(keys, sort=False).groups.items():
        members = sorted(idx, key=lambda i: (order[i] if pd.notna(order[i]) else 0, i))
        picks.append(members[len(members) // 2])
    if len(picks) > max_panels:
        picks = [picks[int(j)] for j in np.linspace(0, len(picks) - 1, max_panels).round()]
    return {int(i) for i in picks}


def inspect_manifest(
    df: pd.DataFrame,
    root: str | Path,
    manifest: str | Path = "manifest",
    lenient: bool = False,
    max_panels: int = MAX_PANELS,
    cfg: PreprocessConfig | None = None,
) -> InspectResult:
    """Read every row (strict: raise on the first bad one; lenient: skip with a warning), measure its labels
    and pick montage panels."""
    from medsynth.data.readers import read_pair, read_volume
    from medsynth.data.validate import check_finite
    from medsynth.data.volume import Volume

    cfg = cfg or PreprocessConfig()
    root = Path(root)
    df = df.reset_index(drop=True)
    chosen = _panel_rows(df, max_panels)
    rows, panels, skipped = [], [], 0
    for i, row in df.iterrows():
        try:
            if row["label_map"] not in LABEL_MAPS:
                raise ManifestError(
                    f"{manifest}: row {i + 1}: unknown label_map {row['label_map']!r}; known: {sorted(LABEL_MAPS)}"
                )
            if row["label"]:
                image, label = read_pair(
                    resolve_path(root, row["image"], manifest),
                    resolve_path(root, row["label"], manifest),
                    row["label_map"],
                    frame=_frame(row),
                )
            else:
                # an image-only row (samples of an unconditional family): no labels to measure, all background
                img_path = resolve_path(root, row["image"], manifest)
                image = read_volume(img_path, frame=_frame(row))
                check_finite(image, img_path)
                label = Volume(np.zeros(image.array.shape, np.uint8), image.affine, image.spacing, img_path)
            vols, unit = label_volumes(label.array, label.spacing)
            panel = None
            if i in chosen:
                x, y, _ = preprocess_pair(image, label, cfg.model_copy(update={"slices": "all"}))
                lv_slices = np.flatnonzero((y == LV).any(axis=(1, 2)))
                if lv_slices.size == 0:  # e.g. an apical slice with myocardium only
                    lv_slices = np.flatnonzero(y.any(axis=(1, 2)))
                z = int(lv_slices[len(lv_slices) // 2]) if lv_slices.size else y.shape[0] // 2
                phase = str(row.get("phase", "") or "")
                title = f"{row['subject_id']}" + (f" {phase}" if phase and phase != "none" else "")
                manifest_slice = str(row.get("slice_index", "") or "").strip()
                title += f" z={z}" if y.shape[0] > 1 else (f" slice {manifest_slice}" if manifest_slice else "")
                panel = (title, x[z, 0], y[z])
        except MedsynthError as err:
            if not lenient:
                raise
            log.warning("%s: row %d skipped: %s", manifest, i + 1, err)
            skipped += 1
            continue
        rows.append(
            {
                "subject_id": str(row["subject_id"]),
                "phase": str(row.get("phase", "")),
                "image": str(row["image"]),
                "dataset": str(row.get("dataset", "")),
                **vols,
                "unit": unit,
            }
        )
        if panel is not None:
            panels.append(panel)
    summary = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    return InspectResult(summary=summary, panels=panels, skipped=skipped)


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB (H, W, 3) in [0, 1]: the image (window 0..1 of the normalised scale) with coloured labels."""
    gray = np.clip(np.asarray(image, np.float32), 0.0, 1.0)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    for code, colour in COLOURS.items():
        mask = label == code
        if mask.any():
            rgb[mask] = (1 - alpha) * rgb[mask] + alpha * np.asarray(colour, np.float32)
    return rgb


def render_montage(panels: list[tuple[str, np.ndarray, np.ndarray]], path: str | Path, title: str = "") -> Path:
    """Write a grid of overlaid slices (matplotlib Agg) to ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    n = max(len(panels), 1)
    cols = min(6, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(2.3 * cols, 2.6 * nrows + 0.8), squeeze=False, layout="constrained")
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (name, img, lab) in zip(axes.ravel(), panels, strict=False):
        ax.imshow(overlay(img, lab), interpolation="nearest")
        ax.set_title(name, fontsize=8)
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no readable image–label pairs", ha="center", va="center")
    handles = [Patch(color=c, label=CANONICAL[k]) for k, c in COLOURS.items()]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def inspect(
    manifest_path: str | Path,
    out_dir: str | Path,
    data_root: str | Path | None = None,
    lenient: bool = False,
    max_panels: int = MAX_PANELS,
) -> InspectResult:
    """``medsynth inspect``: write ``summary.csv`` and ``montage.png`` into ``out_dir`` (atomically)."""
    df, root = load_manifest(manifest_path, data_root=data_root, lenient=lenient)
    result = inspect_manifest(df, root, manifest=manifest_path, lenient=lenient, max_panels=max_panels)
    with atomic_dir(out_dir) as tmp:
        result.summary.to_csv(tmp / SUMMARY_FILE, index=False, float_format="%.6g")
        shown = f"{len(result.panels)} of {len(result.summary)} pairs" if result.panels else "no pairs"
        render_montage(result.panels, tmp / MONTAGE_FILE, title=f"{Path(manifest_path).name}: {shown}")
    log.info("%s: %d pairs summarised (%d skipped) → %s", manifest_path, len(result.summary), result.skipped, out_dir)
    return result
