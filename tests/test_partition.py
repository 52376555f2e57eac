"""Surroundings partition: determinism, coverage, heart labels untouched, class order, attachment, real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from slice_sets import acdc_slices, phantom_slices

from medsynth.data.slices import SliceSet
from medsynth.labels import BACKGROUND, N_CLASSES
from medsynth.synthesis.partition import (
    HEART,
    OUTSIDE,
    attach_partition,
    extend_labels,
    partition_slices,
    surroundings_code,
    surroundings_partition,
)
from medsynth.transforms.label_deformation import RandomLabelDeformation

K = 5


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> SliceSet:
    return phantom_slices(tmp_path_factory.mktemp("phantom") / "p", subjects=4)


def _check_partition(part: np.ndarray, labels: np.ndarray, k: int) -> None:
    """Every background pixel has a class 1..k; every heart pixel is 0 (the heart is not overwritten)."""
    assert part.dtype == np.uint8 and part.shape == labels.shape
    bg = labels == BACKGROUND
    assert np.all(part[~bg] == HEART)
    assert np.all((part[bg] >= 1) & (part[bg] <= k))


def _check_order(part: np.ndarray, image: np.ndarray, k: int) -> None:
    """Body classes 2..k ascend in mean intensity; the outside class touches the border and is darker than
    the body as a whole."""
    means = [image[part == c].mean() for c in range(2, k + 1) if (part == c).any()]
    assert np.all(np.diff(means) > 0)
    out = part == OUTSIDE
    if out.any():
        body = part >= 2
        assert image[out].mean() < image[body].mean()
        comp, _ = ndimage.label(out, structure=np.ones((3, 3), bool))
        edge = set(np.unique(np.concatenate([comp[0], comp[-1], comp[:, 0], comp[:, -1]]))) - {0}
        assert set(np.unique(comp[out])) <= edge  # every outside region reaches the image border


def test_partition_deterministic_and_covers(phantom: SliceSet) -> None:
    img, lab = phantom.images[:, 0], phantom.labels
    a = partition_slices(img, lab, K, seed=3)
    b = partition_slices(img, lab, K, seed=3)
    assert a.tobytes() == b.tobytes()
    for i in range(len(lab)):
        _check_partition(a[i], lab[i], K)
        _check_order(a[i], img[i], K)


def test_partition_on_phantom_finds_the_body_outline(phantom: SliceSet) -> None:
    """The phantom's body ends inside the field of view: the outside class is found and is the darkest."""
    part = partition_slices(phantom.images, phantom.labels, K)
    found = [(p == OUTSIDE).mean() for p in part]
    assert np.mean(np.array(found) > 0.02) > 0.8
    for p, im in zip(part, phantom.images[:, 0], strict=True):
        if (p == OUTSIDE).any():
            assert im[p == OUTSIDE].mean() <= min(im[p == c].mean() for c in range(2, K + 1) if (p == c).any())


def test_partition_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="n_classes"):
        surroundings_partition(np.zeros((8, 8)), np.zeros((8, 8), np.uint8), n_classes=1)
    with pytest.raises(ValueError, match="image/labels"):
        surroundings_partition(np.zeros((8, 8)), np.zeros((8, 9), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        surroundings_partition(np.full((8, 8), np.nan), np.zeros((8, 8), np.uint8))


def test_attach_partition_to_deformed_labels(phantom: SliceSet) -> None:
    bank = partition_slices(phantom.images, phantom.labels, K)
    rng = np.random.default_rng(0)
    deform = RandomLabelDeformation(rotate_deg=30, scale=0.2, translate_px=8)
    labels = np.stack([deform(phantom.labels[i % len(phantom)], rng)[0] for i in range(12)])
    a = attach_partition(labels, bank, np.random.default_rng(5))
    b = attach_partition(labels, bank, np.random.default_rng(5))
    c = attach_partition(labels, bank, np.random.default_rng(6))
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()
    for i in range(len(labels)):
        _check_partition(a[i], labels[i], K)
    # a bank of another size is resampled
    small = attach_partition(labels[:, ::2, ::2], bank, np.random.default_rng(1))
    for i in range(len(labels)):
        _check_partition(small[i], labels[i, ::2, ::2], K)
    with pytest.raises(ValueError, match="index"):
        attach_partition(labels, bank, rng, index=np.full(len(labels), len(bank)))


def test_extend_labels_keeps_heart_codes(phantom: SliceSet) -> None:
    lab = phantom.labels
    part = partition_slices(phantom.images, lab, K)
    ext = extend_labels(lab, part)
    heart = lab != BACKGROUND
    np.testing.assert_array_equal(ext[heart], lab[heart])
    np.testing.assert_array_equal(ext[~heart], surroundings_code(part[~heart]))
    assert ext[~heart].min() >= N_CLASSES


@pytest.mark.realdata
def test_partition_on_real_acdc(acdc_root: Path, tmp_path: Path) -> None:
    s = acdc_slices(acdc_root, tmp_path, n_patients=2)
    idx = np.linspace(0, len(s) - 1, 8).astype(int)
    part = partition_slices(s.images[idx], s.labels[idx], K)
    for i, j in enumerate(idx):
        _check_partition(part[i], s.labels[j], K)
        _check_order(part[i], s.images[j, 0], K)
    # organ-sized regions, not salt-and-pepper: few connected regions per class
    n_regions = [ndimage.label(part[i] == c)[1] for i in range(len(idx)) for c in range(1, K + 1)]
    assert np.median(n_regions) <= 10


@pytest.mark.realdata
def test_partition_on_real_emidec(emidec_png_root: Path, tmp_path: Path) -> None:
    from medsynth.data.layouts import build_manifest
    from medsynth.data.manifest import write_manifest
    from medsynth.data.preprocess import PreprocessConfig, load_slices

    df = build_manifest("png-slices", emidec_png_root)
    keep = sorted(set(df["subject_id"]))[:3]
    path = write_manifest(df[df["subject_id"].isin(keep)], tmp_path / "m.csv", data_root=emidec_png_root)
    s = load_slices(path, data_root=emidec_png_root, cfg=PreprocessConfig(spacing_mm=None, size=128))
    part = partition_slices(s.images, s.labels, K)
    for i in range(len(s)):
        _check_partition(part[i], s.labels[i], K)
        _check_order(part[i], s.images[i, 0], K)


def test_match_bank_prefers_a_matching_heart(phantom: SliceSet) -> None:
    """With top=1 a map whose own partition is in the bank gets it back; the draw is seeded."""
    from medsynth.synthesis.partition import match_bank

    bank = partition_slices(phantom.images, phantom.labels, K)
    idx = match_bank(phantom.labels, bank, np.random.default_rng(0), top=1)
    own = np.mean(idx == np.arange(len(bank)))
    assert own > 0.8
    a = match_bank(phantom.labels, bank, np.random.default_rng(3), top=4)
    b = match_bank(phantom.labels, bank, np.random.default_rng(3), top=4)
    np.testing.assert_array_equal(a, b)
    sub = match_bank(phantom.labels, bank, np.random.default_rng(3), top=2, candidates=np.arange(3))
    assert set(sub.tolist()) <= {0, 1, 2}
