"""Fidelity and diversity of a synthetic set against a real one, on features of an offline extractor.

Metrics (all on features (N, D) float64 unless stated):

- ``fd``: Fréchet distance between Gaussian fits. The trace of sqrt(Σ1 Σ2) is computed from a symmetric
  eigenproblem (Rᵀ Σ2 R with Σ1 = R Rᵀ has the same eigenvalues as Σ1 Σ2, see :func:`trace_sqrt_product`), which is
  stable, real-valued and much faster than ``scipy.linalg.sqrtm`` of the non-symmetric product; with
  fewer samples than feature dimensions, as the nuclear norm of the product of the centred feature
  matrices (exact, see :func:`frechet_distance`).
- ``rfd``: relative FD (Woodland et al., MICCAI 2024) = FD(synthetic, real half B) / FD(real half A,
  real half B); halves split by subject when the metadata allows. ~1 means "as close as real data is to
  itself".
- ``kid``: unbiased MMD² with the cubic polynomial kernel over random subsets whose size adapts to small
  sets (min(subset_size, n_real, n_synthetic)).
- ``precision`` / ``recall`` (Kynkäänniemi 2019), ``density`` / ``coverage`` (Naeem 2020) on k-NN balls.
- ``ms_ssim_synthetic`` / ``ms_ssim_real``: mean pairwise MS-SSIM inside a set (images, not features);
  lower is more diverse.

Confidence intervals are percentile bootstrap intervals (FD/rFD: resampling the feature sets; PRDC:
resampling the per-sample indicators on fixed k-NN manifolds; KID: the spread over subsets; MS-SSIM:
resampling pairs).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.linalg
import torch

from medsynth.config import StrictModel
from medsynth.utils.seeding import rng

if TYPE_CHECKING:
    from medsynth.data.slices import SliceSet
    from medsynth.evaluation.features import FeatureExtractor

log = logging.getLogger(__name__)

RESULT_COLUMNS = ("metric", "value", "ci_low", "ci_high", "extractor", "extractor_hash", "n_real", "n_synthetic")


class FidelityConfig(StrictModel):
    """Settings of :func:`compute_fidelity`."""

    seed: int = 0
    n_bootstrap: int = 100
    ci: float = 0.95
    kid_subset_size: int = 1000
    kid_n_subsets: int = 50
    prdc_k: int = 5
    ms_ssim_pairs: int = 200
    ms_ssim_size: int = 128
    max_samples: int | None = 5000


# ---------------------------------------------------------------------------------------------- Fréchet


def _as_2d(features: np.ndarray, name: str) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"{name}: expected features (N >= 2, D), got {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError(f"{name}: features contain NaN or Inf")
    return f


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D)."""
    f = _as_2d(features, "features")
    mu = f.mean(axis=0)
    x = f - mu
    return mu, (x.T @ x) / (len(f) - 1)


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr(sqrt(Σ1 Σ2)) for PSD Σ1, Σ2 via the eigenvalues of the symmetric PSD matrix Rᵀ Σ2 R, where
    Σ1 = R Rᵀ (Cholesky when Σ1 is positive definite, else the symmetric square root): Rᵀ Σ2 R is similar to
    Σ1 Σ2, so both have the same eigenvalues, but it is symmetric, so they come out real and accurate."""
    try:
        r = np.linalg.cholesky(sigma1)
    except np.linalg.LinAlgError:
        r = _sqrt_psd(sigma1)
    m = r.T @ sigma2 @ r
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(ev, 0.0, None)).sum())


def frechet_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance ||μ1-μ2||² + tr Σ1 + tr Σ2 - 2 tr sqrt(Σ1 Σ2) (clipped at 0)."""
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return float(max(fd, 0.0))


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between features (N, D) and (M, D).

    With fewer samples than dimensions the covariances are low-rank: Σa = AᵀA, Σb = BᵀB (A, B the centred
    features / sqrt(n-1)), and tr sqrt(Σa Σb) is exactly the nuclear norm of A Bᵀ (N × M), which is both
    cheaper and better conditioned than any D × D route. Otherwise the eigendecomposition route is used.
    """
    a, b = _as_2d(features_a, "features_a"), _as_2d(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"features: dimensions differ ({a.shape[1]} vs {b.shape[1]})")
    if max(len(a), len(b)) <= a.shape[1]:
        mu_a, mu_b = a.mean(0), b.mean(0)
        ca, cb = (a - mu_a) / np.sqrt(len(a) - 1), (b - mu_b) / np.sqrt(len(b) - 1)
        diff = mu_a - mu_b
        nuclear = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
        return float(max(diff @ diff + (ca * ca).sum() + (cb * cb).sum() - 2.0 * nuclear, 0.0))
    return frechet_from_stats(*gaussian_stats(a), *gaussian_stats(b))


def frechet_from_stats_scipy(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Reference formula (pytorch-fid / MONAI FIDMetric): ``scipy.linalg.sqrtm`` of Σ1 Σ2, real part."""
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if isinstance(covmean, tuple):  # older scipy returned (sqrtm, errest) with disp=False
        covmean = covmean[0]
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


