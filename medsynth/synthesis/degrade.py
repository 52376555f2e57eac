"""Image degradations applied after label-to-image synthesis, batched and vectorised.

TorchIO-style split: :class:`RandomDegrade` samples a :class:`DegradeParams` (one set of parameters per
image) from a seeded generator and hands it to the deterministic :func:`apply_degrade`, so any sampled
degradation can be replayed exactly. Arrays are (N, H, W) float32 on the SliceSet intensity scale; lengths
are in pixels.

Order follows the imaging chain: partial-volume blur (the point-spread function mixes neighbouring tissues),
optional resolution change (acquire at a coarser matrix along one axis, interpolate back), multiplicative
smooth bias field (receive-coil sensitivity), additive noise last.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medsynth.config import StrictModel
from medsynth.utils.seeding import fast_standard_normal


class DegradeConfig(StrictModel):
    """Ranges the random degradation draws from (uniform unless stated)."""

    bias_order: int = 3  # polynomial order of the log bias field, as TorchIO RandomBiasField
    bias_coefficient: float = 0.15  # |coefficients| ~ U(0, value): log-field amplitude
    blur_sigma: tuple[float, float] = (0.3, 0.8)  # PSF sigma in pixels (partial-volume blur)
    noise_std: tuple[float, float] = (0.0, 0.03)  # additive Gaussian noise std (normalised units)
    downsample_prob: float = 0.0  # probability of a resolution change per image
    downsample_factor: tuple[float, float] = (1.0, 2.0)  # coarser acquisition along one axis


@dataclass
class DegradeParams:
    """Per-image parameters: ``bias`` (N, n_terms) log-field polynomial coefficients, ``sigma`` (N,) px,
    ``noise`` (N,) std, ``factor`` (N,) resolution-change factor (1 = none), ``axis`` (N,) 0/1 and
    ``noise_seed`` (int) for the noise draw."""

    bias: np.ndarray
    sigma: np.ndarray
    noise: np.ndarray
    factor: np.ndarray
    axis: np.ndarray
    noise_seed: int
    bias_order: int


def _poly_terms(order: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(order + 1) for j in range(order + 1 - i)]


class RandomDegrade:
    """Sample :class:`DegradeParams` for ``n`` images from ``rng``."""

    def __init__(self, config: DegradeConfig | None = None) -> None:
        self.config = config or DegradeConfig()
        if self.config.bias_order < 0:
            raise ValueError("bias_order: must be >= 0")

    def sample_params(self, n: int, rng: np.random.Generator) -> DegradeParams:
        c = self.config
        n_terms = len(_poly_terms(c.bias_order))
        bias = rng.uniform(-c.bias_coefficient, c.bias_coefficient, size=(n, n_terms))
        bias[:, 0] = 0.0  # no global scale change: intensities stay on the normalised scale
        sigma = rng.uniform(*c.blur_sigma, size=n)
        noise = rng.uniform(*c.noise_std, size=n)
        down = rng.random(n) < c.downsample_prob
        factor = np.where(down, rng.uniform(*c.downsample_factor, size=n), 1.0)
        axis = rng.integers(0, 2, size=n)
        return DegradeParams(bias, sigma, noise, factor, axis, int(rng.integers(0, 2**31 - 1)), c.bias_order)

    def __call__(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return apply_degrade(images, self.sample_params(images.shape[0], rng))


def bias_fields(params: DegradeParams, shape: tuple[int, int]) -> np.ndarray:
    """Multiplicative fields (N, H, W): ``exp`` of a polynomial in coordinates scaled to [-1, 1]."""
    h, w = shape
    y = np.linspace(-1.0, 1.0, h, dtype=np.float32)
    x = np.linspace(-1.0, 1.0, w, dtype=np.float32)
    basis = np.stack([np.outer(y**i, x**j) for i, j in _poly_terms(params.bias_order)])  # (T, H, W)
    log_field = np.tensordot(params.bias.astype(np.float32), basis, axes=(1, 0))
    return np.exp(log_field, dtype=np.float32)


def gaussian_blur(images: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Blur each (H, W) image with its own isotropic Gaussian sigma (px); borders replicate (``nearest``).

    The sampled, normalised kernel of ``scipy.ndimage.gaussian_filter`` with ``truncate=3``, applied as two
    separable passes per image: one 128×128 image stays in cache through both passes, which measured faster
    than shifted adds vectorised over the batch."""
    images = np.asarray(images, dtype=np.float32)
    sigma = np.asarray(sigma, dtype=np.float64)
    if images.ndim != 3 or sigma.shape != (images.shape[0],):
        raise ValueError(f"images/sigma: expected (N, H, W) and (N,), got {images.shape} and {sigma.shape}")
    out = np.empty_like(images)
    for i, s in enumerate(sigma):
        if s <= 0:
            out[i] = images[i]
            continue
        taps = np.arange(-int(3.0 * s + 0.5), int(3.0 * s + 0.5) + 1)
        k = np.exp(-0.5 * (taps / s) ** 2)
        k = (k / k.sum()).astype(np.float32)
        ndimage.correlate1d(images[i], k, axis=0, mode="nearest", output=out[i])
        ndimage.correlate1d(out[i], k, axis=1, mode="nearest", output=out[i])  # line-buffered: in place is safe
    return out


def change_resolution(images: np.ndarray, factor: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """Simulate a coarser acquisition along ``axis`` by ``factor``: box-average to the coarse grid, then
    linear interpolation back (only images with factor > 1 change)."""
    out = images.copy()
    for i in np.flatnonzero(np.asarray(factor) > 1.0):
        img = images[i] if axis[i] == 0 else images[i].T
        h = img.shape[0]
        m = max(2, int(round(h / factor[i])))
        edges = np.linspace(0, h, m + 1)
        centres = (edges[:-1] + edges[1:]) / 2 - 0.5
        idx = np.minimum((np.arange(h) * m) // h, m - 1)
        coarse = np.zeros((m, img.shape[1]), dtype=np.float64)
        np.add.at(coarse, idx, img)
        coarse /= np.bincount(idx, minlength=m)[:, None]
        fine = np.stack([np.interp(np.arange(h), centres, coarse[:, j]) for j in range(img.shape[1])], axis=1)
        out[i] = fine if axis[i] == 0 else fine.T
    return out


def apply_degrade(images: np.ndarray, params: DegradeParams) -> np.ndarray:
    """Deterministic twin of :class:`RandomDegrade`: blur → resolution change → bias field → noise."""
    if images.ndim != 3:
        raise ValueError(f"images: expected (N, H, W), got {images.shape}")
    out = gaussian_blur(images, params.sigma)
    if np.any(params.factor > 1.0):
        out = change_resolution(out, params.factor, params.axis)
    out *= bias_fields(params, out.shape[1:])
    noise_rng = np.random.Generator(np.random.SFC64(params.noise_seed))
    noise = fast_standard_normal(noise_rng, out.shape)
    noise *= params.noise.astype(np.float32)[:, None, None]
    out += noise
    return out
