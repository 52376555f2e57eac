"""Scar quantification and detection on LGE: the GMM posterior against the clinical thresholding baselines.

Methods, all restricted to the *given* LV wall (MYO ∪ SCAR ∪ MVO of the reference labels), one (H, W) slice
at a time:

- ``nsd2`` / ``nsd3`` / ``nsd5``: remote myocardium mean + n·SD. The remote ROI is chosen automatically as
  the darkest of six 60° wall sectors (robust median / MAD-SD), the usual unsupervised stand-in for the
  manually drawn remote ROI;
- ``fwhm``: half of the maximum wall intensity (the classic full-width-at-half-maximum rule, with the
  maximum taken over the whole wall because no hyperenhanced ROI is drawn);
- a fitted model that can ``score`` (row named after its family, e.g. ``gmm``): its pixel maps thresholded at
  the value the family declares for calibrated maps (the GMM's scar posterior: 0.5), else at a reference
  quantile of the scar-free wall (see :func:`predict_scar`).

Reference scar = SCAR ∪ MVO (MVO is infarcted tissue; it is dark in LGE, so every intensity method misses
it unless filled — reported as is). Metrics: pixel Dice per case (all its slices together) averaged over
cases with scar; slice-level and case-level AUROC of scar present vs absent, scored by the predicted scar
fraction of the wall.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from medsynth.data.slices import SliceSet
from medsynth.errors import ManifestError
from medsynth.labels import MVO, MYOCARDIAL_WALL, SCAR
from medsynth.utils.seeding import rng as make_rng

log = logging.getLogger(__name__)

#: The thresholding baselines; a scoring model adds one row after them.
BASELINES = ("nsd2", "nsd3", "nsd5", "fwhm")
METRIC_COLUMNS = (
    "method",
    "dice_mean",
    "dice_sd",
    "n_dice_cases",
    "slice_auroc",
    "n_slices",
    "n_scar_slices",
    "case_auroc",
    "n_cases",
    "n_scar_cases",
)


def nsd_mask(image: np.ndarray, label: np.ndarray, n: float) -> np.ndarray:
    """Wall pixels brighter than remote mean + ``n``·SD (automatic darkest-sector remote ROI)."""
    from medsynth.models.gmm.model import remote_and_blood

    remote, _ = remote_and_blood(image, label)
    wall = np.isin(label, MYOCARDIAL_WALL)
    if remote is None:
        return np.zeros_like(wall)
    mu, sd = remote
    return wall & (image > mu + n * sd)


def fwhm_mask(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Wall pixels at or above half the maximum wall intensity."""
    wall = np.isin(label, MYOCARDIAL_WALL)
    if not wall.any():
        return wall
    return wall & (image >= 0.5 * float(image[wall].max()))


def predict_scar(
    slices: SliceSet, model: Any | None = None, name: str | None = None, thresholds: dict[str, float] | None = None
) -> dict[str, np.ndarray]:
    """Binary scar masks (N, H, W) per method: the n-SD and FWHM baselines and, given a model that can
    ``score``, its pixel maps thresholded (row ``name``, default the model's family).

    The threshold is the one the family declares for calibrated maps (:attr:`AnomalyScores.pixel_threshold`,
    e.g. a posterior at 0.5); for uncalibrated maps (likelihoods, reconstruction errors) it is the
    :data:`REFERENCE_QUANTILE` of the map inside the wall of the slices without scar labels. The threshold
    used is stored in ``thresholds`` (when given) under the row's name."""
    out: dict[str, np.ndarray] = {}
    imgs, labs = slices.images[:, 0], slices.labels
    for n in (2, 3, 5):
        out[f"nsd{n}"] = np.stack([nsd_mask(imgs[i], labs[i], n) for i in range(len(slices))])
    out["fwhm"] = np.stack([fwhm_mask(imgs[i], labs[i]) for i in range(len(slices))])
    if model is not None and model.supports("score"):
        wall = np.isin(labs, MYOCARDIAL_WALL)
        scores = model.score(slices)
        if scores.pixel_maps is None:
            log.warning("%s row skipped: the model gives no pixel maps", name or model.family)
            return out
        threshold = scores.pixel_threshold
        if threshold is None:
            ref = scores.pixel_maps[wall & ~np.isin(labs, (SCAR, MVO)).any(axis=(1, 2))[:, None, None]]
            ref = ref[np.isfinite(ref)]
            if ref.size == 0:
                log.warning("%s row skipped: no scar-free wall pixels to set its threshold", name or model.family)
                return out
            threshold = float(np.quantile(ref, REFERENCE_QUANTILE))
        out[name or model.family] = (scores.pixel_maps > threshold) & wall
        if thresholds is not None:
            thresholds[name or model.family] = float(threshold)
    elif model is not None:
        log.warning("%s row skipped: %s", name or model.family, "the model cannot score (no scar model)")
    return out