# ---------------------------------------------------------------------------------------------- KID


def mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    """Unbiased MMD² from kernel matrices (Gretton et al. 2012, Lemma 6)."""
    m, n = kxx.shape[0], kyy.shape[0]
    a = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    b = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(a + b - 2.0 * kxy.mean())


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None, coef0: float = 1.0):
    """(γ x·y + c)^degree with γ = 1/D by default (the KID kernel)."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (gamma * (x @ y.T) + coef0) ** degree


def kid(
    real: np.ndarray, synthetic: np.ndarray, subset_size: int = 1000, n_subsets: int = 50, seed: int = 0
) -> tuple[float, np.ndarray]:
    """KID: mean unbiased polynomial-kernel MMD² over random subsets; returns (mean, per-subset values).

    The subset size adapts to small sets: ``min(subset_size, n_real, n_synthetic)`` (at least 2).
    """
    x, y = _as_2d(real, "real"), _as_2d(synthetic, "synthetic")
    m = min(subset_size, len(x), len(y))
    gen = rng(seed)
    vals = np.empty(n_subsets)
    for i in range(n_subsets):
        xs = x[gen.choice(len(x), m, replace=False)]
        ys = y[gen.choice(len(y), m, replace=False)]
        vals[i] = mmd2_unbiased(polynomial_kernel(xs, xs), polynomial_kernel(ys, ys), polynomial_kernel(xs, ys))
    return float(vals.mean()), vals


# ---------------------------------------------------------------------------------------------- PRDC


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.clip(d2, 0.0, None))


def _knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    d = _pairwise(x, x)
    np.fill_diagonal(d, np.inf)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def prdc_indicators(real: np.ndarray, synthetic: np.ndarray, k: int = 5) -> dict[str, np.ndarray]:
    """Per-sample indicators whose means are precision, recall, density and coverage.

    ``k`` adapts to small sets (``min(k, n - 1)``). Returns arrays: ``precision`` and ``density`` per
    synthetic sample, ``recall`` and ``coverage`` per real sample.
    """
    x, y = _as_2d(real, "real"), _as_2d(synthetic, "synthetic")
    k = max(1, min(k, len(x) - 1, len(y) - 1))
    r_real = _knn_radii(x, k)
    r_syn = _knn_radii(y, k)
    d = _pairwise(x, y)  # (n_real, n_syn)
    inside_real = d <= r_real[:, None]
    return {
        "precision": inside_real.any(axis=0).astype(float),
        "density": inside_real.sum(axis=0) / k,
        "recall": (d <= r_syn[None, :]).any(axis=1).astype(float),
        "coverage": (d.min(axis=1) <= r_real).astype(float),
    }


def prdc(real: np.ndarray, synthetic: np.ndarray, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage (means of :func:`prdc_indicators`)."""
    return {name: float(v.mean()) for name, v in prdc_indicators(real, synthetic, k).items()}


# ---------------------------------------------------------------------------------------------- MS-SSIM


