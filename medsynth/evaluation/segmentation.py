"""Downstream utility of synthetic data: a 2-D MONAI U-Net trained per arm, evaluated per patient in 3-D.

Arms (each run for every seed, with the same iteration budget so they compete on equal compute):

- ``real``: real training slices of ``n_train_patients`` patients (drawn per seed; ``None`` = all);
- ``real+synthetic``: the same real slices plus ``round(synthetic_ratio × n_real_slices)`` synthetic ones;
- ``synthetic``: synthetic slices only (train on synthetic, test on real).

A seed fixes the patient draw, the synthetic draw, the initialisation and the batches, so arms sharing a
seed form a paired comparison. Test slices are grouped into volumes by ``meta['case']`` and ordered by
``slice_index``; Dice and HD95 per class come from MONAI's ``DiceMetric`` / Hausdorff distance (:func:`hd95`) on
the stacked (H, W, Z) volume at the training resolution (``image_size``²). HD95 is in mm when the slice
``record`` (JSON written by :mod:`medsynth.data.preprocess`) carries the source spacing, else in pixels of
the evaluation grid (column ``hd95_unit``).

With ``roi="heart"`` every case (volume, PNG stack or synthetic slice) is cropped to one square box around
its reference labels before resizing, in training and in testing: the localisation is an oracle, so the
metrics measure delineation inside the heart region (false positives outside the box cannot happen).
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import Field
from tqdm.auto import tqdm

from medsynth.config import StrictModel
from medsynth.errors import TrainingError
from medsynth.labels import CANONICAL, N_CLASSES
from medsynth.utils.seeding import exclusive_global_rng, rng, seed_everything

if TYPE_CHECKING:
    from medsynth.data.slices import SliceSet

log = logging.getLogger(__name__)

ARMS = ("real", "real+synthetic", "synthetic")


class SegmentationConfig(StrictModel):
    """Protocol settings; the defaults finish in a few minutes on 2 CPU cores."""

    image_size: int = 64
    iterations: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    channels: tuple[int, ...] = (16, 32, 64, 128)
    num_res_units: int = 1
    seeds: list[int] = [0, 1, 2]
    arms: list[str] = list(ARMS)
    synthetic_ratio: float = 1.0
    n_train_patients: int | None = None
    num_threads: int = 1
    n_bootstrap: int = 1000
    ci: float = 0.95
    augment: bool = True
    #: ``"heart"``: train and test on square crops around each case's reference heart labels (see
    #: :func:`roi_boxes`), as a two-stage pipeline with a perfect first stage would; small structures (scar)
    #: then get several times more U-Net pixels. ``"none"``: the whole slice.
    roi: Literal["none", "heart"] = "none"
    roi_margin: float = Field(0.3, ge=0.0, le=2.0)  # added on each side, as a fraction of the box side
    progress: bool = True  # tqdm bar over training iterations (stderr)
    #: CLI only: seeded patient-level test fraction when the manifest has no split.
    test_fraction: float = 0.3
    split_seed: int = 0


# --------------------------------------------------------------------------------------------- data


def _resize(images: np.ndarray, labels: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.asarray(images, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels, dtype=np.uint8).astype(np.float32))[:, None]
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        y = F.interpolate(y, size=(size, size), mode="nearest")
    return x.clamp(-0.5, 3.0), y[:, 0].long()


def roi_boxes(s: SliceSet, margin: float, min_side: float = 16.0) -> np.ndarray:
    """(N, 3) float ``(centre row, centre col, side)`` in pixels of each slice's square heart crop.

    One box per case (``meta['case']``: a volume or PNG stack, or one synthetic slice), around all its
    labelled pixels, widened by ``margin`` × side on each side, so a case's slices stay one stacked volume
    on one grid. A case without labels keeps the whole slice."""
    n, h, w = s.labels.shape
    boxes = np.empty((n, 3), dtype=np.float64)
    cases = s.meta["case"].astype(str).to_numpy() if "case" in s.meta else np.arange(n).astype(str)
    for case in np.unique(cases):
        idx = np.flatnonzero(cases == case)
        fg = s.labels[idx] > 0
        if not fg.any():
            boxes[idx] = ((h - 1) / 2, (w - 1) / 2, max(h, w))
            continue
        rows, cols = np.flatnonzero(fg.any(axis=(0, 2))), np.flatnonzero(fg.any(axis=(0, 1)))
        side = max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) * (1.0 + 2.0 * margin)
        boxes[idx] = ((rows[0] + rows[-1]) / 2, (cols[0] + cols[-1]) / 2, max(side, min_side))
    return boxes


def _crop(images: np.ndarray, labels: np.ndarray, boxes: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Square crops ``boxes`` (N, 3) of images (N, 1, H, W) and labels (N, H, W), resampled to size²
    (bilinear / nearest; outside the slice: border value for images, background for labels)."""
    h, w = labels.shape[1:]
    b = torch.from_numpy(boxes)
    zero = torch.zeros(len(b), dtype=torch.float64)
    # normalised coordinates (align_corners=False): pixel centre i sits at (2 i + 1) / n - 1
    theta = torch.stack(
        [
            torch.stack([b[:, 2] / w, zero, (2 * b[:, 1] + 1) / w - 1], 1),
            torch.stack([zero, b[:, 2] / h, (2 * b[:, 0] + 1) / h - 1], 1),
        ],
        1,
    ).float()
    grid = F.affine_grid(theta, [len(b), 1, size, size], align_corners=False)
    x = torch.from_numpy(np.asarray(images, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels, dtype=np.uint8).astype(np.float32))[:, None]
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    y = F.grid_sample(y, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return x.clamp(-0.5, 3.0), y[:, 0].long()


def _inputs(s: SliceSet, cfg: SegmentationConfig) -> tuple[torch.Tensor, torch.Tensor, np.ndarray | None]:
    """U-Net inputs (N, 1, size, size), targets (N, size, size) and the ROI boxes (``None`` without ROI)."""
    if cfg.roi == "heart":
        boxes = roi_boxes(s, cfg.roi_margin)
        return (*_crop(s.images, s.labels, boxes, cfg.image_size), boxes)
    return (*_resize(s.images, s.labels, cfg.image_size), None)


def _subjects(s: SliceSet) -> np.ndarray:
    return s.meta["subject_id"].astype(str).to_numpy()


def select_patients(real_train: SliceSet, n: int | None, seed: int) -> SliceSet:
    """Slices of ``n`` patients of ``real_train`` drawn with ``seed`` (all when ``n`` is None)."""
    subj = _subjects(real_train)
    uniq = np.unique(subj)
    if n is None or n >= len(uniq):
        return real_train
    if n <= 0:
        raise ValueError(f"n_train_patients: must be positive, got {n}")
    chosen = rng(seed).choice(uniq, n, replace=False)
    return real_train.subset(np.isin(subj, chosen))


def build_arm(arm: str, real: SliceSet, synthetic: SliceSet | None, ratio: float, seed: int) -> SliceSet:
    """Training set of ``arm`` from the already selected real slices and the synthetic pool."""
    from medsynth.data.slices import SliceSet

    if arm == "real":
        return real
    if synthetic is None or len(synthetic) == 0:
        raise ValueError(f"arms: arm {arm!r} needs a synthetic set")
    if arm == "synthetic":
        return synthetic
    if arm == "real+synthetic":
        n = int(round(ratio * len(real)))
        if n <= 0:
            return real
        idx = rng(seed + 7919).choice(len(synthetic), n, replace=n > len(synthetic))
        syn = synthetic.subset(np.sort(idx))
        return SliceSet.concat([real, syn])
    raise ValueError(f"arms: unknown arm {arm!r}; allowed: {', '.join(ARMS)}")


# --------------------------------------------------------------------------------------------- model


def make_unet(cfg: SegmentationConfig) -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=N_CLASSES,
        channels=tuple(cfg.channels),
        strides=(2,) * (len(cfg.channels) - 1),
        num_res_units=cfg.num_res_units,
    )


