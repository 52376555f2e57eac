"""Downstream utility of synthetic data: a 2-D MONAI U-Net trained per arm, evaluated per patient in 3-D.

Arms (each run for every seed, with the same iteration budget so they compete on equal compute):

- ``real``: real training slices of n real patients;
- ``real+synthetic``: the same real slices plus ``round(synthetic_ratio × n_real_slices)`` synthetic ones,
  one arm per synthetic set (``real+<set>`` when the sets are named, e.g. one per family);
- ``synthetic``: synthetic slices only (train on synthetic, test on real; ``<set> only`` when named).

Learning curve: the real arms run for every n in ``n_real_patients`` (e.g. ``[2, 4, 6, 12, "all"]``). Per
seed the real training patients are put in one seeded random order (:func:`patient_order`) and n takes the
first n of it, so the subsets are nested (the 2 patients of n=2 are among the 4 of n=4) and patient-level;
a test patient in the training split is an error. The mixing of synthetic slices into a batch is
``mixing``: ``pool`` (real and synthetic slices drawn uniformly from one pool: expected synthetic share
ratio / (1 + ratio)), ``per_batch`` (exactly ``round(synthetic_batch_share × batch_size)`` synthetic
slices in every batch) or ``weighted`` (drawn as ``pool``, but a synthetic slice's loss counts
``synthetic_weight`` times a real one's: the batch loss is the weighted mean Σ wᵢ lᵢ / Σ wᵢ of the per-slice
DiceCE losses). Every arm gets the same standard augmentation (:class:`AugmentationConfig`), so a gain from
synthetic data is more than "any augmentation". The effective ratio, mixing, share, weight and the
augmentation are columns of the per-case table.

Ratio sweep: ``synthetic_ratio`` may be a list (e.g. ``[0.5, 1, 2, 4]``); then every real+synthetic arm runs
once per ratio, named with it (``real+gmm x0.5``, ``real+gmm x1``, …), each paired against real-only at the
same n, so the best ratio is measured (:func:`best_ratios`), not assumed.

A seed fixes the patient order, the synthetic draw, the initialisation and the batches, so arms sharing a
seed and n form a paired comparison. Test slices are grouped into volumes by ``meta['case']`` and ordered by
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
from pydantic import Field, NonNegativeFloat, PositiveInt, field_validator, model_validator

from medsynth.config import KeyProblem, StrictModel
from medsynth.errors import TrainingError
from medsynth.labels import CANONICAL, N_CLASSES
from medsynth.utils.progress import Progress
from medsynth.utils.seeding import exclusive_global_rng, rng, seed_everything

if TYPE_CHECKING:
    from medsynth.data.slices import SliceSet

log = logging.getLogger(__name__)

ARMS = ("real", "real+synthetic", "synthetic")

#: Learning-curve points: positive numbers of real training patients, or "all".
NRealPatients = list[PositiveInt | Literal["all"]]


def check_n_real_patients(v: list) -> list:
    """Non-empty, no repeats (shared by :class:`SegmentationConfig` and the run config's stage)."""
    if not v:
        raise ValueError("n_real_patients: give at least one number of real patients (or 'all')")
    if len(set(v)) != len(v):
        raise ValueError(f"n_real_patients: repeated entries in {v}")
    return v


class AugmentationConfig(StrictModel):
    """Standard augmentation of every arm's training batches (real and synthetic slices alike), so a gain from
    synthetic data is measured on top of it. Each slice of a batch gets its own random draw."""

    rotate_deg: float = Field(15.0, ge=0, le=180)  # uniform in ± rotate_deg
    zoom: float = Field(0.1, ge=0, lt=0.5)  # scale uniform in 1 ± zoom
    shift: float = Field(0.05, ge=0, le=0.5)  # uniform in ± shift, in normalised [-1, 1] image coordinates
    intensity_scale: float = Field(0.1, ge=0, lt=1)  # intensity × (1 ± intensity_scale)
    intensity_offset: float = Field(0.05, ge=0, le=1)  # intensity + (± intensity_offset), normalised units
    #: left-right mirror with probability 0.5. Off by default: a mirrored short-axis slice puts the RV on the
    #: wrong side of the LV, an anatomy no test patient has.
    flip: bool = False


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
    #: synthetic slices per real slice in the real+synthetic arms; a list is a sweep (one arm per ratio)
    synthetic_ratio: NonNegativeFloat | list[NonNegativeFloat] = 1.0
    #: ``pool``: one pool, uniform draws; ``per_batch``: a fixed synthetic share of every batch;
    #: ``weighted``: uniform draws, a synthetic slice's loss weighted by ``synthetic_weight``
    mixing: Literal["pool", "per_batch", "weighted"] = "pool"
    synthetic_batch_share: float = Field(0.5, ge=0, le=1)  # per_batch only
    #: weighted only: loss weight of a synthetic slice relative to a real one (1 = the same as pool)
    synthetic_weight: float = Field(1.0, gt=0)
    #: one learning-curve point (kept for the CLI and the translation evaluation); ``n_real_patients`` wins
    n_train_patients: PositiveInt | None = None
    #: learning curve: numbers of real training patients (``"all"`` = the whole training split)
    n_real_patients: NRealPatients | None = None
    num_threads: int = 1
    n_bootstrap: int = 1000
    ci: float = 0.95
    augment: bool = True  # apply ``augmentation`` in every arm
    augmentation: AugmentationConfig = AugmentationConfig()
    #: ``"heart"``: train and test on square crops around each case's reference heart labels (see
    #: :func:`roi_boxes`), as a two-stage pipeline with a perfect first stage would; small structures (scar)
    #: then get several times more U-Net pixels. ``"none"``: the whole slice.
    roi: Literal["none", "heart"] = "none"
    roi_margin: float = Field(0.3, ge=0.0, le=2.0)  # added on each side, as a fraction of the box side
    progress: bool = True  # a tqdm bar (main thread, terminal) or progress log lines (worker threads / processes)
    #: CLI only: seeded patient-level test fraction when the manifest has no split.
    test_fraction: float = 0.3
    split_seed: int = 0

    @field_validator("n_real_patients")
    @classmethod
    def _check_curve(cls, v: list | None) -> list | None:
        return v if v is None else check_n_real_patients(v)

    @field_validator("synthetic_ratio")
    @classmethod
    def _check_ratios(cls, v: float | list[float]) -> float | list[float]:
        if isinstance(v, list):
            if not v:
                raise ValueError("synthetic_ratio: give a number or a non-empty list of numbers (a sweep)")
            if len(set(v)) != len(v):
                raise ValueError(f"synthetic_ratio: repeated entries in {v}")
        return v

    @model_validator(mode="after")
    def _weight_needs_weighted(self) -> SegmentationConfig:
        # a weight that the mixing ignores would be recorded but never applied
        if self.synthetic_weight != 1.0 and self.mixing != "weighted":
            raise KeyProblem(
                "synthetic_weight",
                f"{self.synthetic_weight:g} only applies with mixing: weighted (mixing is {self.mixing!r})",
            )
        return self

    def ratios(self) -> list[float]:
        """The synthetic:real ratios of the real+synthetic arms (one entry unless ``synthetic_ratio`` is a sweep)."""
        r = self.synthetic_ratio
        return [float(x) for x in r] if isinstance(r, list) else [float(r)]

    @property
    def sweep(self) -> bool:
        """Several ratios: the real+synthetic arm names carry their ratio."""
        return len(self.ratios()) > 1

    def curve(self) -> list[int | str]:
        """The learning-curve points: ``n_real_patients``, else ``[n_train_patients or "all"]``."""
        if self.n_real_patients is not None:
            return list(self.n_real_patients)
        return [self.n_train_patients if self.n_train_patients is not None else "all"]

    def synthetic_share(self, ratio: float | None = None) -> float:
        """Expected fraction of synthetic slices in a real+synthetic batch at ``ratio`` (default: the first)."""
        ratio = self.ratios()[0] if ratio is None else float(ratio)
        if ratio <= 0:
            return 0.0
        if self.mixing == "per_batch":
            return round(self.synthetic_batch_share * self.batch_size) / self.batch_size
        return ratio / (1.0 + ratio)

    def effective_weight(self) -> float:
        """Loss weight of a synthetic slice relative to a real one (1 unless ``mixing`` is ``weighted``)."""
        return float(self.synthetic_weight) if self.mixing == "weighted" else 1.0


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


def patient_order(real_train: SliceSet, seed: int) -> np.ndarray:
    """The training patients (sorted ids) in one random order fixed by ``seed``: n patients are its first n,
    so the learning-curve subsets of one seed are nested."""
    return rng(seed).permutation(np.unique(_subjects(real_train)))


def resolve_n(n: int | str | None, n_available: int) -> int:
    """A learning-curve point as a number of patients: ``"all"``/None → ``n_available``; more than
    ``n_available`` is an error (the curve would silently train on fewer patients than it says)."""
    if n is None or n == "all":
        return n_available
    n = int(n)
    if n <= 0:
        raise ValueError(f"n_real_patients: must be positive, got {n}")
    if n > n_available:
        raise ValueError(f"n_real_patients: {n} real patients asked for, the training split has {n_available}")
    return n


def select_patients(real_train: SliceSet, n: int | str | None, seed: int) -> SliceSet:
    """Slices of the first ``n`` patients of :func:`patient_order` (all when ``n`` is None or "all")."""
    order = patient_order(real_train, seed)
    k = resolve_n(n, len(order))
    if k == len(order):
        return real_train
    return real_train.subset(np.isin(_subjects(real_train), order[:k]))


def _tag(s: SliceSet, origin: str) -> SliceSet:
    from medsynth.data.slices import SliceSet

    return SliceSet(s.images, s.labels, s.meta.assign(origin=origin))


def build_arm(arm: str, real: SliceSet, synthetic: SliceSet | None, ratio: float, seed: int) -> SliceSet:
    """Training set of ``arm`` (a kind of :data:`ARMS`) from the already selected real slices and the synthetic
    pool; ``meta['origin']`` says which slices are ``real`` and which ``synthetic``."""
    from medsynth.data.slices import SliceSet

    if arm == "real":
        return _tag(real, "real")
    if synthetic is None or len(synthetic) == 0:
        raise ValueError(f"arms: arm {arm!r} needs a synthetic set")
    if arm == "synthetic":
        return _tag(synthetic, "synthetic")
    if arm == "real+synthetic":
        n = int(round(ratio * len(real)))
        if n <= 0:
            return _tag(real, "real")
        idx = rng(seed + 7919).choice(len(synthetic), n, replace=n > len(synthetic))
        syn = synthetic.subset(np.sort(idx))
        return SliceSet.concat([_tag(real, "real"), _tag(syn, "synthetic")])
    raise ValueError(f"arms: unknown arm {arm!r}; allowed: {', '.join(ARMS)}")


def real_patients(train: SliceSet) -> list[str]:
    """Sorted ids of the real patients in a training set of :func:`build_arm` (what the U-Net sees)."""
    meta = train.meta
    real = meta if "origin" not in meta else meta[meta["origin"] == "real"]
    return sorted(real["subject_id"].astype(str).unique())


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
def train_unet(train: SliceSet, cfg: SegmentationConfig, seed: int, name: str = "") -> tuple[torch.nn.Module, dict]:
    """Train the U-Net on ``train`` for ``cfg.iterations`` batches (DiceCE loss, Adam, cosine LR).

    Uses ``cfg.num_threads`` torch threads during training (restored afterwards): on a busy 2-core machine
    1 thread is often several times faster than 2. ``name`` labels the log lines and the progress bar (arm,
    n and seed in the protocol). After the first steps one line announces the expected length; progress is a
    tqdm bar only in the main thread on a terminal, else (the worker threads of a task runner, where several
    seeds run side by side) whole log lines naming the training (:class:`medsynth.utils.progress.Progress`).
    """
    if len(train) == 0:
        raise ValueError("train: empty training set")
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.num_threads))
    try:
        return _train(train, cfg, seed, name or f"seed {seed}", show_bar=cfg.progress)
    finally:
        torch.set_num_threads(prev_threads)


