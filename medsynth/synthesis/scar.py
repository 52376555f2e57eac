"""Myocardial scar (LGE) model: shape fitted from labels, intensity relative to remote myocardium and blood
pool, insertion into healthy myocardium and scar-free counterparts.

Geometry of one short-axis slice (arrays (H, W)): the LV wall is MYO ∪ SCAR ∪ MVO; every wall pixel gets a
polar angle ``theta`` about the LV blood-pool centroid (radians, 0 = image +x, counter-clockwise with image
up) and a ``depth`` in [0, 1] (0 endocardium, 1 epicardium) from two distance transforms. Infarcts grow as a
wavefront from the endocardium, so a scar is a set of wall pixels inside an angular territory whose depth is
below a transmurality profile T(theta); MVO is the scar's sub-endocardial core.

Fitted distributions (from EMIDEC-style labels, one record per scarred slice): territory centre angle (coronary
territories: the empirical angle distribution, summarised per 60° AHA mid-ventricular sector in the report),
angular extent, mean transmurality, MVO fraction of the scar; and intensity contrasts ``t = (mean_tissue -
mean_remote) / (mean_blood - mean_remote)`` and log SD ratios for scar and MVO. Sampling bootstraps a record
and jitters it, which keeps the joint size–transmurality–territory structure. Angles assume the usual
short-axis display orientation (EMIDEC has no RV label to anchor the AHA segments) — a documented limitation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medsynth.labels import LV, MVO, MYO, MYOCARDIAL_WALL, SCAR

#: Columns of the fitted shape records.
SHAPE_FIELDS = ("center", "extent", "transmurality", "mvo_fraction")
#: Columns of the fitted intensity records.
INTENSITY_FIELDS = ("t_scar", "r_scar", "t_mvo", "r_mvo")
_N_BINS = 72


def wall_coordinates(label: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(theta, depth, wall)`` for an (H, W) canonical label map; ``theta``/``depth`` are NaN off the wall."""
    wall = np.isin(label, MYOCARDIAL_WALL)
    lv = label == LV
    ref = lv if lv.any() else wall
    if not ref.any():
        nan = np.full(label.shape, np.nan)
        return nan, nan.copy(), wall
    cy, cx = ndimage.center_of_mass(ref)
    yy, xx = np.indices(label.shape)
    theta = np.arctan2(-(yy - cy), xx - cx)
    d_endo = ndimage.distance_transform_edt(~lv) if lv.any() else np.hypot(yy - cy, xx - cx)
    d_epi = ndimage.distance_transform_edt(wall | lv)
    depth = np.clip(d_endo - 0.5, 0, None) / np.maximum(np.clip(d_endo - 0.5, 0, None) + d_epi - 0.5, 1e-6)
    depth = np.clip(depth, 0.0, 1.0)
    theta = np.where(wall, theta, np.nan)
    depth = np.where(wall, depth, np.nan)
    return theta, depth, wall


def _wrap(a: np.ndarray) -> np.ndarray:
    return (a + np.pi) % (2 * np.pi) - np.pi


def robust_stats(x: np.ndarray) -> tuple[float, float]:
    """Median and MAD-based SD (floored) of a 1-D sample."""
    med = float(np.median(x))
    mad = float(np.median(np.abs(x - med))) * 1.4826
    return med, max(mad, 1e-3)


def slice_scar_record(image: np.ndarray | None, label: np.ndarray) -> tuple[list[float], list[float] | None] | None:
    """Shape (and, with ``image``, intensity) record of one scarred slice; ``None`` without scar or LV."""
    infarct = np.isin(label, (SCAR, MVO))
    if not infarct.any() or not (label == LV).any():
        return None
    theta, depth, _ = wall_coordinates(label)
    th = theta[infarct]
    center = float(np.arctan2(np.sin(th).mean(), np.cos(th).mean()))
    bins = np.floor((_wrap(th - center) + np.pi) / (2 * np.pi) * _N_BINS).astype(int).clip(0, _N_BINS - 1)
    occupied = np.unique(bins)
    extent = float(len(occupied) / _N_BINS * 2 * np.pi)
    max_depth = np.array([depth[infarct][bins == b].max() for b in occupied])
    transmurality = float(np.clip(max_depth.mean(), 0.05, 1.0))
    mvo_fraction = float((label == MVO).sum() / infarct.sum())
    shape = [center, extent, transmurality, mvo_fraction]
    if image is None or not (label == MYO).any():
        return shape, None
    remote_mu, remote_sd = robust_stats(image[label == MYO])
    blood_mu = float(np.median(image[label == LV]))
    contrast = blood_mu - remote_mu
    if contrast < 2.0 * remote_sd:  # blood not clearly brighter than remote: t would be ill-conditioned
        return shape, None
    inten = [np.nan, np.nan, np.nan, np.nan]
    for k, code in enumerate((SCAR, MVO)):
        if (label == code).sum() >= 3:
            mu, sd = robust_stats(image[label == code])
            inten[2 * k] = (mu - remote_mu) / contrast
            inten[2 * k + 1] = float(np.log(sd / remote_sd))
    return shape, inten


