"""Phantom subjects and datasets: NIfTI images + canonical labels + manifest + ground-truth parameters.

Randomness is split into independent seeded streams per subject so that the same ``seed`` and subject
index give the same anatomy (and pathology) under every contrast and scanner style: a cine/LGE pair or a
scanner A/B pair of one subject is a *paired* acquisition of the same heart. Tissue intensities and texture
depend on the contrast; noise and bias field on the scanner as well.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from medsynth.data.manifest import write_manifest
from medsynth.data.volume import Volume, shape_to_str, spacing_to_str
from medsynth.labels import CANONICAL, LV, MVO, MYO, MYOCARDIAL_WALL, RV, SCAR
from medsynth.phantom.anatomy import (
    Grid,
    aha_segment,
    labels_from_tissue,
    render,
    sample_anatomy,
    segment_wall_thickness,
    wall_coordinates,
)
from medsynth.phantom.contrast import CONTRASTS, render_intensity, sample_tissue_intensities, texture_fields
from medsynth.phantom.scanner import apply_scanner, get_scanner
from medsynth.utils.atomic import atomic_dir
from medsynth.utils.hashing import sha256_file

log = logging.getLogger(__name__)

PHASES = ("ED", "ES")
SUPERSAMPLE = 2
_STREAM = {"anatomy": 0, "pathology": 1, "tissue": 2, "texture": 3, "scanner": 4}
_CONTRAST_ID = {"cine": 0, "lge": 1}
_PHASE_ID = {"ED": 0, "ES": 1}
PARAMS_VERSION = 2
#: Default share of infarct subjects per contrast: LGE cohorts are mostly infarcts (EMIDEC: 2/3), cine cohorts
#: mostly not (ACDC: 1 in 5 is a previous myocardial infarction).
DEFAULT_SCAR_PROB = {"cine": 0.2, "lge": 0.75}


def _rng(seed: int, *key: int) -> np.random.Generator:
    """An independent generator for one stream of one subject (SeedSequence spawn keys)."""
    if seed is None or int(seed) < 0:
        raise ValueError(f"seed: a non-negative integer seed is required, got {seed!r}")
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in key)))


def subject_id(seed: int, index: int) -> str:
    """Subject name: identical across contrasts and scanners for the same seed and index (same heart)."""
    return f"phantom-s{seed}-{index:03d}"


def _scar_prob(contrast: str, scar_prob: float | None) -> float:
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast: expected one of {CONTRASTS}, got {contrast!r}")
    return DEFAULT_SCAR_PROB[contrast] if scar_prob is None else float(scar_prob)


def _check_args(contrast: str, scanner: str, shape, spacing, scar_prob: float) -> tuple[tuple, tuple]:
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast: expected one of {CONTRASTS}, got {contrast!r}")
    get_scanner(scanner)
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 1 or shape[0] < 32 or shape[1] < 32:
        raise ValueError(f"shape: expected (X, Y, Z) with X, Y >= 32 and Z >= 1, got {shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing: expected three positive millimetre values, got {spacing}")
    if not 0.0 <= scar_prob <= 1.0:
        raise ValueError(f"scar_prob: expected a probability in [0, 1], got {scar_prob}")
    return shape, spacing


def _affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """Voxel → mm affine matching :class:`Grid` (in-plane centre at 0, slice 0 at z = 0)."""
    aff = np.diag([spacing[0], spacing[1], spacing[2], 1.0])
    aff[0, 3] = (0.5 - shape[0] / 2) * spacing[0]
    aff[1, 3] = (0.5 - shape[1] / 2) * spacing[1]
    return aff


def _stats(image: np.ndarray, labels: np.ndarray) -> dict[str, dict[str, float]]:
    out = {}
    for code, name in CANONICAL.items():
        vals = image[labels == code]
        if vals.size:
            out[name] = {"mean": round(float(vals.mean()), 4), "sd": round(float(vals.std()), 4), "n": int(vals.size)}
    return out


def _round(obj: Any) -> Any:
    """Round floats for a stable, readable JSON (6 significant digits)."""
    if isinstance(obj, float):
        return float(f"{obj:.6g}")
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round(v) for v in obj]
    return obj


def phantom_subject(
    seed: int,
    index: int = 0,
    contrast: str = "cine",
    scanner: str = "A",
    shape: tuple[int, int, int] = (128, 128, 10),
    spacing: tuple[float, float, float] = (1.5, 1.5, 8.0),
    pathology: str | None = None,
    scar_prob: float | None = None,
) -> dict[str, Any]:
    """Render one phantom subject (both phases) in memory.

    Returns ``{"subject_id": str, "ED": (image, label), "ES": (image, label), "params": dict}`` where
    image is a float32 :class:`Volume` (X, Y, Z) in MR units (0–~1000) and label a uint8 canonical
    :class:`Volume`. ``pathology`` None draws "infarct" with probability ``scar_prob`` (None: the contrast's
    :data:`DEFAULT_SCAR_PROB`). Cine labels never contain scar/MVO (invisible in cine: labelled myocardium);
    the scar geometry is in ``params``. ``pathology`` is "infarct" exactly when the heart has a scar.
    """
    scar_prob = _scar_prob(contrast, scar_prob)
    shape, spacing = _check_args(contrast, scanner, shape, spacing, scar_prob)
    if int(index) < 0:
        raise ValueError(f"index: expected a non-negative subject index, got {index}")
    if pathology is None:
        pathology = "infarct" if _rng(seed, index, _STREAM["pathology"]).uniform() < scar_prob else "normal"
    anat = sample_anatomy(_rng(seed, index, _STREAM["anatomy"]), pathology, shape[2])
    cid = _CONTRAST_ID[contrast]
    tissue_params = sample_tissue_intensities(_rng(seed, index, _STREAM["tissue"], cid), contrast)
    style = get_scanner(scanner)
    lo = Grid(shape, spacing, 1)
    hi = Grid(shape, spacing, SUPERSAMPLE)
    affine = _affine(shape, spacing)
    sid = subject_id(seed, index)
    out: dict[str, Any] = {"subject_id": sid}
    phases: dict[str, Any] = {}
    alpha, tt = wall_coordinates(anat, lo)
    segments = aha_segment(alpha, tt)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    truth_all = render(anat, lo, PHASES, thorax=False)
    tissue_all = render(anat, hi, PHASES)
    fields = texture_fields(
        _rng(seed, index, _STREAM["texture"], cid), tissue_all["ED"].shape, spacing[0] / SUPERSAMPLE
    )
    for phase in PHASES:
        pid = _PHASE_ID[phase]
        truth = labels_from_tissue(truth_all[phase], lge=True)
        labels = truth if contrast == "lge" else labels_from_tissue(truth_all[phase], lge=False)
        obj = render_intensity(tissue_all[phase], tissue_params, fields)
        image = apply_scanner(
            obj, style, _rng(seed, index, _STREAM["scanner"], cid, pid, ord(scanner)), SUPERSAMPLE, spacing[0]
        )
        # The renderer draws the heart with the RV at -X and the chest wall at -Y; real RAS short-axis
        # stacks (ACDC) have them at +X and +Y, so turn the plane by 180 degrees to match.
        out[phase] = (
            Volume(np.ascontiguousarray(image[::-1, ::-1]), affine.copy(), spacing),
            Volume(np.ascontiguousarray(labels[::-1, ::-1]), affine.copy(), spacing),
        )
        # Ground-truth scar bookkeeping comes from the LGE labels even for cine.
        wall = np.isin(truth, MYOCARDIAL_WALL)
        scar_vox = np.isin(truth, (SCAR, MVO))
        phases[phase] = {
            "lv_volume_ml": int((truth == LV).sum()) * voxel_ml,
            "rv_volume_ml": int((truth == RV).sum()) * voxel_ml,
            "myocardium_volume_ml": int(wall.sum()) * voxel_ml,
            "scar_volume_ml": int((truth == SCAR).sum()) * voxel_ml,
            "mvo_volume_ml": int((truth == MVO).sum()) * voxel_ml,
            "scar_fraction": float(scar_vox.sum() / max(int(wall.sum()), 1)),
            "scar_aha_segments": sorted(int(s) for s in np.unique(segments[scar_vox])),
            "wall_thickness_mm": segment_wall_thickness(anat, phase),
            "observed": _stats(image, labels),
        }
        if contrast == "lge" and (labels == MYO).any() and (labels == SCAR).any():
            obs = phases[phase]["observed"]
            phases[phase]["observed_scar_to_remote"] = obs["scar"]["mean"] / obs["myo"]["mean"]
    if pathology == "infarct" and phases["ED"]["scar_volume_ml"] == 0:
        # a scar outside every imaged slice (a short stack): the images show a heart without scar
        log.warning("phantom: %s: the drawn scar misses every slice; recorded as normal", sid)
        pathology = "normal"
    ed, es = phases["ED"]["lv_volume_ml"], phases["ES"]["lv_volume_ml"]
    params = {
        "subject_id": sid,
        "index": index,
        "pathology": pathology,
        "contrast": contrast,
        "scanner": scanner,
        "anatomy": anat.to_dict(),
        # Tissue means/SDs before scanner effects; "scar_to_remote" is the ground-truth contrast ratio.
        "tissue": tissue_params,
        "scar_to_remote": tissue_params["scar"]["mean"] / tissue_params["myocardium"]["mean"]
        if contrast == "lge" and pathology == "infarct"
        else None,
        "scanner_style": style.to_dict(),
        "measured_ef": (ed - es) / ed if ed > 0 else None,
        "stroke_volume_ml": ed - es,
        "rv_stroke_volume_ml": phases["ED"]["rv_volume_ml"] - phases["ES"]["rv_volume_ml"],
        "measured_rv_ef": 1.0 - phases["ES"]["rv_volume_ml"] / phases["ED"]["rv_volume_ml"]
        if phases["ED"]["rv_volume_ml"] > 0
        else None,
        "phases": phases,
    }
    out["params"] = _round(params)
    return out


def _write_nifti(vol: Volume, path: Path) -> None:
    """Write .nii.gz deterministically (gzip header without mtime or file name)."""
    img = nib.Nifti1Image(vol.array, vol.affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(vol.affine, code=1)
    img.header.set_sform(vol.affine, code=1)
    data = gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)
    path.write_bytes(data)


def generate_dataset(
    out_dir: str | Path,
    subjects: int = 4,
    contrast: str = "cine",
    scanner: str = "A",
    seed: int = 0,
    shape: tuple[int, int, int] = (128, 128, 10),
    spacing: tuple[float, float, float] = (1.5, 1.5, 8.0),
    scar_prob: float | None = None,
) -> Path:
    """Write a phantom dataset to ``out_dir`` atomically and return the manifest path.

    Layout: ``images/<subject>_<ED|ES>.nii.gz`` (float32, MR units), ``labels/…`` (uint8 canonical),
    ``manifest.csv`` (paths relative to ``out_dir``) and ``phantom_params.json`` (ground truth per subject).
    Infarct subjects: ``round(scar_prob * subjects)`` of them (``scar_prob`` None: the contrast's
    :data:`DEFAULT_SCAR_PROB`), which ones chosen by ``seed``; cine and LGE with the same ``scar_prob`` have
    the same set (paired hearts). Same arguments → byte-identical files.
    """
    if int(subjects) < 1:
        raise ValueError(f"subjects: expected at least 1, got {subjects}")
    scar_prob = _scar_prob(contrast, scar_prob)
    shape, spacing = _check_args(contrast, scanner, shape, spacing, scar_prob)
    n_inf = int(round(scar_prob * subjects))
    order = _rng(seed, 10**6).permutation(subjects)
    infarct = set(int(i) for i in order[:n_inf])
    out_dir = Path(out_dir)
    rows = []
    all_params: dict[str, Any] = {}
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        (tmp / "labels").mkdir()
        for i in range(subjects):
            subj = phantom_subject(
                seed, i, contrast, scanner, shape, spacing, "infarct" if i in infarct else "normal", scar_prob
            )
            sid = subj["subject_id"]
            all_params[sid] = subj["params"]
            for phase in PHASES:
                image, label = subj[phase]
                rel_img = f"images/{sid}_{phase}.nii.gz"
                rel_lab = f"labels/{sid}_{phase}.nii.gz"
                _write_nifti(image, tmp / rel_img)
                _write_nifti(label, tmp / rel_lab)
                rows.append(
                    {
                        "subject_id": sid,
                        "image": rel_img,
                        "label": rel_lab,
                        "dataset": "phantom",
                        "modality": contrast,
                        "vendor": f"phantom-{scanner}",
                        "phase": phase,
                        "pathology": subj["params"]["pathology"],
                        "label_map": "canonical",
                        "spacing": spacing_to_str(spacing),
                        "shape": shape_to_str(shape),
                        "split": "",
                        "sha256": sha256_file(tmp / rel_img),
                        "source": "synthetic",
                        "family": "phantom",
                        "seed": str(seed),
                    }
                )
        write_manifest(pd.DataFrame(rows), tmp / "manifest.csv")
        meta = {
            "generator": "medsynth.phantom",
            "version": PARAMS_VERSION,
            "seed": seed,
            "contrast": contrast,
            "scanner": scanner,
            "shape": list(shape),
            "spacing": list(spacing),
            "scar_prob": scar_prob,
            "units": "MR units (0-1000 scale); lengths mm; volumes ml; angles deg (0 septum, 90 anterior)",
            "subjects": all_params,
        }
        (tmp / "phantom_params.json").write_text(
            json.dumps(_round(meta), indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
    log.info("phantom: wrote %d subjects (%s, scanner %s) to %s", subjects, contrast, scanner, out_dir)
    return out_dir / "manifest.csv"