def _batch_indices(origin: np.ndarray | None, cfg: SegmentationConfig, gen: torch.Generator) -> torch.Tensor:
    """Row indices of one batch: uniform over the pool, or (``per_batch``) a fixed synthetic share."""
    n = len(origin) if origin is not None else 0
    b = min(cfg.batch_size, n)
    if cfg.mixing == "per_batch" and origin is not None:
        syn, real = np.flatnonzero(origin == "synthetic"), np.flatnonzero(origin != "synthetic")
        if len(syn) and len(real):
            k = int(round(cfg.synthetic_batch_share * cfg.batch_size))
            k = min(max(k, 0), cfg.batch_size)
            i_s = torch.from_numpy(syn)[torch.randint(0, len(syn), (k,), generator=gen)]
            i_r = torch.from_numpy(real)[torch.randint(0, len(real), (cfg.batch_size - k,), generator=gen)]
            return torch.cat([i_r, i_s])
    return torch.randint(0, n, (b,), generator=gen)


def _train(
    train: SliceSet, cfg: SegmentationConfig, seed: int, name: str, show_bar: bool
) -> tuple[torch.nn.Module, dict]:
    from monai.losses import DiceCELoss

    gen = seed_everything(seed)
    x_all, y_all, _ = _inputs(train, cfg)
    origin = train.meta["origin"].astype(str).to_numpy() if "origin" in train.meta else np.full(len(train), "real")
    model = make_unet(cfg)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    weighted = cfg.mixing == "weighted"
    syn_mask = torch.from_numpy(origin == "synthetic")
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.iterations)
    model.train()
    log.info(
        "U-Net %s: %d steps, batch %d, %d training slices (%d synthetic, mixing %s)",
        name, cfg.iterations, cfg.batch_size, len(train), int((origin == "synthetic").sum()), cfg.mixing,
    )  # fmt: skip
    t0 = time.perf_counter()
    loss_v = float("nan")
    n_syn = n_seen = 0
    what = f"{cfg.iterations} steps × batch {cfg.batch_size} on cpu"
    with Progress(cfg.iterations, f"U-Net {name}", what, enabled=show_bar, logger=log) as progress:
        for it in range(cfg.iterations):
            idx = _batch_indices(origin, cfg, gen)
            n_syn += int((origin[idx.numpy()] == "synthetic").sum())
            n_seen += len(idx)
            x, y = x_all[idx], y_all[idx]
            if cfg.augment:
                x, y = _augment(x, y, gen, cfg.augmentation)
            if weighted:
                loss = weighted_loss(model(x), y, sample_weights(syn_mask[idx], cfg.synthetic_weight))
            else:
                loss = loss_fn(model(x), y[:, None])
            if not torch.isfinite(loss):
                raise TrainingError(f"segmentation U-Net: non-finite loss at step {it}")
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            loss_v = float(loss.detach())
            progress.update({"loss": loss_v})
    model.eval()
    seconds = time.perf_counter() - t0
    log.info("U-Net %s: done in %.1f s, final loss %.3f", name, seconds, loss_v)
    return model, {
        "final_loss": loss_v,
        "train_seconds": seconds,
        "n_train_slices": len(train),
        "n_synthetic_slices": int((origin == "synthetic").sum()),
        "synthetic_batch_fraction": n_syn / n_seen if n_seen else 0.0,
        "real_patients": real_patients(train),
    }


