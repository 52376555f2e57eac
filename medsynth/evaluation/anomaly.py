"""Anomaly detection on scans: slice / subject scores from any family declaring ``score``, and their evaluation
against scar labels next to the clinical baselines.

Protocol (see :func:`run_protocol`): fit on healthy subjects only, score held-out slices, then

- **slice level**: a slice is positive when its label map holds scar or MVO; AUROC of the slice scores — both
  the model's own whole-slice score (row ``NAME``) and the pixel-map 95th percentile inside the given LV wall
  (row ``NAME[wall]``, :func:`wall_scores`), since the baselines also look only inside the wall;
- **case level**: a subject is positive when any of its slices is; subject score = max over its slices
  (``agg``); AUROC;
- **pixel level**, inside the given LV wall (MYO ∪ scar ∪ MVO) as for the scar baselines: AUPRC of the pixel
  maps for scar ∪ MVO pixels over all wall pixels; Dice of the thresholded map against scar ∪ MVO, pooled
  over slices of positive subjects. The threshold is the ``pixel_quantile`` (default 0.95) of the wall-pixel
  scores on scar-free subjects of the same set (so no scar label is used to pick it); without any scar-free
  subject it falls back to that quantile over all wall pixels.

Baselines (:func:`baseline_scores`) come from :mod:`medsynth.evaluation.scar`: n-SD (n = 2, 3, 5), FWHM and,
given a fitted model that can score scar, its pixel maps thresholded (row e.g. ``gmm>0.5``); their pixel maps
are binary masks, evaluated at threshold 0.5, their slice score is the predicted scar fraction of the wall.

Everything works on :class:`~medsynth.data.slices.SliceSet` s and
:class:`~medsynth.models.base.AnomalyScores` — no family special cases.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

from medsynth.data.cohorts import has_scar, healthy_subjects  # noqa: F401 - healthy_subjects re-exported
from medsynth.data.slices import SliceSet
from medsynth.labels import MVO, MYOCARDIAL_WALL, SCAR
from medsynth.models.base import AnomalyScores, GenerativeModel, require

log = logging.getLogger(__name__)

SLICE_COLUMNS = ["subject_id", "case", "slice_index", "pathology", "split", "scar_pixels", "has_scar", "score"]
SUBJECT_COLUMNS = ["subject_id", "pathology", "split", "n_slices", "has_scar", "score", "mean_score"]
METRIC_COLUMNS = [
    "method", "n_slices", "n_subjects", "n_pos_slices", "n_pos_subjects", "slice_auroc", "case_auroc",
    "pixel_auprc", "pixel_dice", "threshold",
]  # fmt: skip


def scar_mask(labels: np.ndarray) -> np.ndarray:
    """Scar ∪ MVO pixels of canonical labels."""
    return np.isin(labels, (SCAR, MVO))


def has_scar_info(slices: SliceSet) -> bool:
    """Whether the labels can evaluate detection: some slices carry scar/MVO and some do not."""
    pos = has_scar(slices.labels)
    return bool(pos.any() and not pos.all())


def slice_table(slices: SliceSet, scores: AnomalyScores) -> pd.DataFrame:
    """One row per slice: identity, scar pixel count from the labels, and the anomaly score."""
    s = np.asarray(scores.slice_scores, dtype=np.float64)
    if s.shape != (len(slices),):
        raise ValueError(f"scores: expected ({len(slices)},) slice scores, got {s.shape}")
    meta = slices.meta
    n_scar = scar_mask(slices.labels).reshape(len(slices), -1).sum(1)
    return pd.DataFrame(
        {
            "subject_id": meta["subject_id"].astype(str),
            "case": meta.get("case", pd.Series([""] * len(meta))).astype(str),
            "slice_index": meta.get("slice_index", pd.Series([""] * len(meta))).astype(str),
            "pathology": meta.get("pathology", pd.Series([""] * len(meta))).astype(str),
            "split": meta.get("split", pd.Series([""] * len(meta))).astype(str),
            "scar_pixels": n_scar.astype(int),
            "has_scar": n_scar > 0,
            "score": s,
        },
        columns=SLICE_COLUMNS,
    )


def subject_table(slice_df: pd.DataFrame, agg: str = "max") -> pd.DataFrame:
    """Aggregate slice rows per subject: ``score`` = ``agg`` (max / mean) of slice scores."""
    if agg not in ("max", "mean"):
        raise ValueError(f"agg: expected 'max' or 'mean', got {agg!r}")
    g = slice_df.groupby("subject_id", sort=True)
    out = pd.DataFrame(
        {
            "pathology": g["pathology"].first(),
            "split": g["split"].first(),
            "n_slices": g.size(),
            "has_scar": g["has_scar"].any(),
            "score": g["score"].agg(agg),
            "mean_score": g["score"].mean(),
        }
    ).reset_index()
    return out[SUBJECT_COLUMNS]


def _auroc(y: np.ndarray, s: np.ndarray) -> float:
    ok = np.isfinite(s)
    y, s = np.asarray(y)[ok].astype(bool), np.asarray(s)[ok]
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, s))


def pixel_metrics(
    slices: SliceSet,
    maps: np.ndarray,
    subject_pos: Mapping[str, bool],
    pixel_quantile: float = 0.95,
    threshold: float | None = None,
) -> dict[str, float]:
    """Pixel AUPRC and Dice of thresholded maps inside the LV wall (see module docstring); a given
    ``threshold`` replaces the healthy-quantile rule."""
    if maps.shape != slices.labels.shape:
        raise ValueError(f"pixel_maps: shape {maps.shape} does not match labels {slices.labels.shape}")
    wall = np.isin(slices.labels, MYOCARDIAL_WALL)
    truth = scar_mask(slices.labels)
    vals, y = maps[wall], truth[wall]
    finite = np.isfinite(vals)
    out = {"pixel_auprc": float("nan"), "pixel_dice": float("nan"), "threshold": float("nan")}
    if y.any() and (~y).any() and finite.any():
        out["pixel_auprc"] = float(average_precision_score(y[finite], vals[finite]))
    subj = slices.meta["subject_id"].astype(str).to_numpy()
    pos_slice = np.array([bool(subject_pos.get(s, False)) for s in subj])
    ref = maps[~pos_slice][wall[~pos_slice]]
    ref = ref[np.isfinite(ref)]
    if ref.size == 0:
        ref = vals[finite]
    if ref.size == 0 or not truth[pos_slice].any():
        return out
    thr = float(np.quantile(ref, pixel_quantile)) if threshold is None else float(threshold)
    pred = (maps[pos_slice] > thr) & wall[pos_slice]
    t = truth[pos_slice]
    denom = pred.sum() + t.sum()
    out.update(pixel_dice=float(2 * (pred & t).sum() / denom) if denom else float("nan"), threshold=thr)
    return out


def evaluate_scores(
    slices: SliceSet,
    scores: AnomalyScores,
    method: str,
    agg: str = "max",
    pixel_quantile: float = 0.95,
    threshold: float | None = None,
) -> dict[str, Any]:
    """One metrics row for ``method`` (columns :data:`METRIC_COLUMNS`)."""
    sdf = slice_table(slices, scores)
    subj = subject_table(sdf, agg)
    row: dict[str, Any] = {
        "method": method,
        "n_slices": len(sdf),
        "n_subjects": len(subj),
        "n_pos_slices": int(sdf["has_scar"].sum()),
        "n_pos_subjects": int(subj["has_scar"].sum()),
        "slice_auroc": _auroc(sdf["has_scar"].to_numpy(), sdf["score"].to_numpy()),
        "case_auroc": _auroc(subj["has_scar"].to_numpy(), subj["score"].to_numpy()),
    }
    if scores.pixel_maps is not None:
        pos = dict(zip(subj.subject_id, subj.has_scar, strict=True))
        row.update(pixel_metrics(slices, scores.pixel_maps, pos, pixel_quantile, threshold))
    else:
        row.update(pixel_auprc=float("nan"), pixel_dice=float("nan"), threshold=float("nan"))
    return row


# ---- baselines -----------------------------------------------------------------------------------------
def baseline_scores(slices: SliceSet, scar_model: GenerativeModel | None = None) -> dict[str, AnomalyScores]:
    """The clinical baselines of :mod:`medsynth.evaluation.scar` (n-SD, n = 2, 3, 5; FWHM; and, given a fitted
    model that can ``score`` scar, its thresholded pixel maps) as anomaly scores: pixel map = the method's
    binary scar mask inside the wall, slice score = predicted scar fraction of the wall (as in
    :func:`medsynth.evaluation.scar.scar_metrics`). Evaluate them with threshold 0.5 (:data:`BASELINE_THRESHOLD`).
    """
    from medsynth.evaluation.scar import predict_scar

    wall = np.isin(slices.labels, MYOCARDIAL_WALL)
    area = np.maximum(wall.reshape(len(slices), -1).sum(1), 1)
    out = {}
    thresholds: dict[str, float] = {}
    for name, mask in predict_scar(slices, scar_model, thresholds=thresholds).items():
        m = (mask & wall).astype(np.float32)
        # a thresholded model row is named "<family>><threshold>" (e.g. "gmm>0.5") so it cannot clash with
        # the same family's continuous row
        key = f"{name}>{thresholds[name]:.3g}" if name in thresholds else name
        out[key] = AnomalyScores(slice_scores=m.reshape(len(m), -1).sum(1) / area, pixel_maps=m)
    return out


#: Binary baseline masks are thresholded at 0.5 instead of the healthy-quantile rule.
BASELINE_THRESHOLD = 0.5


def score_model(model: GenerativeModel, slices: SliceSet) -> AnomalyScores:
    """``model.score(slices)`` with a shape check (the capability must be declared)."""
    require(model, "score")
    scores = model.score(slices)
    if scores.pixel_maps is not None and scores.pixel_maps.shape != slices.labels.shape:
        raise ValueError(f"{model.family}: pixel maps {scores.pixel_maps.shape} != labels {slices.labels.shape}")
    return scores


def wall_scores(slices: SliceSet, scores: AnomalyScores, quantile: float = 0.95) -> AnomalyScores:
    """Slice scores re-derived from the pixel maps inside the given LV wall: the ``quantile`` of the wall's pixel
    scores (a robust maximum: scar is a local, wall-confined anomaly, which a whole-slice score dilutes with
    anatomical variability). Slices without wall pixels score the minimum of the rest."""
    if scores.pixel_maps is None:
        raise ValueError("scores: wall scores need pixel maps")
    wall = np.isin(slices.labels, MYOCARDIAL_WALL)
    out = np.full(len(slices), np.nan)
    for i in range(len(slices)):
        if wall[i].any():
            out[i] = float(np.quantile(scores.pixel_maps[i][wall[i]], quantile))
    if np.isnan(out).all():
        out[:] = 0.0
    out[np.isnan(out)] = np.nanmin(out)
    return AnomalyScores(slice_scores=out, pixel_maps=scores.pixel_maps)


def comparison_table(
    methods: Mapping[str, GenerativeModel | AnomalyScores],
    slices: SliceSet,
    include_baselines: bool = True,
    scar_model: GenerativeModel | None = None,
    agg: str = "max",
    pixel_quantile: float = 0.95,
) -> pd.DataFrame:
    """Metrics rows for every model (scored here) or precomputed score, then the n-SD / FWHM baselines and,
    with a fitted ``scar_model`` that can score, its thresholded pixel maps (all via :mod:`medsynth.evaluation.scar`).

    Each model gets two rows: ``NAME`` with the model's own slice score (whole slice: reconstruction error or
    NLL) and ``NAME[wall]`` with :func:`wall_scores` (pixel-map quantile inside the given LV wall, the same
    region the baselines see). Pixel metrics are identical in both."""
    rows = []
    has_wall = bool(np.isin(slices.labels, MYOCARDIAL_WALL).any())
    for name, m in methods.items():
        scores = m if isinstance(m, AnomalyScores) else score_model(m, slices)
        rows.append(evaluate_scores(slices, scores, name, agg, pixel_quantile))
        if has_wall and scores.pixel_maps is not None:
            rows.append(evaluate_scores(slices, wall_scores(slices, scores), f"{name}[wall]", agg, pixel_quantile))
    if include_baselines:
        for name, scores in baseline_scores(slices, scar_model).items():
            rows.append(evaluate_scores(slices, scores, name, agg, pixel_quantile, BASELINE_THRESHOLD))
    return pd.DataFrame(rows, columns=METRIC_COLUMNS)


def protocol_split(slices: SliceSet, train_split: str = "train") -> tuple[SliceSet, SliceSet]:
    """(fit set, evaluation set): healthy subjects of ``train_split`` vs every other subject (held-out healthy
    subjects and all infarct subjects, which the model never sees)."""
    healthy = healthy_subjects(slices)
    in_train = slices.meta["split"].astype(str).to_numpy() == train_split
    fit = healthy & in_train
    if not fit.any():
        raise ValueError(f"train_split: no healthy subjects in split {train_split!r}")
    return slices.subset(fit), slices.subset(~fit)


def run_protocol(
    families: Mapping[str, tuple[str, dict[str, Any] | None]],
    slices: SliceSet,
    seed: int = 0,
    train_split: str = "train",
    scar_model: GenerativeModel | None = None,
) -> tuple[pd.DataFrame, dict[str, dict[str, Any]]]:
    """Fit each ``name → (family, config)`` on healthy training subjects, score the rest, and tabulate against
    the baselines (and an already-fitted ``scar_model``, which needs scar labels to fit and so is not fitted on
    healthy subjects only). Returns (table, fit reports)."""
    from medsynth.models.registry import create_model

    fit_set, eval_set = protocol_split(slices, train_split)
    models: dict[str, GenerativeModel | AnomalyScores] = {}
    reports = {}
    for name, (family, cfg) in families.items():
        model = create_model(family, cfg)
        reports[name] = model.fit(fit_set, None, seed=seed)
        models[name] = model
    return comparison_table(models, eval_set, scar_model=scar_model), reports


def format_table(df: pd.DataFrame) -> str:
    """Plain-text rendering for logs and reports."""
    return df.to_string(index=False, float_format=lambda v: "nan" if math.isnan(v) else f"{v:.3f}")