@exclusive_global_rng
def train_unet(train: SliceSet, cfg: SegmentationConfig, seed: int) -> tuple[torch.nn.Module, dict]:
    """Train the U-Net on ``train`` for ``cfg.iterations`` batches (DiceCE loss, Adam, cosine LR).

    Uses ``cfg.num_threads`` torch threads during training (restored afterwards): on a busy 2-core machine
    1 thread is often several times faster than 2.
    """
    if len(train) == 0:
        raise ValueError("train: empty training set")
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.num_threads))
    try:
        return _train(train, cfg, seed)
    finally:
        torch.set_num_threads(prev_threads)


def _train(train: SliceSet, cfg: SegmentationConfig, seed: int) -> tuple[torch.nn.Module, dict]:
    from monai.losses import DiceCELoss

    gen = seed_everything(seed)
    x_all, y_all, _ = _inputs(train, cfg)
    model = make_unet(cfg)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.iterations)
    model.train()
    t0 = time.perf_counter()
    loss_v = float("nan")
    steps = tqdm(
        range(cfg.iterations), desc=f"U-Net seed {seed}", disable=not cfg.progress, leave=False, mininterval=2.0
    )
    for it in steps:
        idx = torch.randint(0, len(x_all), (min(cfg.batch_size, len(x_all)),), generator=gen)
        x, y = x_all[idx], y_all[idx]
        if cfg.augment:
            x, y = _augment(x, y, gen)
        loss = loss_fn(model(x), y[:, None])
        if not torch.isfinite(loss):
            raise TrainingError(f"segmentation U-Net: non-finite loss at step {it}")
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        loss_v = float(loss.detach())
    model.eval()
    return model, {"final_loss": loss_v, "train_seconds": time.perf_counter() - t0, "n_train_slices": len(train)}