def ms_ssim_settings(size: int, levels: int = 5) -> tuple[int, tuple[float, ...]]:
    """Largest odd kernel (≤ 11) MONAI's MS-SSIM accepts at ``size`` px, dropping coarse levels if needed."""
    weights = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)[:levels]
    while True:
        for k in range(11, 2, -2):
            if size > (k - 1) * 2 ** (len(weights) - 1):
                return k, tuple(w / sum(weights) for w in weights)
        if len(weights) == 1:
            raise ValueError(f"size: {size} px is too small for MS-SSIM")
        weights = weights[:-1]


def pairwise_ms_ssim(images: np.ndarray, n_pairs: int = 200, size: int = 128, seed: int = 0) -> np.ndarray:
    """MS-SSIM of ``n_pairs`` random distinct pairs of images (N, 1, H, W), resized to ``size``², in [0, 1].

    Images are clipped to [0, 1] (data range 1). Lower mean = more diverse set.
    """
    from monai.metrics import MultiScaleSSIMMetric

    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or len(images) < 2:
        raise ValueError(f"images: expected (N >= 2, 1, H, W), got {images.shape}")
    gen = rng(seed)
    i = gen.integers(0, len(images), n_pairs)
    j = (i + gen.integers(1, len(images), n_pairs)) % len(images)  # never the same image
    k, weights = ms_ssim_settings(size)
    metric = MultiScaleSSIMMetric(spatial_dims=2, data_range=1.0, kernel_size=k, weights=weights, reduction="none")
    x = torch.from_numpy(images).clamp(0, 1)
    if x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True).clamp(0, 1)
    out = []
    for s in range(0, n_pairs, 64):
        a, b = x[i[s : s + 64]], x[j[s : s + 64]]
        out.append(metric(a, b).reshape(-1).double().numpy())
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------------- bootstrap


def percentile_ci(samples: np.ndarray, ci: float = 0.95) -> tuple[float, float]:
    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    if len(s) == 0:
        return float("nan"), float("nan")
    a = (1 - ci) / 2
    return float(np.quantile(s, a)), float(np.quantile(s, 1 - a))


def bootstrap_mean_ci(values: np.ndarray, n_bootstrap: int = 1000, ci: float = 0.95, seed: int = 0):
    """(mean, low, high) with a percentile bootstrap over the values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    gen = rng(seed)
    boots = v[gen.integers(0, len(v), (n_bootstrap, len(v)))].mean(axis=1)
    return (float(v.mean()), *percentile_ci(boots, ci))


def bootstrap_fd(a: np.ndarray, b: np.ndarray, n_bootstrap: int = 100, seed: int = 0) -> np.ndarray:
    """FD on ``n_bootstrap`` resamples (with replacement) of both feature sets."""
    gen = rng(seed)
    out = np.empty(n_bootstrap)
    for i in range(n_bootstrap):
        out[i] = frechet_distance(a[gen.integers(0, len(a), len(a))], b[gen.integers(0, len(b), len(b))])
    return out


# ---------------------------------------------------------------------------------------------- driver


def split_halves(n: int, groups: np.ndarray | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint index sets; whole groups (subjects) stay together when ``groups`` has ≥ 2 values."""
    gen = rng(seed)
    if groups is not None and len(np.unique(groups)) >= 2:
        uniq = np.unique(groups)
        gen.shuffle(uniq)
        # greedy balance of slice counts
        a_set, na, nb = set(), 0, 0
        for g in uniq:
            cnt = int((groups == g).sum())
            if na <= nb:
                a_set.add(g)
                na += cnt
            else:
                nb += cnt
        mask = np.isin(groups, list(a_set))
        return np.flatnonzero(mask), np.flatnonzero(~mask)
    perm = gen.permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2 :])


