"""Scar quantification and detection on LGE: the GMM posterior against the clinical thresholding baselines.

Methods, all restricted to the *given* LV wall (MYO ∪ SCAR ∪ MVO of the reference labels), one (H, W) slice
at a time:

- ``nsd2`` / ``nsd3`` / ``nsd5``: remote myocardium mean + n·SD. The remote ROI is chosen automatically as
  the darkest of six 60° wall sectors (robust median / MAD-SD), the usual unsupervised stand-in for the
  manually drawn remote ROI;
- ``fwhm``: half of the maximum wall intensity (the classic full-width-at-half-maximum rule, with the
  maximum taken over the whole wall because no hyperenhanced ROI is drawn);
- ``gmm``: the fitted GMM's per-pixel scar posterior (:meth:`GMMModel.score`), thresholded at 0.5.

Reference scar = SCAR ∪ MVO (MVO is infarcted tissue; it is dark in LGE, so every intensity method misses
it unless filled — reported as is). Metrics: pixel Dice per case (all its slices together) averaged over
cases with scar; slice-level and case-level AUROC of scar present vs absent, scored by the predicted scar
fraction of the wall.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from medsynth.data.slices import SliceSet
from medsynth.errors import ManifestError, MedsynthError
from medsynth.labels import MVO, MYOCARDIAL_WALL, SCAR
from medsynth.utils.atomic import atomic_file
from medsynth.utils.seeding import rng as make_rng

log = logging.getLogger(__name__)

METHODS = ("nsd2", "nsd3", "nsd5", "fwhm", "gmm")
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


def predict_scar(slices: SliceSet, model: Any | None = None) -> dict[str, np.ndarray]:
    """Binary scar masks (N, H, W) per method; ``gmm`` only with a model supporting ``score``."""
    out: dict[str, np.ndarray] = {}
    imgs, labs = slices.images[:, 0], slices.labels
    for n in (2, 3, 5):
        out[f"nsd{n}"] = np.stack([nsd_mask(imgs[i], labs[i], n) for i in range(len(slices))])
    out["fwhm"] = np.stack([fwhm_mask(imgs[i], labs[i]) for i in range(len(slices))])
    if model is not None and model.supports("score"):
        try:
            scores = model.score(slices)
        except MedsynthError as err:  # e.g. a gmm fitted without scar labels has no scar component
            log.warning("gmm row skipped: %s", err)
        else:
            out["gmm"] = (scores.pixel_maps > 0.5) & np.isin(labs, MYOCARDIAL_WALL)
    return out


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


def evaluate_scar(
    slices: SliceSet,
    model: Any | None = None,
    train: SliceSet | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Metrics on ``slices`` (held-out). Without ``model`` a GMM is fitted on ``train`` (required then)."""
    if model is None:
        if train is None or len(train) == 0:
            raise ManifestError("evaluate scar: no model and no training slices to fit the GMM on")
        from medsynth.models.registry import create_model

        model = create_model("gmm")
        model.fit(train, seed=seed)
    predictions = predict_scar(slices, model)
    if "gmm" not in predictions:
        raise ManifestError("evaluate scar: the GMM has no scar component (no scar labels in its training slices)")
    return scar_metrics(slices, predictions)


def run_scar_evaluation(
    manifest: str | Path,
    out_dir: str | Path,
    model_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    seed: int = 0,
    test_fraction: float = 0.5,
    preprocess: Any = None,
) -> Path:
    """``medsynth evaluate scar``: write ``out_dir/scar_metrics.csv`` and return its path.

    With ``model_dir`` every slice of the manifest is evaluated with that model. Otherwise the GMM is fitted on
    the manifest's ``train`` split and evaluated on the rest (``test``/``val``); without splits a seeded
    patient-level split (``test_fraction``, stratified by scar) is made, so no patient is in both.
    """
    from medsynth.models.api import load_manifest_slices
    from medsynth.models.registry import load_model

    slices = load_manifest_slices(manifest, data_root, preprocess)
    if len(slices) == 0:
        raise ManifestError(f"{manifest}: no slices to evaluate")
    if model_dir is not None:
        table = evaluate_scar(slices, load_model(model_dir))
    else:
        splits = slices.meta["split"].astype(str).to_numpy()
        is_test = (splits != "train") if (splits == "train").any() else patient_split(slices, test_fraction, seed)
        if is_test.all() or not is_test.any():
            raise ManifestError(f"{manifest}: need both training and held-out patients for the scar evaluation")
        table = evaluate_scar(slices.subset(is_test), train=slices.subset(~is_test), seed=seed)
    out = Path(out_dir) / "scar_metrics.csv"
    with atomic_file(out) as tmp:
        table.to_csv(tmp, index=False)
    log.info("scar metrics:\n%s", table.to_string(index=False))
    return out
