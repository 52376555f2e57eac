"""Memorisation check: exact and lightly perturbed copies of training images are flagged, held-out real
images are not (phantom, and real ACDC when ``MEDSYNTH_TEST_DATA`` is set)."""

from __future__ import annotations

import numpy as np
import pytest

from medsynth.data.slices import SliceSet
from medsynth.evaluation.features import random_cnn
from medsynth.evaluation.memorisation import MemorisationConfig, check_memorisation


def _split3(s: SliceSet) -> tuple[SliceSet, SliceSet, SliceSet]:
    """Patient-level train / baseline test / other held-out."""
    subj = s.meta["subject_id"].to_numpy()
    u = np.unique(subj)
    return s.subset(np.isin(subj, u[::2])), s.subset(np.isin(subj, u[1::4])), s.subset(np.isin(subj, u[3::4]))


@pytest.fixture(scope="module", params=["phantom", "acdc"])
def sets(request, tmp_path_factory):
    from slice_sets import acdc_slices, phantom_slices

    if request.param == "phantom":
        s = phantom_slices(tmp_path_factory.mktemp("phantom") / "ph", subjects=8, seed=3)
    else:
        s = acdc_slices(request.getfixturevalue("acdc_root"), tmp_path_factory.mktemp("acdc"), n_patients=8)
    return _split3(s)


def _perturbed(train: SliceSet, n: int = 12) -> dict[str, np.ndarray]:
    g = np.random.default_rng(0)
    x = train.images[np.linspace(0, len(train) - 1, n).astype(int)]
    return {
        "exact": x.copy(),
        "noise": x + 0.03 * g.standard_normal(x.shape).astype(np.float32),
        "intensity": x * 1.1 + 0.05,
        "noise+intensity": (x + 0.02 * g.standard_normal(x.shape).astype(np.float32)) * 0.9,
    }


def test_copies_flagged_heldout_not(sets):
    train, test, other = sets
    for name, syn in _perturbed(train).items():
        res = check_memorisation(syn, train, test)
        assert res.per_sample["flagged"].all(), name
        assert (res.per_sample["ratio"] < 0.5).all(), name
    held = check_memorisation(other, train, test)
    assert held.summary["fraction_flagged"] == 0.0
    assert 0.5 < held.summary["median_ratio"] < 2.0  # held-out data sits at the baseline


def test_nn_index_points_at_the_copied_image(sets):
    train, test, _ = sets
    idx = np.array([3, 0, len(train) - 1])
    res = check_memorisation(train.images[idx], train, test)
    np.testing.assert_array_equal(res.per_sample["nn_index"].to_numpy(), idx)
    assert np.allclose(res.per_sample["distance"], 0.0, atol=1e-6)


def test_feature_space_and_config_validation(sets):
    train, test, other = sets
    ext = random_cnn(seed=0, widths=(8, 16, 32), input_size=64)
    cfg = MemorisationConfig(space="features")
    res = check_memorisation(train.images[:5], train, test, cfg, extractor=ext)
    assert res.per_sample["flagged"].all()
    with pytest.raises(ValueError, match="extractor"):
        check_memorisation(train.images[:5], train, test, cfg)
    with pytest.raises(ValueError, match="space"):
        check_memorisation(train.images[:5], train, test, MemorisationConfig(space="pixel"))