def _augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Small random rotation (±15°), zoom (0.9–1.1), shift (±5 %) and intensity jitter. No flips: a mirror
    image would swap the RV to the wrong side of the LV."""
    n = len(x)
    ang = (torch.rand(n, generator=gen) - 0.5) * (torch.pi / 6)
    zoom = 0.9 + 0.2 * torch.rand(n, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.1
    cos, sin = torch.cos(ang) / zoom, torch.sin(ang) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    y = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    scale = 1.0 + 0.2 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    offset = 0.1 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    return x * scale + offset, y[:, 0].long()


def predict(model: torch.nn.Module, images: np.ndarray, size: int, batch_size: int = 64) -> np.ndarray:
    """Label maps (N, size, size) uint8 for images (N, 1, H, W) resized to size²."""
    x, _ = _resize(images, np.zeros((len(images), *images.shape[2:]), np.uint8), size)
    return _predict_inputs(model, x, batch_size)


def _predict_inputs(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Label maps (N, s, s) uint8 for U-Net inputs ``x`` (N, 1, s, s)."""
    out = []
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            out.append(model(x[s : s + batch_size]).argmax(1).to(torch.uint8).numpy())
    return np.concatenate(out) if out else np.zeros((0, *x.shape[2:]), np.uint8)


# --------------------------------------------------------------------------------------------- metrics


