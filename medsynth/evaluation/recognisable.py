"""Is there a recognisable heart in a synthetic set? A cheap check with thresholds from references, not constants.

Every check compares the synthetic slices with two references computed in the same call from real slices:

- **real**: real half A against real half B (halves split by subject when ``real_groups`` is given): what
  real data scores against itself;
- **null**: versions of half A without what the check looks for, against half B. For heart presence and
  tissue contrast, *structure-free* surrogates: each real slice is phase-randomised (the amplitude spectrum
  kept, the Fourier phases replaced by those of seeded white noise) and then given back its own grey-level
  histogram by rank remapping: the real intensities and spatial-frequency content — "blotchy noise" — but no
  heart. For the Fréchet distance, *pixel-shuffled* slices (the real grey levels, no image at all): the
  random-CNN features mostly see intensity statistics and texture, which the phase surrogates keep. For
  diversity, the exact reference of a collapsed generator: identical slices (pairwise NCC 1).

A check passes when the synthetic value lies on the real side of the midpoint between the two references
(the midpoint of the logarithms for the Fréchet distance, which spans orders of magnitude). The thresholds
therefore move with the data, the image size and the number of slices; none is a tuned constant.

Checks (images (N, H, W) or (N, 1, H, W) float on medsynth's slice scale, p1 → 0, p99 → 1):

- ``heart_fraction``: the share of synthetic slices whose *central region* (the middle ``central`` fraction of
  each side, where the preprocessing puts the heart) matches some real half-B slice better than 95 % of the
  null slices do. Match = the best normalised cross-correlation (NCC) over the half-B slices, on the central
  region resampled to 32 × 32. A per-slice test at level 0.05 against the null; the rate is then compared
  with the real (≈ 1) and null (≈ 0.05) rates.
- ``fd_random_cnn`` (reported, not required): Fréchet distance of fixed-seed random-CNN features
  (:func:`medsynth.evaluation.features.random_cnn`) to half B, with equal set sizes for the synthetic, real and
  null sets (FD is biased by N). Not required because these features judge texture and grey-level statistics
  more than anatomy: on the phantom the GMM's clearly cardiac renderings (grainier than the phantom's smooth
  tissues) sit as far from the real slices as the pixel-shuffled null does.
- ``diversity``: the median NCC of the central regions of random pairs of synthetic slices; real reference
  the same over half A, null 1 (every sample the same image: a collapsed generator, e.g. a VAE decoding only
  its mean). Lower is real.
- ``contrast_lv_myo`` / ``contrast_rv_myo`` (only when the synthetic slices come with label maps): the median
  per-slice tissue contrast-to-noise ratio (mean blood − mean myocardium) / pooled tissue SD, on the synthetic
  label maps; real and null references from half A with its own labels. The side is the real data's sign
  (blood brighter than healthy myocardium in cine and in LGE alike).

:func:`recognisability` returns a :class:`Recognisability`; ``passed`` is true when every required check
passed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from medsynth.evaluation.features import FeatureExtractor, random_cnn
from medsynth.evaluation.fidelity import frechet_distance, split_halves
from medsynth.labels import LV, MYO, RV

log = logging.getLogger(__name__)

NCC_SIZE = 32  # the central region is compared at this size: cheap, and blind to pixel-level texture
NULL_QUANTILE = 0.95  # per-slice test level 0.05 against the structure-free null
MIN_TISSUE_PIXELS = 10  # a tissue smaller than this in a slice gives no contrast estimate
CONTRAST_PAIRS = (("contrast_lv_myo", LV, MYO), ("contrast_rv_myo", RV, MYO))


@dataclass(frozen=True)
class Check:
    """One check: the synthetic value, the two references, the midpoint threshold and the outcome.

    ``higher_is_real``: the side of the threshold real data lies on."""

    name: str
    value: float
    real: float
    null: float
    threshold: float
    higher_is_real: bool
    passed: bool
    required: bool = True


@dataclass
class Recognisability:
    """The outcome of :func:`recognisability`: one :class:`Check` per name, ``passed`` if all passed."""

    checks: dict[str, Check] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks.values() if c.required)

    def table(self) -> pd.DataFrame:
        """One row per check (name, value, real, null, threshold, higher_is_real, passed, required)."""
        return pd.DataFrame([c.__dict__ for c in self.checks.values()])

    def summary(self) -> str:
        """One line per check, for logs and assertion messages."""
        return "; ".join(
            f"{c.name} {c.value:.3g} ({'>' if c.higher_is_real else '<'} {c.threshold:.3g} needed; "
            f"real {c.real:.3g}, null {c.null:.3g}) {'ok' if c.passed else 'FAIL' if c.required else 'no (optional)'}"
            for c in self.checks.values()
        )


def _as_images(images: np.ndarray, name: str) -> np.ndarray:
    """(N, H, W) float64 from (N, H, W) or (N, 1, H, W); ValueError naming ``name`` otherwise."""
    x = np.asarray(images, dtype=np.float64)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3 or len(x) < 1:
        raise ValueError(f"{name}: expected images (N, H, W) or (N, 1, H, W), got {np.shape(images)}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: images contain NaN or Inf")
    return x


def phase_randomise(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Structure-free surrogates of ``images`` (N, H, W): same amplitude spectrum, random phases (those of a
    seeded white-noise image, so the result is real), then the original grey-level histogram restored by rank
    remapping. Returns (N, H, W) float64."""
    x = _as_images(images, "images")
    gen = np.random.default_rng(seed)
    out = np.empty_like(x)
    for i, img in enumerate(x):
        amp = np.abs(np.fft.fft2(img))
        phase = np.angle(np.fft.fft2(gen.standard_normal(img.shape)))
        surrogate = np.fft.ifft2(amp * np.exp(1j * phase)).real
        ranks = np.argsort(np.argsort(surrogate, axis=None), axis=None)
        out[i] = np.sort(img, axis=None)[ranks].reshape(img.shape)
    return out


