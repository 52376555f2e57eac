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
given a fitted scar GMM, its posterior thresholded at 0.5 (row ``gmm>0.5``); their pixel maps are binary masks,
evaluated at threshold 0.5, their slice score is the predicted scar fraction of the wall.

Everything works on :class:`~medsynth.data.slices.SliceSet` s and
:class:`~medsynth.models.base.AnomalyScores` — no family special cases.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

from medsynth.data.slices import SliceSet
from medsynth.labels import MVO, MYOCARDIAL_WALL, SCAR
from medsynth.models.base import AnomalyScores, GenerativeModel
from medsynth.utils.atomic import atomic_file

log = logging.getLogger(__name__)

SLICE_COLUMNS = ["subject_id", "case", "slice_index", "pathology", "split", "scar_pixels", "has_scar", "score"]
SUBJECT_COLUMNS = ["subject_id", "pathology", "split", "n_slices", "has_scar", "score", "mean_score"]
METRIC_COLUMNS = [
    "method", "n_slices", "n_subjects", "n_pos_slices", "n_pos_subjects", "slice_auroc", "case_auroc",
    "pixel_auprc", "pixel_dice", "threshold",
]  # fmt: skip
NORMAL_PATHOLOGY = ("normal", "nor", "healthy", "none")


def scar_mask(labels: np.ndarray) -> np.ndarray:
    """Scar ∪ MVO pixels of canonical labels."""
    return np.isin(labels, (SCAR, MVO))


def has_scar_info(slices: SliceSet) -> bool:
    """Whether the labels can evaluate detection: some slices carry scar/MVO and some do not."""
    pos = scar_mask(slices.labels).reshape(len(slices), -1).any(1)
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
def baseline_scores(slices: SliceSet, gmm: GenerativeModel | None = None) -> dict[str, AnomalyScores]:
    """The clinical baselines of :mod:`medsynth.evaluation.scar` (n-SD, n = 2, 3, 5; FWHM; and the GMM scar
    posterior when a fitted ``gmm`` with a scar model is given) as anomaly scores: pixel map = the method's
    binary scar mask inside the wall, slice score = predicted scar fraction of the wall (as in
    :func:`medsynth.evaluation.scar.scar_metrics`). Evaluate them with threshold 0.5 (:data:`BASELINE_THRESHOLD`).
    """
    from medsynth.evaluation.scar import predict_scar

    wall = np.isin(slices.labels, MYOCARDIAL_WALL)
    area = np.maximum(wall.reshape(len(slices), -1).sum(1), 1)
    out = {}
    for name, mask in predict_scar(slices, gmm).items():
        m = (mask & wall).astype(np.float32)
        # the thresholded GMM posterior is named "gmm>0.5" so it cannot clash with a continuous "gmm" model row
        key = "gmm>0.5" if name == "gmm" else name
        out[key] = AnomalyScores(slice_scores=m.reshape(len(m), -1).sum(1) / area, pixel_maps=m)
    return out


#: Binary baseline masks are thresholded at 0.5 instead of the healthy-quantile rule.
BASELINE_THRESHOLD = 0.5


def score_model(model: GenerativeModel, slices: SliceSet) -> AnomalyScores:
    """``model.score(slices)`` with a shape check (the capability must be declared)."""
    if not model.supports("score"):
        from medsynth.models.base import CapabilityError

        raise CapabilityError(f"family {model.family!r} cannot score (capabilities: {sorted(model.capabilities)})")
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
    gmm: GenerativeModel | None = None,
    agg: str = "max",
    pixel_quantile: float = 0.95,
) -> pd.DataFrame:
    """Metrics rows for every model (scored here) or precomputed score, then the n-SD / FWHM baselines and,
    with a fitted scar-capable ``gmm``, its thresholded posterior (all via :mod:`medsynth.evaluation.scar`).

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
        for name, scores in baseline_scores(slices, gmm).items():
            rows.append(evaluate_scores(slices, scores, name, agg, pixel_quantile, BASELINE_THRESHOLD))
    return pd.DataFrame(rows, columns=METRIC_COLUMNS)


def healthy_subjects(slices: SliceSet) -> np.ndarray:
    """Slice mask of scar-free subjects: pathology says normal (when given) and no slice carries scar labels."""
    meta = slices.meta
    pos = (
        pd.Series(scar_mask(slices.labels).reshape(len(slices), -1).any(1)).groupby(meta["subject_id"]).transform("any")
    )
    path = meta.get("pathology", pd.Series([""] * len(meta))).astype(str).str.lower()
    normal_by_path = path.isin(NORMAL_PATHOLOGY) | (path == "") | (path == "nan")
    return (normal_by_path & ~pos).to_numpy()


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
    gmm: GenerativeModel | None = None,
) -> tuple[pd.DataFrame, dict[str, dict[str, Any]]]:
    """Fit each ``name → (family, config)`` on healthy training subjects, score the rest, and tabulate against
    the baselines (and an already-fitted scar ``gmm``, which needs scar labels to fit and so is not fitted on
    healthy subjects only). Returns (table, fit reports)."""
    from medsynth.models.registry import create_model

    fit_set, eval_set = protocol_split(slices, train_split)
    models: dict[str, GenerativeModel | AnomalyScores] = {}
    reports = {}
    for name, (family, cfg) in families.items():
        model = create_model(family, cfg)
        reports[name] = model.fit(fit_set, None, seed=seed)
        models[name] = model
    return comparison_table(models, eval_set, gmm=gmm), reports


# ---- writing -------------------------------------------------------------------------------------------
def detect(
    model: GenerativeModel, slices: SliceSet, out_dir: str | Path, agg: str = "max", baselines: bool = True
) -> dict[str, Path]:
    """Score ``slices`` with ``model`` and write ``slice_scores.csv``, ``subject_scores.csv`` and, when the
    labels carry scar information, ``anomaly_metrics.csv`` (model row, then n-SD / FWHM rows) into ``out_dir``.
    A ``gmm`` model's row is its own posterior score (continuous)."""
    out_dir = Path(out_dir)
    scores = score_model(model, slices)
    sdf = slice_table(slices, scores)
    written = {"slice_scores": _write_csv(sdf, out_dir / "slice_scores.csv")}
    written["subject_scores"] = _write_csv(subject_table(sdf, agg), out_dir / "subject_scores.csv")
    if has_scar_info(slices):
        table = comparison_table({model.family: scores}, slices, include_baselines=baselines, agg=agg)
        written["anomaly_metrics"] = _write_csv(table, out_dir / "anomaly_metrics.csv")
    else:
        log.info("no scar labels in the scored set: anomaly_metrics.csv not written")
    return written


def _write_csv(df: pd.DataFrame, path: Path) -> Path:
    with atomic_file(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    return path


def format_table(df: pd.DataFrame) -> str:
    """Plain-text rendering for logs and reports."""
    return df.to_string(index=False, float_format=lambda v: "nan" if math.isnan(v) else f"{v:.3f}")