@dataclass
class ScarParams:
    """One sampled scar: centre angle and extent (rad), transmurality in (0, 1], MVO fraction of the scar,
    intensity contrasts ``t_scar``/``t_mvo`` and log SD ratios, and a seed for the boundary roughness."""

    center: float
    extent: float
    transmurality: float
    mvo_fraction: float
    t_scar: float
    r_scar: float
    t_mvo: float
    r_mvo: float
    seed: int


class ScarModel:
    """Empirical scar shape + intensity model. ``shapes`` (K, 4) :data:`SHAPE_FIELDS`; ``intensities`` (L, 4)
    :data:`INTENSITY_FIELDS` (NaN where the slice had no such tissue)."""

    def __init__(self, shapes: np.ndarray, intensities: np.ndarray) -> None:
        shapes = np.asarray(shapes, dtype=np.float64).reshape(-1, len(SHAPE_FIELDS))
        intensities = np.asarray(intensities, dtype=np.float64).reshape(-1, len(INTENSITY_FIELDS))
        if len(shapes) == 0:
            raise ValueError("shapes: the scar model needs at least one scarred slice")
        if len(intensities) == 0 or np.all(np.isnan(intensities[:, 0])):
            raise ValueError("intensities: the scar model needs at least one slice with scar intensity")
        self.shapes = shapes
        self.intensities = intensities

    @classmethod
    def fit(cls, images: np.ndarray | None, labels: np.ndarray) -> ScarModel:
        """Fit from (N, H, W) labels and optional (N, H, W) or (N, 1, H, W) images."""
        labels = np.asarray(labels)
        imgs = None if images is None else np.asarray(images).reshape(labels.shape)
        shapes, inten = [], []
        for i in range(labels.shape[0]):
            rec = slice_scar_record(None if imgs is None else imgs[i], labels[i])
            if rec is None:
                continue
            shapes.append(rec[0])
            if rec[1] is not None:
                inten.append(rec[1])
        return cls(np.array(shapes), np.array(inten))

    def summary(self) -> dict[str, object]:
        """Fitted distributions in words and numbers (for fit reports)."""
        sector = np.floor(((self.shapes[:, 0] + 2 * np.pi) % (2 * np.pi)) / (np.pi / 3)).astype(int)
        i = self.intensities

        def stat(col: np.ndarray) -> list[float]:
            col = col[np.isfinite(col)]
            return [float(np.mean(col)), float(np.std(col))] if col.size else [float("nan")] * 2

        return {
            "n_scar_slices": int(len(self.shapes)),
            "territory_sector_counts_60deg_from_+x_ccw": np.bincount(sector, minlength=6).tolist(),
            "extent_deg_mean_sd": stat(np.degrees(self.shapes[:, 1])),
            "transmurality_mean_sd": stat(self.shapes[:, 2]),
            "mvo_present_fraction": float(np.mean(self.shapes[:, 3] > 0)),
            "t_scar_mean_sd": stat(i[:, 0]),
            "t_mvo_mean_sd": stat(i[:, 2]),
        }

    def sample_params(self, rng: np.random.Generator) -> ScarParams:
        """Bootstrap a fitted record and jitter it."""
        center, extent, transmurality, mvo_fraction = sample_shape(self.shapes, rng)
        inten = self.intensities
        row = inten[rng.integers(len(inten))]
        t_scar = row[0] if np.isfinite(row[0]) else float(np.nanmean(inten[:, 0]))
        r_scar = row[1] if np.isfinite(row[1]) else float(np.nanmean(inten[:, 1]))
        mvo_rows = inten[np.isfinite(inten[:, 2])]
        if len(mvo_rows):
            t_mvo, r_mvo = mvo_rows[rng.integers(len(mvo_rows))][2:]
        else:  # no MVO seen: MVO as dark as remote myocardium
            t_mvo, r_mvo = 0.0, 0.0
        return ScarParams(
            center=center,
            extent=extent,
            transmurality=transmurality,
            mvo_fraction=mvo_fraction,
            t_scar=float(np.clip(t_scar + rng.normal(0.0, 0.03), 0.2, 3.0)),
            r_scar=float(r_scar),
            t_mvo=float(t_mvo),
            r_mvo=float(r_mvo),
            seed=int(rng.integers(0, 2**31 - 1)),
        )