def pixel_shuffle(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Each slice of (N, H, W) with its pixels randomly permuted (seeded): the grey levels without an image."""
    x = _as_images(images, "images")
    gen = np.random.default_rng(seed)
    return np.stack([gen.permutation(img.ravel()).reshape(img.shape) for img in x])


def pairwise_ncc(images: np.ndarray, n_pairs: int = 200, central: float = 0.5, seed: int = 0) -> np.ndarray:
    """NCC of the central regions of ``n_pairs`` random pairs of distinct slices of (N ≥ 2, H, W): (n_pairs,)."""
    p = central_patches(images, central)
    gen = np.random.default_rng(seed)
    i = gen.integers(0, len(p), n_pairs)
    j = (i + gen.integers(1, len(p), n_pairs)) % len(p)
    return (p[i] * p[j]).sum(1) / p.shape[1]


def central_patches(images: np.ndarray, central: float = 0.5, size: int = NCC_SIZE) -> np.ndarray:
    """The middle ``central`` fraction of each side of (N, H, W), area-resampled to ``size``², z-scored per
    slice and flattened: (N, size²) rows of unit norm / sqrt(size²) (so a dot product / size² is the NCC)."""
    if not 0 < central <= 1:
        raise ValueError(f"central: must be in (0, 1], got {central}")
    x = _as_images(images, "images")
    h, w = x.shape[1:]
    ch, cw = max(2, round(h * central)), max(2, round(w * central))
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    crop = torch.from_numpy(np.ascontiguousarray(x[:, y0 : y0 + ch, x0 : x0 + cw]))[:, None].float()
    p = F.interpolate(crop, size=(size, size), mode="area")[:, 0].reshape(len(x), -1).double().numpy()
    p = p - p.mean(1, keepdims=True)
    sd = p.std(1, keepdims=True)
    return p / np.where(sd > 1e-12, sd, 1.0)


def best_ncc(images: np.ndarray, reference: np.ndarray, central: float = 0.5) -> np.ndarray:
    """For each slice of ``images`` (N, H, W) the best NCC of its central region with a ``reference`` slice
    (M, H', W'): (N,) float64 in [−1, 1]."""
    a, b = central_patches(images, central), central_patches(reference, central)
    return (a @ b.T).max(1) / a.shape[1]


def tissue_contrast(images: np.ndarray, labels: np.ndarray, a: int, b: int) -> np.ndarray:
    """Per-slice contrast-to-noise ratio (mean_a − mean_b) / sqrt((var_a + var_b) / 2) of label codes ``a`` and
    ``b`` in (N, H, W) images; slices where either tissue has fewer than :data:`MIN_TISSUE_PIXELS` pixels are
    left out. Returns (n_kept,) float64."""
    x = _as_images(images, "images")
    lab = np.asarray(labels)
    if lab.shape != x.shape:
        raise ValueError(f"labels: shape {lab.shape} does not match the images {x.shape}")
    out = []
    for img, m in zip(x, lab, strict=True):
        va, vb = img[m == a], img[m == b]
        if len(va) < MIN_TISSUE_PIXELS or len(vb) < MIN_TISSUE_PIXELS:
            continue
        sd = np.sqrt((va.var() + vb.var()) / 2)
        out.append((va.mean() - vb.mean()) / max(sd, 1e-6))
    return np.asarray(out, dtype=np.float64)


def _check(name: str, value: float, real: float, null: float, log_scale: bool = False, required: bool = True) -> Check:
    """Midpoint rule: pass when ``value`` is on the real side of the midpoint of the two references."""
    if log_scale:
        lv, lr, ln = (np.log(max(v, 1e-12)) for v in (value, real, null))
        threshold = float(np.exp((lr + ln) / 2))
        higher = lr > ln
        passed = lv > (lr + ln) / 2 if higher else lv < (lr + ln) / 2
    else:
        threshold = (real + null) / 2
        higher = real > null
        passed = value > threshold if higher else value < threshold
    if real == null:  # the references do not separate: nothing can be concluded, so the check fails
        passed = False
    return Check(name, float(value), float(real), float(null), float(threshold), bool(higher), bool(passed), required)


def recognisability(
    synthetic: np.ndarray,
    real: np.ndarray,
    synthetic_labels: np.ndarray | None = None,
    real_labels: np.ndarray | None = None,
    real_groups: np.ndarray | None = None,
    extractor: FeatureExtractor | None = None,
    central: float = 0.5,
    seed: int = 0,
) -> Recognisability:
    """Do the ``synthetic`` slices (N, H, W) show a heart the way the ``real`` ones (M, H, W) do?

    ``real_groups`` (M,): subject ids, so the real halves are split by subject (recommended: slices of one
    subject are near-copies of each other). ``synthetic_labels`` / ``real_labels`` (same shapes as the images,
    canonical codes) add the tissue-contrast checks. ``extractor``: the FD features (default: the fixed-seed
    random CNN, ``random_cnn(seed)``). See the module docstring for the checks and their references."""
    syn = _as_images(synthetic, "synthetic")
    ref = _as_images(real, "real")
    if len(ref) < 4 or len(syn) < 2:
        raise ValueError(f"need >= 4 real and >= 2 synthetic slices, got {len(ref)} and {len(syn)}")
    ia, ib = split_halves(len(ref), None if real_groups is None else np.asarray(real_groups), seed)
    if min(len(ia), len(ib)) < 2:
        raise ValueError(f"real_groups: both real halves need >= 2 slices, got {len(ia)} and {len(ib)}")
    half_a, half_b = ref[ia], ref[ib]
    null_a = phase_randomise(half_a, seed)
    out = Recognisability()

    # heart presence: per-slice test against the null's 95th percentile of best NCC
    null_ncc = best_ncc(null_a, half_b, central)
    cut = float(np.quantile(null_ncc, NULL_QUANTILE))
    rates = [float((best_ncc(s, half_b, central) > cut).mean()) for s in (syn, half_a)]
    out.checks["heart_fraction"] = _check("heart_fraction", rates[0], rates[1], float((null_ncc > cut).mean()))

    # Fréchet distance of random-CNN features, equal set sizes (FD is biased by N)
    ext = extractor or random_cnn(seed)
    n = min(len(syn), len(half_a))
    gen = np.random.default_rng(seed)
    pick = np.sort(gen.choice(len(half_a), n, replace=False))
    s_pick = np.sort(gen.choice(len(syn), n, replace=False))
    shuffled = pixel_shuffle(half_a[pick], seed)
    feats = {k: ext(v[:, None].astype(np.float32)) for k, v in
             (("syn", syn[s_pick]), ("real", half_a[pick]), ("null", shuffled), ("b", half_b))}  # fmt: skip
    fd = {k: frechet_distance(feats[k], feats["b"]) for k in ("syn", "real", "null")}
    out.checks["fd_random_cnn"] = _check(
        "fd_random_cnn", fd["syn"], fd["real"], fd["null"], log_scale=True, required=False
    )

    # diversity: a collapsed generator repeats one image (pairwise NCC 1)
    div = [float(np.median(pairwise_ncc(v, seed=seed))) for v in (syn, half_a)]
    out.checks["diversity"] = _check("diversity", div[0], div[1], 1.0)

    if synthetic_labels is not None and real_labels is not None:
        lab_a = np.asarray(real_labels)[ia]
        for name, a, b in CONTRAST_PAIRS:
            values = [tissue_contrast(img, lab, a, b) for img, lab in
                      ((syn, synthetic_labels), (half_a, lab_a), (null_a, lab_a))]  # fmt: skip
            if min(len(v) for v in values) < 2:
                log.info("%s: fewer than 2 slices with both tissues; check skipped", name)
                continue
            out.checks[name] = _check(name, *(float(np.median(v)) for v in values))
    log.info("recognisability: %s", out.summary())
    return out