#: Threshold of uncalibrated pixel maps: this quantile of the scar-free wall's values.
REFERENCE_QUANTILE = 0.95


def _auroc(truth: np.ndarray, score: np.ndarray) -> float:
    truth = np.asarray(truth, bool)
    if truth.all() or not truth.any():
        return float("nan")
    return float(roc_auc_score(truth, score))


def scar_metrics(slices: SliceSet, predictions: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per method (:data:`METRIC_COLUMNS`) from binary predictions (N, H, W)."""
    labs = slices.labels
    wall = np.isin(labs, MYOCARDIAL_WALL)
    truth = np.isin(labs, (SCAR, MVO))
    keep = wall.any(axis=(1, 2))
    cases = slices.meta["subject_id"].astype(str).to_numpy()
    slice_truth = truth.any(axis=(1, 2))
    case_ids = sorted(set(cases[keep]))
    case_truth = np.array([slice_truth[(cases == c) & keep].any() for c in case_ids])
    rows = []
    for method, pred in predictions.items():
        pred = pred & wall
        frac = pred.sum(axis=(1, 2)) / np.maximum(wall.sum(axis=(1, 2)), 1)
        dices, case_score = [], []
        for c, has in zip(case_ids, case_truth, strict=True):
            sel = (cases == c) & keep
            p, t = pred[sel], truth[sel]
            case_score.append(p.sum() / max(wall[sel].sum(), 1))
            if has:
                dices.append(2.0 * (p & t).sum() / max(p.sum() + t.sum(), 1))
        rows.append(
            {
                "method": method,
                "dice_mean": float(np.mean(dices)) if dices else float("nan"),
                "dice_sd": float(np.std(dices)) if dices else float("nan"),
                "n_dice_cases": len(dices),
                "slice_auroc": _auroc(slice_truth[keep], frac[keep]),
                "n_slices": int(keep.sum()),
                "n_scar_slices": int(slice_truth[keep].sum()),
                "case_auroc": _auroc(case_truth, np.array(case_score)),
                "n_cases": len(case_ids),
                "n_scar_cases": int(case_truth.sum()),
            }
        )
    return pd.DataFrame(rows, columns=list(METRIC_COLUMNS))


def patient_split(slices: SliceSet, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean (N,) test mask: a seeded patient-level split, stratified by whether the patient has scar."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a value in (0, 1), got {test_fraction}")
    subjects = slices.meta["subject_id"].astype(str).to_numpy()
    has = np.isin(slices.labels, (SCAR, MVO)).any(axis=(1, 2))
    r = make_rng(seed)
    test: set[str] = set()
    for flag in (True, False):
        ids = sorted({s for s in set(subjects) if has[subjects == s].any() == flag})
        ids = [ids[i] for i in r.permutation(len(ids))]
        test |= set(ids[: int(round(test_fraction * len(ids)))])
    return np.isin(subjects, sorted(test))


def evaluate_scar(slices: SliceSet, model: Any, name: str | None = None) -> pd.DataFrame:
    """Metrics on ``slices`` (held-out) of the baselines and a fitted model that can ``score`` (row ``name``,
    default its family)."""
    predictions = predict_scar(slices, model, name)
    if (name or model.family) not in predictions:
        raise ManifestError(
            f"evaluate scar: the {model.family!r} model gives no scar prediction (a scar model needs scar labels "
            "in its training slices)"
        )
    return scar_metrics(slices, predictions)
