"""Fidelity metrics: stable Fréchet distance, KID, PRDC, MS-SSIM diversity, and the validity checks.

Validity checks run on real ACDC held-out slices when ``MEDSYNTH_TEST_DATA`` is set and on phantom-like
synthetic shapes otherwise.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.ndimage import gaussian_filter
from slice_sets import acdc_slices, phantom_slices

from medsynth.data.slices import SliceSet
from medsynth.evaluation.features import random_cnn
from medsynth.evaluation.fidelity import (
    RESULT_COLUMNS,
    FidelityConfig,
    compute_fidelity,
    frechet_distance,
    frechet_from_stats,
    frechet_from_stats_scipy,
    gaussian_stats,
    kid,
    mmd2_unbiased,
    pairwise_ms_ssim,
    prdc,
    split_halves,
)


def shapes(n_subjects: int = 10, n_slices: int = 6, size: int = 64, seed: int = 0) -> SliceSet:
    """Cardiac-like shapes (LV disk, MYO ring, RV crescent) with per-subject geometry and noise."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    imgs, labs, rows = [], [], []
    for p in range(n_subjects):
        cy, cx = 0.5 + g.uniform(-0.08, 0.08, 2)
        r0, wall, bright = g.uniform(0.10, 0.16), g.uniform(0.04, 0.06), g.uniform(0.7, 1.0)
        for z in range(n_slices):
            r = r0 * (1 - 0.5 * z / n_slices)
            d = np.hypot(yy - cy, xx - cx)
            lab = np.zeros((size, size), np.uint8)
            lab[(np.hypot(yy - cy, xx - (cx - r - wall - 0.06)) < r + 0.05) & (d > r + wall + 0.01)] = 3
            lab[d < r + wall] = 2
            lab[d < r] = 1
            img = np.choose(lab, [0.15, bright, 0.35, bright * 0.9]) + 0.08 * g.standard_normal((size, size))
            imgs.append(img[None].astype(np.float32))
            labs.append(lab)
            rows.append({"subject_id": f"s{seed}-{p:03d}", "case": f"s{seed}-{p:03d}", "slice_index": str(z)})
    return SliceSet(np.stack(imgs), np.stack(labs), pd.DataFrame(rows))


@pytest.fixture(scope="module", params=["phantom", "acdc"])
def real_set(request, tmp_path_factory) -> SliceSet:
    if request.param == "phantom":
        return phantom_slices(tmp_path_factory.mktemp("phantom") / "ph")
    acdc_root = request.getfixturevalue("acdc_root")
    return acdc_slices(acdc_root, tmp_path_factory.mktemp("acdc"))


@pytest.fixture(scope="module")
def extractor():
    return random_cnn(seed=0)


def _halves(s: SliceSet) -> tuple[SliceSet, SliceSet]:
    ia, ib = split_halves(len(s), s.meta["subject_id"].to_numpy(), seed=0)
    return s.subset(ia), s.subset(ib)


# ------------------------------------------------------------------------------------- Fréchet distance


@pytest.mark.parametrize("dim,n", [(8, 50), (64, 400), (256, 2000)])
def test_stable_fd_agrees_with_scipy_sqrtm(dim, n):
    g = np.random.default_rng(dim)
    a = g.standard_normal((n, dim))
    b = g.standard_normal((n, dim)) @ g.standard_normal((dim, dim)) * 0.3 + 0.2
    s1, s2 = gaussian_stats(a), gaussian_stats(b)
    ours, ref = frechet_from_stats(*s1, *s2), frechet_from_stats_scipy(*s1, *s2)
    assert abs(ours - ref) <= 1e-6 * abs(ref)
    from monai.metrics import FIDMetric

    monai_fd = float(FIDMetric()(torch.from_numpy(b), torch.from_numpy(a)))
    assert abs(ours - monai_fd) <= 1e-6 * abs(monai_fd)


def test_low_rank_route_matches_covariance_route():
    g = np.random.default_rng(1)
    a, b = g.standard_normal((30, 64)), g.standard_normal((40, 64)) * 1.5 + 0.1  # fewer samples than dims
    ours = frechet_distance(a, b)  # nuclear-norm route
    ref = frechet_from_stats_scipy(*gaussian_stats(a), *gaussian_stats(b))
    assert ours == pytest.approx(ref, rel=1e-6)
    # singular covariances through the D x D route (Cholesky or symmetric-root fallback) agree too
    assert frechet_from_stats(*gaussian_stats(a), *gaussian_stats(b)) == pytest.approx(ours, rel=1e-6)


def test_fd_of_set_with_itself_is_zero(real_set, extractor):
    f = extractor(real_set.images)
    assert frechet_distance(f, f) <= 1e-9 * np.trace(gaussian_stats(f)[1])
    assert frechet_distance(f, f + 1.0) == pytest.approx(f.shape[1], rel=1e-6)  # pure mean shift


def test_real_halves_far_closer_than_noise(real_set, extractor):
    a, b = _halves(real_set)
    fa, fb = extractor(a.images), extractor(b.images)
    noise = np.random.default_rng(0).random(b.images.shape).astype(np.float32)
    assert frechet_distance(fa, fb) * 10 < frechet_distance(fa, extractor(noise))


@pytest.mark.parametrize("kind", ["blur", "noise"])
def test_fd_grows_monotonically_with_degradation(real_set, extractor, kind):
    # reference = the undegraded held-out slices themselves, so only the degradation moves FD
    _, held_out = _halves(real_set)
    f_ref = extractor(held_out.images)
    g = np.random.default_rng(1)
    eps = g.standard_normal(held_out.images.shape).astype(np.float32)
    levels = (0.5, 1.0, 2.0, 4.0) if kind == "blur" else (0.05, 0.1, 0.2, 0.4)
    fds = []
    for lv in levels:
        x = gaussian_filter(held_out.images, (0, 0, lv, lv)) if kind == "blur" else held_out.images + lv * eps
        fds.append(frechet_distance(f_ref, extractor(x)))
    assert fds[0] > 0 and all(np.diff(fds) > 0), fds