def _case_spacing(meta: pd.DataFrame, slice_hw: tuple[float, float], size: int) -> tuple[tuple[float, ...] | None, str]:
    """(H, W, Z) spacing in mm of the evaluation grid, from the slice ``record`` of
    :mod:`medsynth.data.preprocess` (``target_spacing`` or ``source_spacing``/``zoom``), else ``(None, 'px')``."""
    try:
        rec = json.loads(str(meta["record"].iloc[0]))
        src = rec.get("source_spacing")
        if not src:
            return None, "px"
        if rec.get("target_spacing"):
            sh, sw = (float(v) for v in rec["target_spacing"][:2])
        else:
            zoom = rec.get("zoom", [1.0, 1.0])
            sh, sw = float(src[0]) / float(zoom[0]), float(src[1]) / float(zoom[1])
        # the U-Net grid is the slice grid (or its ROI crop, slice_hw px) resized to size x size
        sh, sw = float(sh * slice_hw[0] / size), float(sw * slice_hw[1] / size)
        sz = float(src[2]) if len(src) > 2 else 1.0
        return (sh, sw, sz), "mm"
    except (KeyError, ValueError, TypeError, IndexError, json.JSONDecodeError):
        return None, "px"


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...] | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance between two boolean masks of one shape (e.g. (H, W, Z)),
    in the units of ``spacing`` (px without it); NaN when either mask is empty.

    The numbers of MONAI's ``HausdorffDistanceMetric(percentile=95)``, computed through MONAI's edge and
    surface-distance functions directly: the metric itself passes the deprecated ``always_return_as_numpy``
    to ``get_mask_edges`` on every call (a FutureWarning in MONAI 1.5–1.6)."""
    from monai.metrics.utils import get_mask_edges, get_surface_distance

    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if not pred.any() or not gt.any():
        return float("nan")
    edges_pred, edges_gt = get_mask_edges(pred, gt, crop=True)
    d_pg = get_surface_distance(edges_pred, edges_gt, "euclidean", spacing)
    d_gp = get_surface_distance(edges_gt, edges_pred, "euclidean", spacing)
    return float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))


def evaluate_cases(
    model: torch.nn.Module, test: SliceSet, cfg: SegmentationConfig, classes: list[int] | None = None
) -> pd.DataFrame:
    """Per-patient 3-D Dice and HD95 per class on the U-Net grid of ``cfg`` (whole slice or heart ROI): one
    row per (case, class)."""
    from monai.metrics import DiceMetric

    size = cfg.image_size
    x, gt_t, boxes = _inputs(test, cfg)
    pred = _predict_inputs(model, x)
    gt = gt_t.numpy().astype(np.uint8)
    classes = classes or [c for c in range(1, N_CLASSES) if (test.labels == c).any()]
    dice_m = DiceMetric(include_background=True, reduction="none", ignore_empty=True)
    rows = []
    meta = test.meta.copy()
    meta["_row"] = np.arange(len(meta))
    for case, grp in meta.groupby("case", sort=True):
        grp = grp.assign(_z=pd.to_numeric(grp["slice_index"], errors="coerce")).sort_values("_z")
        idx = grp["_row"].to_numpy()
        p = np.moveaxis(pred[idx], 0, -1)  # (H, W, Z)
        g = np.moveaxis(gt[idx], 0, -1)
        grid_hw = test.images.shape[2:] if boxes is None else (float(boxes[idx[0], 2]),) * 2
        spacing, unit = _case_spacing(grp, grid_hw, size)
        p1 = torch.stack([torch.from_numpy(p == c) for c in classes])[None].float()
        g1 = torch.stack([torch.from_numpy(g == c) for c in classes])[None].float()
        dice = dice_m(p1, g1)[0].numpy()
        hd = [hd95(p == c, g == c, spacing) for c in classes]
        for k, c in enumerate(classes):
            present = bool(g1[0, k].any())
            pred_any = bool(p1[0, k].any())
            h = float(hd[k]) if present and pred_any and np.isfinite(hd[k]) else float("nan")
            rows.append(
                {
                    "case": str(case),
                    "subject_id": str(grp["subject_id"].iloc[0]),
                    "class": CANONICAL[c],
                    "dice": float(dice[k]) if present else float("nan"),
                    "hd95": h,
                    "hd95_unit": unit,
                }
            )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------- protocol


def run_segmentation_protocol(
    real_train: SliceSet, real_test: SliceSet, synthetic: SliceSet | None, config: SegmentationConfig | None = None
) -> pd.DataFrame:
    """Train every arm × seed and evaluate on ``real_test``; returns the per-case long table.

    Columns: arm, seed, n_real_patients, n_train_slices, case, subject_id, class, dice, hd95, hd95_unit,
    train_seconds. Aggregate with :func:`per_seed_table` and :func:`summarise`.
    """
    cfg = config or SegmentationConfig()
    unknown = set(cfg.arms) - set(ARMS)
    if unknown:
        raise ValueError(f"arms: unknown {sorted(unknown)}; allowed: {', '.join(ARMS)}")
    arms = [a for a in cfg.arms if a == "real" or synthetic is not None]
    if synthetic is None and len(arms) < len(cfg.arms):
        log.info("no synthetic set: running the real-only arm")
    if len(real_test) == 0:
        raise ValueError("real_test: empty test set")
    classes = [c for c in range(1, N_CLASSES) if (real_test.labels == c).any()]
    out = []
    for seed in cfg.seeds:
        real = select_patients(real_train, cfg.n_train_patients, seed)
        n_pat = len(np.unique(_subjects(real)))
        for arm in arms:
            train = build_arm(arm, real, synthetic, cfg.synthetic_ratio, seed)
            model, info = train_unet(train, cfg, seed)
            res = evaluate_cases(model, real_test, cfg, classes)
            res.insert(0, "arm", arm)
            res.insert(1, "seed", seed)
            res.insert(2, "n_real_patients", n_pat if arm != "synthetic" else 0)
            res.insert(3, "n_train_slices", info["n_train_slices"])
            res["train_seconds"] = info["train_seconds"]
            log.info("arm %s seed %d: mean Dice %.3f (%.1fs)", arm, seed, res["dice"].mean(), info["train_seconds"])
            out.append(res)
    return pd.concat(out, ignore_index=True)


#: Wall-clock columns of the per-case table: they differ between identical runs, so they are written apart
#: (``timings.csv``) from the per-case results, which stay byte-identical for one seed and config.
TIMING_COLUMNS: tuple[str, ...] = ("train_seconds",)


def split_timings(per_case: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(per_case without timing columns, timings)``; timings has one row per arm × seed."""
    cols = [c for c in TIMING_COLUMNS if c in per_case.columns]
    keys = [c for c in ("arm", "seed") if c in per_case.columns]
    timings = per_case[keys + cols].drop_duplicates(keys).reset_index(drop=True) if cols else pd.DataFrame()
    return per_case.drop(columns=cols), timings


