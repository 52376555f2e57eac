"""The label-to-image renderer reproduces the two-scale texture correlation it is given, on both of its paths
(the whole-image class by one spectral filter, the heart classes on cropped separable filters plus the coarse
long-range field), and its fast normal source has the moments of a standard normal."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from medsynth.labels import N_CLASSES
from medsynth.models.gmm.model import _lag_correlation
from medsynth.synthesis.labels_to_image import LabelsToImage, quantile_table
from medsynth.utils.seeding import FAST_NORMAL_MAX, fast_standard_normal


def _identity_renderer(a: float, length: float, b: float, long_length: float) -> LabelsToImage:
    """Tables of a single standard normal, so rendered values are the field ``g`` itself (mean 0, sd 1)."""
    table = quantile_table(np.array([1.0]), np.array([0.0]), np.array([1.0]))
    tables = np.broadcast_to(table, (1, N_CLASSES, table.size)).copy()
    full = np.ones((1, N_CLASSES))
    return LabelsToImage(tables, a * full, length * full, b * full, long_length * full)


def _expected(a: float, length: float, b: float, long_length: float, d: float) -> float:
    return a * np.exp(-(d**2) / (4 * length**2)) + b * np.exp(-(d**2) / (4 * long_length**2))


@pytest.mark.parametrize("region", ["whole", "crop"])
def test_rendered_field_has_the_requested_correlation(region: str) -> None:
    a, length, b, long_length = 0.35, 2.0, 0.45, 10.0
    renderer = _identity_renderer(a, length, b, long_length)
    n, h, w = 48, 128, 128
    labels = np.zeros((n, h, w), dtype=np.uint8)
    labels[:, 24:104, 24:104] = 2  # a large heart-class square: rendered on its crop, not the whole image
    mean, sd = np.zeros((n, N_CLASSES)), np.ones((n, N_CLASSES))
    g = renderer.render(labels, np.zeros(n, dtype=np.intp), mean, sd, np.random.default_rng(0))
    mask = labels == (0 if region == "whole" else 2)
    if region == "whole":
        mask[:, 16:112, 16:112] = False  # away from the square: only background-field pixels, no seam
    v = g[mask]
    # the long-range part leaves few independent samples per image: the mean's sd here is ~0.04
    assert abs(v.mean()) < 0.15 and abs(v.std() - 1.0) < 0.06
    for d in (1, 3, 6, 12):
        r, count = _lag_correlation(g, mask, d)
        assert count > 10_000
        assert abs(r - _expected(a, length, b, long_length, d)) < 0.04, (region, d, r)


def test_fast_standard_normal_moments_and_determinism() -> None:
    x = fast_standard_normal(np.random.default_rng(1), (400, 1000))
    assert x.dtype == np.float32
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1.0) < 0.01
    assert abs(stats.skew(x.ravel())) < 0.02 and abs(stats.kurtosis(x.ravel())) < 0.05
    assert stats.kstest(x.ravel()[:20000], "norm").pvalue > 1e-3
    assert np.abs(x).max() <= FAST_NORMAL_MAX + 1e-6 and 4.0 < FAST_NORMAL_MAX < 4.5
    again = fast_standard_normal(np.random.default_rng(1), (400, 1000))
    assert np.array_equal(x, again)
    assert not np.array_equal(x, fast_standard_normal(np.random.default_rng(2), (400, 1000)))