def sample_weights(synthetic: torch.Tensor, synthetic_weight: float) -> torch.Tensor:
    """Per-slice loss weights (B,) float32: ``synthetic_weight`` where ``synthetic`` (B,) bool is true, else 1."""
    return torch.where(synthetic, torch.tensor(float(synthetic_weight)), torch.tensor(1.0)).float()


def per_sample_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DiceCE loss of every slice (B,): soft Dice loss averaged over classes (background included) plus the
    pixel-mean cross-entropy, for logits (B, C, s, s) and integer targets (B, s, s). Its mean over the batch is
    MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)`` of the batch."""
    from monai.losses import DiceLoss

    dice = DiceLoss(to_onehot_y=True, softmax=True, reduction="none")(logits, target[:, None])
    ce = F.cross_entropy(logits, target, reduction="none")
    return dice.flatten(1).mean(1) + ce.flatten(1).mean(1)


def weighted_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean Σ wᵢ lᵢ / Σ wᵢ of :func:`per_sample_loss` with weights (B,) (``mixing: weighted``)."""
    losses = per_sample_loss(logits, target)
    w = weights.to(losses.dtype)
    return (w * losses).sum() / w.sum()


def _augment(
    x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, aug: AugmentationConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rotation, zoom, shift and intensity jitter (and, when ``aug.flip``, a left-right mirror) of a
    batch x (N, 1, s, s), y (N, s, s); ranges in :class:`AugmentationConfig`."""
    aug = aug or AugmentationConfig()
    n = len(x)
    ang = (torch.rand(n, generator=gen) - 0.5) * (2 * aug.rotate_deg * torch.pi / 180)
    zoom = (1 - aug.zoom) + 2 * aug.zoom * torch.rand(n, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * (2 * aug.shift)
    cos, sin = torch.cos(ang) / zoom, torch.sin(ang) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    if aug.flip:
        mirror = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
        theta[:, :, 0] = theta[:, :, 0] * mirror[:, None]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    y = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    scale = 1.0 + 2 * aug.intensity_scale * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    offset = 2 * aug.intensity_offset * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
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


def ratio_sweep(params: dict) -> list[float]:
    """The ratios of a sweep in segmentation ``params`` (a run config's ``evaluation.segmentation.params``);
    empty when ``synthetic_ratio`` is one number (no sweep: the arms keep their plain names)."""
    cfg = SegmentationConfig(**params)
    return cfg.ratios() if cfg.sweep else []


def ratio_label(ratio: float) -> str:
    """A ratio as it appears in arm names: ``x0.5``, ``x1``, ``x2``."""
    return f"x{float(ratio):g}"


def arm_plan(
    kinds: list[str], set_names: list[str], ratios: list[float] | None = None
) -> list[tuple[str, str, str, float]]:
    """``(arm name, kind, synthetic set, ratio)`` per arm: ``real``; per set ``real+<set>`` and ``<set> only``
    (a single unnamed set, called ``synthetic``, keeps the kind names ``real+synthetic`` and ``synthetic``).

    With several ``ratios`` (a sweep) each set has one real+synthetic arm per ratio, named with it
    (``real+gmm x2``); the ratio of the other arms is NaN (all synthetic slices, or none)."""
    unknown = set(kinds) - set(ARMS)
    if unknown:
        raise ValueError(f"arms: unknown {sorted(unknown)}; allowed: {', '.join(ARMS)}")
    ratios = list(ratios) if ratios else [1.0]
    nan = float("nan")
    plan = []
    for kind in kinds:
        if kind == "real":
            plan.append(("real", "real", "", nan))
            continue
        for name in set_names:
            if kind == "real+synthetic":
                for r in ratios:
                    suffix = f" {ratio_label(r)}" if len(ratios) > 1 else ""
                    plan.append((f"real+{name}{suffix}", kind, name, float(r)))
            else:
                plan.append((name if name == "synthetic" else f"{name} only", kind, name, nan))
    return plan


def run_segmentation_protocol(
    real_train: SliceSet,
    real_test: SliceSet,
    synthetic: SliceSet | dict[str, SliceSet] | None,
    config: SegmentationConfig | None = None,
    only_ratios: list[float] | None = None,
) -> pd.DataFrame:
    """Train every arm × learning-curve point × seed and evaluate on ``real_test``; the per-case long table.

    ``synthetic``: one set, or named sets (e.g. one per family: each gets its own ``real+<name>`` and
    ``<name> only`` arm). The real arms run for every n of ``config.curve()``; the synthetic-only arms once per
    seed (``n_real_patients`` 0). With a ratio sweep (``synthetic_ratio`` a list) every real+synthetic arm runs
    once per ratio (:func:`arm_plan`); ``only_ratios`` restricts those arms to some of the ratios (a flow task
    trains one of them; the arm names still say the ratio). Columns: arm, arm_kind, synthetic_set, seed,
    n_real_patients, n_train_slices, n_synthetic_slices, synthetic_ratio, mixing, synthetic_weight (loss weight
    of a synthetic slice; 1 unless mixing is weighted), synthetic_batch_fraction (measured share of synthetic
    slices over all batches), augmentation (JSON), train_patients (``;``-joined ids of the real patients
    trained on), case, subject_id, class, dice, hd95, hd95_unit, train_seconds. Aggregate with
    :func:`per_seed_table` and :func:`summarise`.
    """
    cfg = config or SegmentationConfig()
    named = synthetic if isinstance(synthetic, dict) else {"synthetic": synthetic}
    sets = {k: v for k, v in named.items() if v is not None and len(v)}
    plan = arm_plan(cfg.arms, sorted(sets), cfg.ratios())
    if only_ratios is not None:
        unknown = {float(r) for r in only_ratios} - set(cfg.ratios())
        if unknown:
            raise ValueError(f"synthetic_ratio: {sorted(unknown)} not among the configured ratios {cfg.ratios()}")
        keep = {float(r) for r in only_ratios}
        plan = [p for p in plan if p[1] != "real+synthetic" or p[3] in keep]
    if not sets and any(kind != "real" for kind in cfg.arms):
        log.info("no synthetic set: running the real-only arm")
    if len(real_test) == 0:
        raise ValueError("real_test: empty test set")
    leaked = set(_subjects(real_train)) & set(_subjects(real_test))
    if leaked:
        raise ValueError(f"real_test: test patients also in the training split: {sorted(leaked)[:5]}")
    classes = [c for c in range(1, N_CLASSES) if (real_test.labels == c).any()]
    n_available = len(np.unique(_subjects(real_train)))
    curve = sorted({resolve_n(n, n_available) for n in cfg.curve()})
    aug_json = json.dumps(cfg.augmentation.model_dump() if cfg.augment else None, sort_keys=True)
    out = []

    def run(arm: str, kind: str, set_name: str, ratio: float, seed: int, real: SliceSet | None) -> None:
        train = build_arm(kind, real, sets.get(set_name), ratio, seed)
        model, info = train_unet(train, cfg, seed, name=f"{arm} n={len(real_patients(train))} seed {seed}")
        if set(info["real_patients"]) & set(_subjects(real_test)):
            raise RuntimeError("a test patient reached the training set")  # guarded above; never expected
        res = evaluate_cases(model, real_test, cfg, classes)
        cols = {
            "arm": arm,
            "arm_kind": kind,
            "synthetic_set": set_name,
            "seed": seed,
            "n_real_patients": len(info["real_patients"]),
            "n_train_slices": info["n_train_slices"],
            "n_synthetic_slices": info["n_synthetic_slices"],
            "synthetic_ratio": ratio if kind == "real+synthetic" else float("nan"),
            "mixing": cfg.mixing if kind == "real+synthetic" else "",
            "synthetic_weight": cfg.effective_weight() if kind == "real+synthetic" else float("nan"),
            "synthetic_batch_fraction": info["synthetic_batch_fraction"],
            "augmentation": aug_json,
            "train_patients": ";".join(info["real_patients"]),
        }
        for i, (k, v) in enumerate(cols.items()):
            res.insert(i, k, v)
        res["train_seconds"] = info["train_seconds"]
        log.info("arm %s n=%d seed %d: mean Dice %.3f", arm, cols["n_real_patients"], seed, res["dice"].mean())
        out.append(res)

    for seed in cfg.seeds:
        for n in curve:
            real = select_patients(real_train, n, seed)
            for arm, kind, set_name, ratio in plan:
                if kind != "synthetic":
                    run(arm, kind, set_name, ratio, seed, real)
        for arm, kind, set_name, ratio in plan:
            if kind == "synthetic":
                run(arm, kind, set_name, ratio, seed, None)
    return pd.concat(out, ignore_index=True)


#: Wall-clock columns of the per-case table: they differ between identical runs, so they are written apart
#: (``timings.csv``) from the per-case results, which stay byte-identical for one seed and config.
TIMING_COLUMNS: tuple[str, ...] = ("train_seconds",)


def split_timings(per_case: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(per_case without timing columns, timings)``; timings has one row per arm × n × seed."""
    cols = [c for c in TIMING_COLUMNS if c in per_case.columns]
    keys = [c for c in ("arm", "n_real_patients", "seed") if c in per_case.columns]
    timings = per_case[keys + cols].drop_duplicates(keys).reset_index(drop=True) if cols else pd.DataFrame()
    return per_case.drop(columns=cols), timings


def per_seed_table(per_case: pd.DataFrame) -> pd.DataFrame:
    """One row per arm × n real patients × seed × class: mean Dice and HD95 over test patients."""
    g = per_case.groupby(["arm", "n_real_patients", "seed", "class"], sort=False)
    return g.agg(
        dice=("dice", "mean"),
        hd95=("hd95", "mean"),
        hd95_unit=("hd95_unit", "first"),
        n_cases=("case", "nunique"),
        n_train_slices=("n_train_slices", "first"),
    ).reset_index()


def reference_n(arm_n: int, real_ns: list[int]) -> int | None:
    """The real-only curve point an arm is paired with: the same n, or (synthetic-only, n = 0) the largest."""
    if arm_n in real_ns:
        return arm_n
    return max(real_ns) if arm_n == 0 and real_ns else None


def paired_difference(a: pd.Series, r: pd.Series) -> pd.Series:
    """Per test case: the arm's metric minus the reference's, paired by (seed, case), averaged over seeds.
    ``a`` and ``r`` are indexed by (seed, case); cases missing on either side drop out."""
    diff = a - r.reindex(a.index)
    return diff.groupby(level="case").mean().dropna()


def summarise(per_case: pd.DataFrame, n_bootstrap: int = 1000, ci: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Per arm × n real patients × class (plus class 'mean' over classes): mean ± std over seeds, a bootstrap
    CI over test cases of the (seed-averaged) mean, and the paired difference to the real-only arm at the same
    n (:func:`reference_n`; per case, averaged over seeds) with a percentile bootstrap CI over test cases.
    ``reference_n`` names the real-only point each difference is against (empty for the real arm);
    ``synthetic_set`` and ``synthetic_ratio`` (when the per-case table has them) say which set and ratio an
    arm trained with (empty / NaN for real-only and synthetic-only), for :func:`best_ratios`."""
    from medsynth.evaluation.fidelity import bootstrap_mean_ci

    pc = per_case.copy()
    if "n_real_patients" not in pc:
        pc["n_real_patients"] = 0
    keys = ["arm", "n_real_patients", "seed", "case"]
    # which synthetic set and ratio each arm trained with (one per arm; the class-mean rows do not carry them)
    arm_keys: dict[str, dict] = {}
    for key, missing in (("synthetic_set", ""), ("synthetic_ratio", float("nan"))):
        if key in pc:
            for arm, vals in pc.groupby("arm", sort=False)[key]:
                vals = vals.dropna()
                arm_keys.setdefault(arm, {})[key] = vals.iloc[0] if len(vals) else missing
    mean_cls = pc.groupby(keys, sort=False)[["dice", "hd95"]].mean().reset_index()
    mean_cls["class"] = "mean"
    pc = pd.concat([pc, mean_cls], ignore_index=True)
    seeds = pc.groupby(["arm", "n_real_patients", "class", "seed"], sort=False)[["dice", "hd95"]].mean().reset_index()
    real_ns = sorted(int(n) for n in pc.loc[pc["arm"] == "real", "n_real_patients"].unique())
    rows = []
    for (arm, n, cls), grp in seeds.groupby(["arm", "n_real_patients", "class"], sort=False):
        cell = pc[(pc["arm"] == arm) & (pc["n_real_patients"] == n) & (pc["class"] == cls)]
        row = {
            "arm": arm,
            "n_real_patients": int(n),
            "class": cls,
            "n_seeds": len(grp),
            "dice_mean": grp["dice"].mean(),
            "dice_std": grp["dice"].std(ddof=1) if len(grp) > 1 else float("nan"),
            "hd95_mean": grp["hd95"].mean(),
            "hd95_std": grp["hd95"].std(ddof=1) if len(grp) > 1 else float("nan"),
        }
        per_case_dice = cell.groupby("case")["dice"].mean().dropna().to_numpy()
        _, row["dice_ci_low"], row["dice_ci_high"] = (
            bootstrap_mean_ci(per_case_dice, n_bootstrap, ci, seed) if len(per_case_dice) else (0, np.nan, np.nan)
        )
        row.update(arm_keys.get(arm, {}))
        ref = reference_n(int(n), real_ns) if arm != "real" else None
        row["reference_n"] = ref if ref is not None else pd.NA
        for metric in ("dice", "hd95"):
            d, lo, hi = float("nan"), float("nan"), float("nan")
            if ref is not None:
                a = cell.set_index(["seed", "case"])[metric]
                r = pc[(pc["arm"] == "real") & (pc["n_real_patients"] == ref) & (pc["class"] == cls)]
                diff = paired_difference(a, r.set_index(["seed", "case"])[metric])
                if len(diff):
                    d, lo, hi = bootstrap_mean_ci(diff.to_numpy(), n_bootstrap, ci, seed)
            row[f"{metric}_diff_vs_real"] = d
            row[f"{metric}_diff_ci_low"] = lo
            row[f"{metric}_diff_ci_high"] = hi
        rows.append(row)
    return pd.DataFrame(rows)


def reach_statements(summary: pd.DataFrame) -> list[dict]:
    """The "X % of the real patients + synthetic reaches Y % of the all-real Dice" figures, from the curve.

    For every non-reference arm and real-curve point n below the largest: ``x_pct`` = n / n_all × 100,
    ``y_pct`` = arm mean Dice at n / real-only mean Dice at n_all × 100, and the same ratio for real-only at n
    (``real_y_pct``), so the words can say what the synthetic data added. Class ``mean`` rows only."""
    m = summary[summary["class"] == "mean"]
    real = m[m["arm"] == "real"].set_index("n_real_patients")["dice_mean"]
    if real.empty:
        return []
    n_all = int(real.index.max())
    ref = float(real.loc[n_all])
    out = []
    for arm, grp in m[m["arm"] != "real"].groupby("arm", sort=False):
        for _, row in grp.sort_values("n_real_patients").iterrows():
            n = int(row["n_real_patients"])
            if n >= n_all or not np.isfinite(ref) or ref <= 0:
                continue
            out.append(
                {
                    "arm": arm,
                    "n_real_patients": n,
                    "n_all": n_all,
                    "x_pct": 100.0 * n / n_all,
                    "y_pct": 100.0 * float(row["dice_mean"]) / ref,
                    "real_y_pct": 100.0 * float(real.get(n, np.nan)) / ref if n in real.index else float("nan"),
                }
            )
    return out


def best_ratios(summary: pd.DataFrame) -> pd.DataFrame:
    """The measured best synthetic ratio per synthetic set and learning-curve point (class ``mean``).

    Only where a set has real+synthetic arms at two or more ratios at that n (a sweep). One row per (set, n):
    ``best_arm`` / ``best_ratio`` (the highest mean Dice), its paired difference to real-only (``dice_diff``
    with ``dice_diff_ci_low`` / ``high``, fractions), ``overlapping`` (``;``-joined ratios whose Δ-Dice CI
    overlaps the best one's: the data do not tell those apart from the best) and ``ratios`` (all measured)."""
    cols = ["synthetic_set", "n_real_patients", "best_arm", "best_ratio", "dice_mean", "dice_diff",
            "dice_diff_ci_low", "dice_diff_ci_high", "overlapping", "ratios"]  # fmt: skip
    if "synthetic_ratio" not in summary or "synthetic_set" not in summary:
        return pd.DataFrame(columns=cols)
    m = summary[(summary["class"] == "mean") & summary["synthetic_ratio"].notna() & (summary["arm"] != "real")]
    rows = []
    for (set_name, n), g in m.groupby(["synthetic_set", "n_real_patients"], sort=True):
        if g["synthetic_ratio"].nunique() < 2:
            continue
        g = g.sort_values("synthetic_ratio")
        best = g.loc[g["dice_mean"].idxmax()]
        lo, hi = best["dice_diff_ci_low"], best["dice_diff_ci_high"]
        overlapping = [
            f"{r['synthetic_ratio']:g}"
            for _, r in g.iterrows()
            if r["arm"] != best["arm"] and pd.notna(lo) and r["dice_diff_ci_low"] <= hi and lo <= r["dice_diff_ci_high"]
        ]
        rows.append(
            {
                "synthetic_set": set_name,
                "n_real_patients": int(n),
                "best_arm": best["arm"],
                "best_ratio": float(best["synthetic_ratio"]),
                "dice_mean": float(best["dice_mean"]),
                "dice_diff": float(best["dice_diff_vs_real"]),
                "dice_diff_ci_low": float(lo),
                "dice_diff_ci_high": float(hi),
                "overlapping": ";".join(overlapping),
                "ratios": ";".join(f"{r:g}" for r in g["synthetic_ratio"]),
            }
        )
    return pd.DataFrame(rows, columns=cols)