def per_seed_table(per_case: pd.DataFrame) -> pd.DataFrame:
    """One row per arm × seed × class: mean Dice and HD95 over test patients."""
    g = per_case.groupby(["arm", "seed", "class"], sort=False)
    return g.agg(
        dice=("dice", "mean"),
        hd95=("hd95", "mean"),
        hd95_unit=("hd95_unit", "first"),
        n_cases=("case", "nunique"),
        n_real_patients=("n_real_patients", "first"),
        n_train_slices=("n_train_slices", "first"),
    ).reset_index()


def summarise(per_case: pd.DataFrame, n_bootstrap: int = 1000, ci: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Per arm × class (plus class 'mean' over classes): mean ± std over seeds, and the paired difference
    to the real-only arm (per case, averaged over seeds) with a percentile bootstrap CI over test cases."""
    from medsynth.evaluation.fidelity import bootstrap_mean_ci

    pc = per_case.copy()
    mean_cls = pc.groupby(["arm", "seed", "case"], sort=False)[["dice", "hd95"]].mean().reset_index()
    mean_cls["class"] = "mean"
    pc = pd.concat([pc, mean_cls], ignore_index=True)
    seeds = pc.groupby(["arm", "class", "seed"], sort=False)[["dice", "hd95"]].mean().reset_index()
    rows = []
    for (arm, cls), grp in seeds.groupby(["arm", "class"], sort=False):
        row = {
            "arm": arm,
            "class": cls,
            "n_seeds": len(grp),
            "dice_mean": grp["dice"].mean(),
            "dice_std": grp["dice"].std(ddof=1) if len(grp) > 1 else float("nan"),
            "hd95_mean": grp["hd95"].mean(),
            "hd95_std": grp["hd95"].std(ddof=1) if len(grp) > 1 else float("nan"),
        }
        for metric in ("dice", "hd95"):
            d, lo, hi = float("nan"), float("nan"), float("nan")
            if arm != "real" and "real" in set(pc["arm"]):
                a = pc[(pc["arm"] == arm) & (pc["class"] == cls)].set_index(["seed", "case"])[metric]
                r = pc[(pc["arm"] == "real") & (pc["class"] == cls)].set_index(["seed", "case"])[metric]
                diff = (a - r.reindex(a.index)).groupby(level="case").mean().dropna()
                if len(diff):
                    d, lo, hi = bootstrap_mean_ci(diff.to_numpy(), n_bootstrap, ci, seed)
            row[f"{metric}_diff_vs_real"] = d
            row[f"{metric}_diff_ci_low"] = lo
            row[f"{metric}_diff_ci_high"] = hi
        rows.append(row)
    return pd.DataFrame(rows)