def _images_and_groups(data) -> tuple[np.ndarray, np.ndarray | None]:
    from medsynth.data.slices import SliceSet

    if isinstance(data, SliceSet):
        groups = data.meta["subject_id"].astype(str).to_numpy() if "subject_id" in data.meta else None
        return data.images, groups
    arr = np.asarray(data, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4 or arr.shape[1] != 1:
        raise ValueError(f"images: expected (N, 1, H, W), got {arr.shape}")
    return arr, None


def compute_fidelity(
    real: SliceSet | np.ndarray,
    synthetic: SliceSet | np.ndarray,
    extractor: FeatureExtractor,
    config: FidelityConfig | None = None,
) -> pd.DataFrame:
    """All fidelity / diversity metrics of ``synthetic`` against ``real``: one row per metric.

    Columns: :data:`RESULT_COLUMNS` (value, bootstrap CI, extractor name and content hash, set sizes).
    ``real`` / ``synthetic``: SliceSets or image arrays (N, 1, H, W).
    """
    cfg = config or FidelityConfig()
    real_img, groups = _images_and_groups(real)
    syn_img, _ = _images_and_groups(synthetic)
    gen = rng(cfg.seed)
    if cfg.max_samples is not None:
        if len(real_img) > cfg.max_samples:
            keep = np.sort(gen.choice(len(real_img), cfg.max_samples, replace=False))
            real_img, groups = real_img[keep], None if groups is None else groups[keep]
        if len(syn_img) > cfg.max_samples:
            syn_img = syn_img[np.sort(gen.choice(len(syn_img), cfg.max_samples, replace=False))]
    if len(real_img) < 4 or len(syn_img) < 2:
        raise ValueError(f"need >= 4 real and >= 2 synthetic images, got {len(real_img)} and {len(syn_img)}")
    fr, fs = extractor(real_img), extractor(syn_img)
    rows: list[tuple[str, float, float, float]] = []

    fd = frechet_distance(fr, fs)
    rows.append(("fd", fd, *percentile_ci(bootstrap_fd(fr, fs, cfg.n_bootstrap, cfg.seed), cfg.ci)))

    ia, ib = split_halves(len(fr), groups, cfg.seed)
    if min(len(ia), len(ib)) >= 2:
        fa, fb = fr[ia], fr[ib]
        rfd = frechet_distance(fs, fb) / max(frechet_distance(fa, fb), 1e-12)
        boot = rng(cfg.seed + 1)
        reps = []
        for _ in range(cfg.n_bootstrap):
            ra, rb = fa[boot.integers(0, len(fa), len(fa))], fb[boot.integers(0, len(fb), len(fb))]
            rs = fs[boot.integers(0, len(fs), len(fs))]
            reps.append(frechet_distance(rs, rb) / max(frechet_distance(ra, rb), 1e-12))
        rows.append(("rfd", rfd, *percentile_ci(np.array(reps), cfg.ci)))
        rows.append(("fd_real_halves", frechet_distance(fa, fb), float("nan"), float("nan")))

    kid_mean, kid_vals = kid(fr, fs, cfg.kid_subset_size, cfg.kid_n_subsets, cfg.seed)
    rows.append(("kid", kid_mean, *percentile_ci(kid_vals, cfg.ci)))

    for name, ind in prdc_indicators(fr, fs, cfg.prdc_k).items():
        _, lo, hi = bootstrap_mean_ci(ind, max(cfg.n_bootstrap, 200), cfg.ci, cfg.seed)
        rows.append((name, float(ind.mean()), lo, hi))

    for name, imgs in (("ms_ssim_synthetic", syn_img), ("ms_ssim_real", real_img)):
        vals = pairwise_ms_ssim(imgs, cfg.ms_ssim_pairs, cfg.ms_ssim_size, cfg.seed)
        rows.append((name, *bootstrap_mean_ci(vals, max(cfg.n_bootstrap, 200), cfg.ci, cfg.seed)))

    df = pd.DataFrame(rows, columns=["metric", "value", "ci_low", "ci_high"])
    df["extractor"] = extractor.name
    df["extractor_hash"] = extractor.hash
    # MS-SSIM works on the images themselves: name the pixel pipeline instead of the network
    k, _ = ms_ssim_settings(cfg.ms_ssim_size)
    is_ssim = df["metric"].str.startswith("ms_ssim")
    df.loc[is_ssim, "extractor"] = "images"
    df.loc[is_ssim, "extractor_hash"] = f"ms-ssim-{cfg.ms_ssim_size}px-k{k}"
    df["n_real"] = len(real_img)
    df["n_synthetic"] = len(syn_img)
    return df[list(RESULT_COLUMNS)]