def scar_shapes(labels: np.ndarray) -> np.ndarray:
    """Shape records (K, 4) :data:`SHAPE_FIELDS` of the scarred slices among ``labels`` (N, H, W) canonical codes
    (K = 0 when none has scar next to an LV blood pool)."""
    recs = [rec[0] for lab in np.asarray(labels) if (rec := slice_scar_record(None, lab)) is not None]
    return np.asarray(recs, dtype=np.float64).reshape(-1, len(SHAPE_FIELDS))


def sample_shape(shapes: np.ndarray, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Bootstrap one shape record of ``shapes`` (K, 4) and jitter it: (centre angle rad, extent rad,
    transmurality, MVO fraction); the territory moves by ~15°, the extent by ~15 % and the transmurality by 0.05."""
    c, e, t, m = shapes[rng.integers(len(shapes))]
    return (
        float(_wrap(c + rng.normal(0.0, np.radians(15.0)))),
        float(np.clip(e * np.exp(rng.normal(0.0, 0.15)), np.radians(20.0), 2 * np.pi)),
        float(np.clip(t + rng.normal(0.0, 0.05), 0.15, 1.0)),
        float(m if m > 0 else 0.0),
    )


def insert_label_scar(
    labels: np.ndarray, shapes: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Label-level scar for label-conditioned synthesis: each scar-eligible map of ``labels`` (N, H, W) (an LV
    blood pool, enough healthy myocardium, no scar) gets, with probability ``fraction``, a scar (and MVO
    core) in its myocardium drawn from the fitted ``shapes`` (K, 4) (:func:`scar_shapes`; the same territory
    / transmurality model as :func:`insert_scar`). A conditional family then renders the new map as a new LGE
    image. Only MYO pixels change (to SCAR / MVO). Returns (new labels (N, H, W) uint8, (N,) bool: scar added)."""
    from medsynth.data.cohorts import scar_eligible

    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction: must be in [0, 1], got {fraction}")
    labels = np.asarray(labels)
    out = labels.copy()
    added = np.zeros(len(labels), dtype=bool)
    if fraction == 0.0 or len(labels) == 0:
        return out, added
    if len(shapes) == 0:
        raise ValueError("shapes: no scarred slice to draw scar shapes from")
    draw = rng.random(len(labels)) < fraction  # drawn for every map, so the choice does not depend on eligibility
    for i in np.flatnonzero(draw & scar_eligible(labels)):
        center, extent, transmurality, mvo_fraction = sample_shape(shapes, rng)
        params = ScarParams(
            center, extent, transmurality, mvo_fraction, 0.0, 0.0, 0.0, 0.0, int(rng.integers(0, 2**31 - 1))
        )
        scar, mvo = scar_masks(labels[i], params)
        out[i][scar] = SCAR
        out[i][mvo] = MVO
        added[i] = bool(scar.any() or mvo.any())
    return out, added


def scar_masks(label: np.ndarray, params: ScarParams) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (scar, mvo) masks, both inside the healthy myocardium (``label == MYO``) of an (H, W) map."""
    theta, depth, _ = wall_coordinates(label)
    healthy = label == MYO
    if not healthy.any():
        return np.zeros_like(healthy), np.zeros_like(healthy)
    r = np.random.default_rng(params.seed)
    dth = _wrap(np.nan_to_num(theta) - params.center)
    half = params.extent / 2
    # Transmurality tapers towards the territory border, with a smooth random ripple (rough boundary).
    rel = np.clip(np.abs(dth) / max(half, 1e-6), 0.0, 1.0)
    ripple = 1.0 + sum(0.08 * r.normal() * np.cos(k * dth + r.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    profile = params.transmurality * (0.55 + 0.45 * np.cos(np.pi * rel / 2) ** 0.5) * ripple
    scar = healthy & (np.abs(dth) <= half) & (np.nan_to_num(depth, nan=2.0) <= profile)
    if not scar.any():  # thin wall: keep at least the endocardial layer of the territory
        scar = healthy & (np.abs(dth) <= half) & (np.nan_to_num(depth, nan=2.0) <= np.nanmin(depth[healthy]) + 0.2)
    mvo = np.zeros_like(scar)
    n_mvo = int(round(params.mvo_fraction * scar.sum()))
    if n_mvo > 0:
        # MVO is the core: lowest depth relative to the local profile, closest to the territory centre.
        core = np.nan_to_num(depth, nan=2.0) / np.maximum(profile, 1e-3) + rel
        idx = np.flatnonzero(scar)
        mvo.flat[idx[np.argsort(core.flat[idx], kind="stable")[:n_mvo]]] = True
    return scar & ~mvo, mvo


def insert_scar(image: np.ndarray, label: np.ndarray, params: ScarParams) -> tuple[np.ndarray, np.ndarray]:
    """Insert a scar into healthy myocardium of an (H, W) image / canonical label pair.

    Only myocardium pixels (``label == MYO``) change, in the image and in the labels (MYO → SCAR / MVO).
    Intensities keep the local texture: ``x' = mu_t + (x - mu_remote) · sd_t / sd_remote`` with the tissue's
    mean placed between remote myocardium and blood pool by the contrast ``t``; a light partial-volume blend
    (σ 0.7 px) softens the border, still only inside the healthy myocardium.
    """
    if image.shape != label.shape:
        raise ValueError(f"image: shape {image.shape} does not match label {label.shape}")
    scar, mvo = scar_masks(label, params)
    if not (scar.any() or mvo.any()):
        return image.copy(), label.copy()
    healthy = label == MYO
    remote = healthy & ~scar & ~mvo
    mu_h, sd_h = robust_stats(image[remote] if remote.sum() >= 5 else image[healthy])
    blood = image[label == LV]
    mu_b = float(np.median(blood)) if blood.size else mu_h + 1.0
    target = image.astype(np.float32).copy()
    for mask, t, r in ((scar, params.t_scar, params.r_scar), (mvo, params.t_mvo, params.r_mvo)):
        mu_t = mu_h + t * (mu_b - mu_h)
        target[mask] = mu_t + (image[mask] - mu_h) * float(np.exp(r))
    infarct = (scar | mvo).astype(np.float32)
    alpha = np.clip(ndimage.gaussian_filter(infarct, 0.7) * 1.5, 0.0, 1.0)
    alpha = np.where(scar | mvo, np.maximum(alpha, 0.8), alpha) * healthy
    # Border pixels outside the infarct blend towards the scar tissue value they sit next to.
    near = ndimage.grey_dilation(np.where(scar, target, -np.inf), size=3)
    near = np.where(np.isfinite(near), near, target)
    target = np.where(scar | mvo, target, np.where(alpha > 0, near, target))
    out = (image + alpha * (target - image)).astype(image.dtype, copy=False)
    out = np.where(healthy, out, image)
    new_label = label.copy()
    new_label[scar] = SCAR
    new_label[mvo] = MVO
    return out, new_label


def remove_scar(image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scar-free counterpart of an (H, W) pair: SCAR / MVO pixels get healthy-myocardium intensities (texture
    kept by standardising each tissue onto the remote myocardium) and the label MYO. Other pixels unchanged."""
    if image.shape != label.shape:
        raise ValueError(f"image: shape {image.shape} does not match label {label.shape}")
    out, new_label = image.copy(), label.copy()
    if not np.isin(label, (SCAR, MVO)).any():
        return out, new_label
    healthy = label == MYO
    if healthy.sum() >= 5:
        mu_h, sd_h = robust_stats(image[healthy])
    else:  # fully infarcted wall: fall back to halfway between the darkest wall pixels and zero contrast
        wall = np.isin(label, MYOCARDIAL_WALL)
        mu_h, sd_h = float(np.percentile(image[wall], 5)), robust_stats(image[wall])[1]
    for code in (SCAR, MVO):
        mask = label == code
        if mask.any():
            mu_c, sd_c = robust_stats(image[mask]) if mask.sum() >= 3 else (float(image[mask].mean()), sd_h)
            out[mask] = mu_h + (image[mask] - mu_c) * (sd_h / sd_c)
            new_label[mask] = MYO
    return out, new_label