# ------------------------------------------------------------------------------------- KID / PRDC / MS-SSIM


def test_unbiased_mmd_matches_monai_linear_kernel():
    from monai.metrics import MMDMetric

    g = np.random.default_rng(0)
    x, y = g.standard_normal((30, 5)), g.standard_normal((30, 5)) + 0.5
    ours = mmd2_unbiased(x @ x.T, y @ y.T, x @ y.T)
    ref = float(MMDMetric()(torch.from_numpy(x), torch.from_numpy(y)))
    assert ours == pytest.approx(ref, rel=1e-9)


def test_kid_separates_and_adapts_to_small_sets():
    g = np.random.default_rng(0)
    a, b = g.standard_normal((300, 16)), g.standard_normal((300, 16))
    same, _ = kid(a, b, n_subsets=20)
    diff, _ = kid(a, b + 1.0, n_subsets=20)
    assert abs(same) < 0.05 * diff
    small, vals = kid(a[:7], b[:5] + 1.0, subset_size=1000, n_subsets=10)  # subset size drops to 5
    assert np.isfinite(small) and len(vals) == 10 and small > 0


def test_prdc_identical_and_disjoint():
    g = np.random.default_rng(0)
    a = g.standard_normal((200, 8))
    same = prdc(a, a.copy(), k=5)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    far = prdc(a, a + 100.0, k=5)
    assert far["precision"] == far["recall"] == far["coverage"] == far["density"] == 0.0
    half = prdc(a, a[:, :] * np.r_[[1.0] * 7, [0.0]][None], k=5)  # collapsed: high precision, lower recall
    assert half["recall"] < same["recall"]


def test_ms_ssim_diversity_orders_sets():
    s = shapes(6, 4, 64, seed=2)
    identical = np.repeat(s.images[:1], 8, axis=0)
    assert pairwise_ms_ssim(identical, n_pairs=10, size=64).mean() == pytest.approx(1.0, abs=1e-5)
    noise = np.random.default_rng(0).random((8, 1, 64, 64)).astype(np.float32)
    div_real = pairwise_ms_ssim(s.images, n_pairs=20, size=64).mean()
    assert pairwise_ms_ssim(noise, n_pairs=20, size=64).mean() < div_real < 1.0


# ------------------------------------------------------------------------------------- driver


def test_compute_fidelity_table(extractor):
    real = shapes(8, 4, 64, seed=3)
    syn_good = shapes(6, 4, 64, seed=4)
    syn_bad = SliceSet(
        gaussian_filter(syn_good.images, (0, 0, 3, 3)), syn_good.labels, syn_good.meta
    )  # over-smooth generator
    cfg = FidelityConfig(n_bootstrap=20, kid_n_subsets=10, ms_ssim_pairs=20)
    good = compute_fidelity(real, syn_good, extractor, cfg).set_index("metric")
    bad = compute_fidelity(real, syn_bad, extractor, cfg).set_index("metric")
    assert list(good.reset_index().columns) == list(RESULT_COLUMNS)
    assert {"fd", "rfd", "kid", "precision", "recall", "density", "coverage", "ms_ssim_synthetic"} <= set(good.index)
    feature_rows = good.drop(index=["ms_ssim_synthetic", "ms_ssim_real"])
    assert (feature_rows["extractor_hash"] == extractor.hash).all() and (good["n_real"] == 32).all()
    assert good.loc["ms_ssim_real", "extractor"] == "images" and good["extractor_hash"].str.len().gt(0).all()
    assert good.loc["fd", "value"] < bad.loc["fd", "value"]
    assert good.loc["rfd", "value"] < bad.loc["rfd", "value"]
    finite = good.dropna(subset=["ci_low"])
    assert (finite["ci_low"] <= finite["ci_high"]).all()
    again = compute_fidelity(real, syn_good, extractor, cfg)
    pd.testing.assert_frame_equal(again.set_index("metric"), good)  # seeded → reproducible


def test_cli_fidelity(tmp_path, capsys):
    from medsynth.cli.main import main
    from medsynth.phantom import generate_dataset

    kw = {"contrast": "cine", "shape": (48, 48, 6), "spacing": (3.0, 3.0, 8.0)}
    real = generate_dataset(tmp_path / "real", subjects=4, scanner="A", seed=0, **kw)
    syn = generate_dataset(tmp_path / "syn", subjects=2, scanner="B", seed=3, **kw)
    cfg = tmp_path / "fid.yaml"
    cfg.write_text("n_bootstrap: 10\nkid_n_subsets: 5\nms_ssim_pairs: 10\nms_ssim_size: 48\n")
    out = tmp_path / "out"
    args = ["evaluate", "fidelity", "--real", str(real), "--synthetic", str(syn), "--config", str(cfg), "--size", "48"]
    assert main([*args, "--out", str(out)]) == 0
    table = pd.read_csv(out / "fidelity.csv")
    assert list(table.columns) == list(RESULT_COLUMNS)
    assert {"fd", "rfd", "kid", "precision", "recall", "density", "coverage", "memorised_fraction"} <= set(
        table["metric"]
    )
    assert table["extractor_hash"].notna().all() and (table["n_synthetic"] > 0).all()
    assert (out / "report.md").is_file() and (out / "memorisation.csv").is_file()
    assert main([*args, "--out", str(tmp_path / "bad"), "--extractor", str(tmp_path / "nope")]) == 2
    assert "not an extractor folder" in capsys.readouterr().err
