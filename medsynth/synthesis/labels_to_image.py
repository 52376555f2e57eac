"""Render images from canonical label maps with per-image tissue parameters (vectorised over the batch).

Each class ``c`` of image ``n`` gets a location ``mean[n, c]`` and scale ``sd[n, c]`` (drawn from a fitted
population by the caller) and a *standardised* intensity distribution, a 1-D Gaussian mixture shared by the
group (contrast / vendor), stored here as its quantile table. Pixel values are

    x = mean[n, c] + sd[n, c] * Q_c(Φ(g)),   g = √b_c · long_c + √a_c · short_c + √(1 - a_c - b_c) · white,

so every tissue's marginal is exactly its mixture while ``short_c`` / ``long_c`` (white noise low-passed with
Gaussians of ``length[c]`` / ``long_length[c]`` px, unit variance) give it the fitted two-scale spatial
correlation. Background (everything outside the heart labels) uses the same mechanism; there the long-range
share dominates: a smooth random field whose marginal and correlation come from the real surroundings —
organ-sized patches of plausible intensity (fat, lung, liver-like levels), not flat noise.

Two exact routes to the same field, chosen for speed: the most frequent class (the background), which spans
the image, gets all three components at once from one white field through one FFT filter with the summed
power spectrum; the heart classes, which cover a small part of the image, are rendered on their bounding
boxes with separable short-range filters plus a coarse-grid long-range field. White noise comes from
:func:`~medsynth.utils.seeding.fast_standard_normal` (a 16-bit inverse-CDF table: tails cut at ±4.3 σ).
Arrays: labels (N, H, W) uint8 canonical codes; returned images (N, H, W) float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import fft as sfft
from scipy import ndimage
from scipy.special import ndtr
from scipy.stats import norm, wasserstein_distance
from threadpoolctl import threadpool_limits

from medsynth.labels import CANONICAL, N_CLASSES
from medsynth.utils.seeding import fast_standard_normal

QUANTILE_LEVELS = 2048  # table levels over G_RANGE: nearest-level lookup error < 0.3 % of a tissue SD
_COARSE = 4  # grid factor of the long-range field
_Z_GRID = np.linspace(-10.0, 10.0, 4001)
G_RANGE = (-6.0, 6.0)  # standard-normal field values tabulated by :func:`quantile_table`


def gmm_cdf(z: np.ndarray, weights: np.ndarray, means: np.ndarray, sds: np.ndarray) -> np.ndarray:
    """CDF of a 1-D mixture at ``z`` (any shape); ``weights``/``means``/``sds`` (M,)."""
    z = np.asarray(z, dtype=np.float64)[..., None]
    return np.sum(weights * ndtr((z - means) / sds), axis=-1)


def gmm_logpdf(x: np.ndarray, weights: np.ndarray, means: np.ndarray, sds: np.ndarray) -> np.ndarray:
    """Log density of a 1-D mixture at ``x`` (any shape)."""
    x = np.asarray(x, dtype=np.float64)[..., None]
    comp = np.log(np.maximum(weights, 1e-300)) + norm.logpdf(x, means, sds)
    m = comp.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(comp - m).sum(axis=-1, keepdims=True)))[..., 0]


def quantile_table(weights: np.ndarray, means: np.ndarray, sds: np.ndarray, k: int = QUANTILE_LEVELS) -> np.ndarray:
    """The mixture's inverse CDF composed with Φ, ``Q(Φ(g))``, at ``k`` points of :data:`G_GRID` (k,) float32:
    maps a standard-normal field value ``g`` straight to a mixture value (no per-pixel Φ needed)."""
    cdf = gmm_cdf(_Z_GRID, weights, means, sds)
    levels = ndtr(np.linspace(G_RANGE[0], G_RANGE[1], k))
    cdf, idx = np.unique(cdf, return_index=True)  # strictly increasing for interpolation
    return np.interp(levels, cdf, _Z_GRID[idx]).astype(np.float32)


class LabelsToImage:
    """Deterministic renderer given fitted per-group tables.

    ``tables``: (G, C, K) standardised quantile tables, C >= the canonical classes (codes beyond them are extra
    classes such as surroundings-partition classes, :mod:`medsynth.synthesis.partition`); ``smooth_frac`` /
    ``long_frac``: (G, C) shares a, b
    (a + b <= 1) of the within-tissue variance that is short- / long-range correlated; ``length`` /
    ``long_length``: (G, C) the correlation lengths in px; ``correlated=False`` renders white texture (same
    per-tissue histograms, no spatial correlation; ~2.5× faster).
    """

    def __init__(
        self,
        tables: np.ndarray,
        smooth_frac: np.ndarray,
        length: np.ndarray,
        long_frac: np.ndarray | None = None,
        long_length: np.ndarray | None = None,
        correlated: bool = True,
    ) -> None:
        if tables.ndim != 3 or tables.shape[1] < N_CLASSES:
            raise ValueError(f"tables: expected (G, C >= {N_CLASSES}, K), got {tables.shape}")
        long_frac = np.zeros(tables.shape[:2]) if long_frac is None else long_frac
        long_length = np.full(tables.shape[:2], 12.0) if long_length is None else long_length
        for name, arr in (("smooth_frac", smooth_frac), ("length", length), ("long_frac", long_frac)):
            if arr.shape != tables.shape[:2]:
                raise ValueError(f"{name}: expected shape {tables.shape[:2]} matching tables")
        self.tables = tables.astype(np.float32)
        self.correlated = correlated  # False: white texture (fast mode), marginals unchanged
        self.long_frac = np.clip(long_frac, 0.0, 1.0).astype(np.float32)
        self.smooth_frac = np.clip(smooth_frac, 0.0, 1.0 - self.long_frac).astype(np.float32)
        self.length = np.maximum(length, 0.3).astype(np.float32)
        self.long_length = np.maximum(long_length, 0.3).astype(np.float32)
        self._filters: dict[tuple[int, int, int, int], np.ndarray] = {}

    @property
    def n_classes(self) -> int:
        """Label codes this renderer knows (C): the canonical classes, then any extra (e.g. surroundings)."""
        return int(self.tables.shape[1])

    def render(
        self,
        labels: np.ndarray,
        group: np.ndarray,
        mean: np.ndarray,
        sd: np.ndarray,
        rng: np.random.Generator,
        chunk: int = 32,
        threads: int = 1,
        post: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
    ) -> np.ndarray:
        """Images (N, H, W) for ``labels`` (N, H, W), ``group`` (N,) ints, ``mean``/``sd`` (N, C).

        Work is split into chunks of ``chunk`` images, each with its own generator seeded from ``rng`` up
        front, so the output depends on ``rng`` and ``chunk`` only — not on ``threads`` (numpy and scipy
        release the GIL in the heavy loops, so threads give real parallelism). ``post(images, rng)`` (e.g.
        the degradations) runs on each rendered chunk with that chunk's generator.
        """
        labels = np.asarray(labels)
        if labels.ndim != 3:
            raise ValueError(f"labels: expected (N, H, W), got {labels.shape}")
        n = labels.shape[0]
        c_ = self.n_classes
        if mean.shape != (n, c_) or sd.shape != (n, c_) or group.shape != (n,):
            raise ValueError(f"mean/sd/group: expected ({n}, {c_}), ({n}, {c_}), ({n},)")
        if labels.size and labels.max() >= c_:
            raise ValueError(f"labels: codes must be < {c_} (canonical, then any extra classes of the tables)")
        out = np.empty(labels.shape, dtype=np.float32)
        starts = list(range(0, n, chunk))
        seeds = rng.integers(0, 2**63 - 1, size=len(starts))

        def work(i: int) -> None:
            sl = slice(starts[i], min(n, starts[i] + chunk))
            crng = np.random.Generator(np.random.SFC64(int(seeds[i])))  # SFC64: ~30 % faster normals
            img = self._render_chunk(labels[sl], group[sl], mean[sl], sd[sl], crng)
            out[sl] = post(img, crng) if post is not None else img

        # The GEMMs here are tiny: multi-threaded BLAS only adds spin-wait overhead (2× slower measured);
        # parallelism comes from the chunk threads instead.
        with threadpool_limits(limits=1, user_api="blas"):
            if threads > 1 and len(starts) > 1:
                with ThreadPoolExecutor(max_workers=threads) as pool:
                    list(pool.map(work, range(len(starts))))
            else:
                for i in range(len(starts)):
                    work(i)
        return out

    @staticmethod
    def _short_field(white: np.ndarray, length: float) -> np.ndarray:
        """Unit-variance Gaussian low-pass (sigma ``length`` px) of white noise (N, H, W): separable, wrap."""
        radius = max(1, int(np.ceil(3.0 * length)))
        x = np.arange(-radius, radius + 1, dtype=np.float64)
        k = np.exp(-0.5 * (x / length) ** 2)
        k /= np.sqrt(np.sum(k**2))  # unit gain on variance per axis → unit variance in 2-D
        out = ndimage.correlate1d(white, k.astype(np.float32), axis=1, mode="wrap")
        return ndimage.correlate1d(out, k.astype(np.float32), axis=2, mode="wrap")

    @staticmethod
    def _long_field(noise: np.ndarray, length: float) -> np.ndarray:
        """Unit-variance long-range field on the 4× coarser grid of ``noise`` (N, h/4, w/4), by FFT; long
        correlation lengths make the coarse grid exact enough (16× cheaper). See :func:`_upsample_crop`."""
        n, hc, wc = noise.shape
        s = max(length / _COARSE, 0.5)
        f2 = (np.fft.fftfreq(hc)[:, None] ** 2 + np.fft.rfftfreq(wc)[None, :] ** 2).astype(np.float32)
        spec = sfft.rfft2(noise, workers=1)
        spec *= np.exp(-2.0 * np.pi**2 * s**2 * f2)
        coarse = sfft.irfft2(spec, s=(hc, wc), workers=1)
        coarse *= np.sqrt(4.0 * np.pi) * s  # a Gaussian low-pass of unit white noise has variance 1/(4π s²)
        return coarse.astype(np.float32)

    def _spectral_filter(self, gi: int, c: int, h: int, w: int) -> np.ndarray:
        """(h, w // 2 + 1) float32 rfft2 filter whose output from unit white noise is the class's whole field:
        power spectrum ``a·S_short + b·S_long + (1 - a - b)`` on the periodic (h, w) grid, each ``S`` the
        spectrum of a Gaussian low-pass of the fitted length normalised to unit variance on this grid."""
        key = (gi, c, h, w)
        cached = self._filters.get(key)
        if cached is not None:
            return cached
        a, b = float(self.smooth_frac[gi, c]), float(self.long_frac[gi, c])
        f2 = np.fft.fftfreq(h)[:, None] ** 2 + np.fft.fftfreq(w)[None, :] ** 2  # full grid, for the means
        power = np.full(f2.shape, max(1.0 - a - b, 0.0))
        for share, length in ((a, self.length[gi, c]), (b, self.long_length[gi, c])):
            if share > 0:
                s = np.exp(-4.0 * np.pi**2 * float(length) ** 2 * f2)
                power += share * s / s.mean()  # mean of the spectrum = variance of the field
        filt = np.sqrt(power[:, : w // 2 + 1]).astype(np.float32)
        self._filters[key] = filt
        return filt

    def _render_chunk(self, labels, group, mean, sd, rng) -> np.ndarray:
        n, h, w = labels.shape
        white = fast_standard_normal(rng, (n, h, w))
        if not self.correlated:  # fast mode: exact marginals, no spatial texture correlation
            return self._lookup(white, labels, group, mean, sd)
        white_s = fast_standard_normal(rng, (n, h, w))
        coarse_shape = (n, max(2, -(-h // _COARSE)), max(2, -(-w // _COARSE)))
        white_l = fast_standard_normal(rng, coarse_shape)
        g = np.empty((n, h, w), dtype=np.float32)
        for gi in np.unique(group):
            rows = np.flatnonzero(group == gi)
            sub = labels[rows]
            out = g if len(rows) == n else np.empty(sub.shape, dtype=np.float32)
            long_cache: dict[float, np.ndarray] = {}
            ws, wh, wl = (white_s, white, white_l) if len(rows) == n else (white_s[rows], white[rows], white_l[rows])
            masks = [sub == c for c in range(self.n_classes)]  # (cheaper than bincount, which widens to intp)
            counts = np.array([np.count_nonzero(m) for m in masks])
            # The most frequent class (the background) is rendered first over the whole image, so it needs
            # neither a mask nor a masked copy; the heart classes then overwrite their own pixels.
            first = int(np.argmax(counts))
            for c in [first, *(c for c in np.flatnonzero(counts) if c != first)]:
                a, b = float(self.smooth_frac[gi, c]), float(self.long_frac[gi, c])
                length = float(self.length[gi, c])
                if c == first:
                    mask, (y0, y1, x0, x1) = None, (0, h, 0, w)
                else:
                    mask = masks[c]
                    # Work on the class's bounding box (over the chunk) plus the filter radius: heart classes
                    # cover a small part of the image and white noise is stationary, so the crop is exact.
                    ys, xs = np.flatnonzero(mask.any(axis=(0, 2))), np.flatnonzero(mask.any(axis=(0, 1)))
                    m = int(np.ceil(3.0 * length)) + 1
                    y0, y1 = max(0, ys[0] - m), min(h, ys[-1] + m + 1)
                    x0, x1 = max(0, xs[0] - m), min(w, xs[-1] + m + 1)
                if mask is None:
                    # whole-image class: all three components from one white field in a single FFT filter
                    spec = sfft.rfft2(wh, workers=1)
                    spec *= self._spectral_filter(int(gi), int(c), h, w)
                    out[...] = sfft.irfft2(spec, s=(h, w), workers=1)
                    continue
                field = self._short_field(ws[:, y0:y1, x0:x1], length)
                field *= np.float32(np.sqrt(a))
                tmp = np.multiply(wh[:, y0:y1, x0:x1], np.float32(np.sqrt(max(1.0 - a - b, 0.0))))
                field += tmp
                if b > 0:
                    key = float(self.long_length[gi, c])
                    if key not in long_cache:
                        long_cache[key] = self._long_field(wl, key)
                    crop = _upsample_crop(long_cache[key], (h, w), (y0, y1), (x0, x1))
                    crop *= np.float32(np.sqrt(b))
                    field += crop
                np.copyto(out[:, y0:y1, x0:x1], field, where=mask[:, y0:y1, x0:x1])
            if out is not g:
                g[rows] = out
        return self._lookup(g, labels, group, mean, sd)

    def _lookup(self, g: np.ndarray, labels: np.ndarray, group: np.ndarray, mean: np.ndarray, sd: np.ndarray):
        """Final intensities from standard-normal field values ``g`` (N, H, W; overwritten)."""
        n = labels.shape[0]
        k = self.tables.shape[2]
        # Per-image tables already scaled by the image's tissue mean / SD: (n, C, K), small, so one gather per
        # pixel gives the final intensity (nearest level: K is fine enough that interpolation is not needed).
        tab = mean.astype(np.float32)[:, :, None] + sd.astype(np.float32)[:, :, None] * self.tables[group]
        scale = (k - 1) / (G_RANGE[1] - G_RANGE[0])
        g *= np.float32(scale)
        g += np.float32(0.5 - G_RANGE[0] * scale)
        np.clip(g, 0.0, k - 1, out=g)
        idx = g.astype(np.int32)
        row = labels.astype(np.int32)
        row += np.arange(0, n * self.n_classes, self.n_classes, dtype=np.int32)[:, None, None]
        row *= np.int32(k)
        idx += row
        return tab.reshape(-1)[idx]


def _upsample_crop(
    coarse: np.ndarray, shape: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int]
) -> np.ndarray:
    """Rows ``rows`` × columns ``cols`` of the periodic linear upsampling of ``coarse`` (N, hc, wc) to ``shape``,
    as two plain GEMMs (no batched matmul loop)."""
    n, hc, wc = coarse.shape
    up_h = _linear_upsampler(hc, shape[0])[rows[0] : rows[1]]
    up_w = _linear_upsampler(wc, shape[1])[cols[0] : cols[1]]
    hh, ww = up_h.shape[0], up_w.shape[0]
    flat = np.ascontiguousarray(coarse.transpose(1, 0, 2)).reshape(hc, n * wc)
    tall = (up_h @ flat).reshape(hh, n, wc).transpose(1, 0, 2).reshape(n * hh, wc)
    return (tall @ up_w.T).reshape(n, hh, ww)


@functools.lru_cache(maxsize=16)
def _linear_upsampler(n_coarse: int, n_fine: int) -> np.ndarray:
    """(n_fine, n_coarse) float32 matrix of periodic linear interpolation, cell-centred grids."""
    pos = (np.arange(n_fine) + 0.5) * n_coarse / n_fine - 0.5
    i0 = np.floor(pos).astype(int)
    frac = pos - i0
    m = np.zeros((n_fine, n_coarse), dtype=np.float32)
    m[np.arange(n_fine), i0 % n_coarse] += 1.0 - frac
    m[np.arange(n_fine), (i0 + 1) % n_coarse] += frac
    return m


def uniform_prior_images(
    labels: np.ndarray,
    rng: np.random.Generator,
    mean_range: tuple[float, float] = (0.0, 225.0 / 255.0),
    std_range: tuple[float, float] = (0.0, 25.0 / 255.0),
) -> np.ndarray:
    """SynthSeg-style baseline: one Gaussian per label with mean ~ U(mean_range), std ~ U(std_range) per image
    (SynthSeg's default priors U(0, 225) / U(0, 25) on a 0–255 scale, rescaled to the [0, 1] SliceSet scale)."""
    n = labels.shape[0]
    mean = rng.uniform(*mean_range, size=(n, N_CLASSES)).astype(np.float32)
    std = rng.uniform(*std_range, size=(n, N_CLASSES)).astype(np.float32)
    lab = labels.astype(np.intp).reshape(n, -1)
    mu = np.take_along_axis(mean, lab, axis=1).reshape(labels.shape)
    sig = np.take_along_axis(std, lab, axis=1).reshape(labels.shape)
    return mu + sig * rng.standard_normal(labels.shape, dtype=np.float32)


def tissue_wasserstein(
    real_images: np.ndarray,
    real_labels: np.ndarray,
    syn_images: np.ndarray,
    syn_labels: np.ndarray,
    min_pixels: int = 50,
) -> dict[str, float]:
    """1-D Wasserstein distance between real and synthetic intensities of each tissue class present in both.

    Images (N, 1, H, W) or (N, H, W); labels (N, H, W). Returns {class name: distance} in intensity units.
    """
    ri = np.asarray(real_images).reshape(np.asarray(real_labels).shape)
    si = np.asarray(syn_images).reshape(np.asarray(syn_labels).shape)
    out: dict[str, float] = {}
    for code, name in CANONICAL.items():
        a = ri[real_labels == code]
        b = si[syn_labels == code]
        if a.size >= min_pixels and b.size >= min_pixels:
            out[name] = float(wasserstein_distance(a, b))
    return out
