"""Learning-curve arms: the real patients each U-Net actually trains on, nested subsets, no test patient, the
mixing and augmentation records, and the paired-CI arithmetic of :func:`summarise`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from slice_sets import phantom_slices

from medsynth.config import validate
from medsynth.errors import ConfigError
from medsynth.evaluation import segmentation as seg
from medsynth.evaluation.segmentation import (
    AugmentationConfig,
    SegmentationConfig,
    patient_order,
    reach_statements,
    run_segmentation_protocol,
    summarise,
)

TINY = {"iterations": 2, "batch_size": 4, "image_size": 32, "channels": (4, 8), "progress": False, "n_bootstrap": 20}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    s = phantom_slices(tmp_path_factory.mktemp("lc") / "ph", subjects=6, seed=3)
    subj = sorted(s.meta["subject_id"].unique())
    train, test = s.subset(s.meta["subject_id"].isin(subj[:4])), s.subset(s.meta["subject_id"].isin(subj[4:]))
    syn = phantom_slices(tmp_path_factory.mktemp("lc_syn") / "ph", subjects=2, seed=21)
    half = syn.meta["subject_id"] == sorted(syn.meta["subject_id"].unique())[0]
    return train, test, {"a": syn.subset(half.to_numpy()), "b": syn.subset(~half.to_numpy())}


def _record_training(monkeypatch) -> list[dict]:
    """Wrap the training loop: what each U-Net was actually given (its training SliceSet)."""
    seen: list[dict] = []
    original = seg._train

    def spy(train, cfg, seed, name, show_bar):
        origin = train.meta["origin"].to_numpy()
        seen.append(
            {
                "name": name,
                "seed": seed,
                "real": set(train.meta.loc[origin == "real", "subject_id"]),
                "all_subjects": set(train.meta["subject_id"]),
                "n_synthetic": int((origin == "synthetic").sum()),
            }
        )
        return original(train, cfg, seed, name, show_bar)

    monkeypatch.setattr(seg, "_train", spy)
    return seen


def test_curve_trains_on_exactly_the_configured_nested_patients(data, monkeypatch):
    train, test, sets = data
    seen = _record_training(monkeypatch)
    cfg = SegmentationConfig(**TINY, seeds=[0, 1], n_real_patients=[1, 2, "all"])
    per_case = run_segmentation_protocol(train, test, sets, cfg)

    assert set(per_case["arm"]) == {"real", "real+a", "real+b", "a only", "b only"}
    test_ids = set(test.meta["subject_id"])
    train_ids = set(train.meta["subject_id"])
    # 3 curve points x 3 arms needing real data + 2 synthetic-only arms, per seed
    assert len(seen) == 2 * (3 * 3 + 2)
    for rec in seen:
        assert not rec["all_subjects"] & test_ids  # no test patient, real or as a synthetic source
        assert rec["real"] <= train_ids
    by_run = {}
    for (arm, seed, n), grp in per_case.groupby(["arm", "seed", "n_real_patients"]):
        patients = grp["train_patients"].iloc[0]
        by_run[arm, seed, n] = set(patients.split(";")) if isinstance(patients, str) and patients else set()
    for seed in (0, 1):
        for arm in ("real", "real+a", "real+b"):
            got = {n: by_run[arm, seed, n] for n in (1, 2, 4)}
            assert {n: len(p) for n, p in got.items()} == {1: 1, 2: 2, 4: 4}  # exactly as configured
            assert got[1] < got[2] < got[4] == train_ids  # nested
            assert got[2] == by_run["real", seed, 2]  # paired: same real patients in every arm of a point
        assert by_run["a only", seed, 0] == set()
    # what the per-case table says is what the U-Nets were given
    trained_real = sorted(sorted(r["real"]) for r in seen if r["real"])
    table_real = sorted(sorted(p) for p in by_run.values() if p)
    assert trained_real == table_real
    mixed = [r for r in seen if r["name"].startswith("real+")]
    assert all(r["n_synthetic"] > 0 for r in mixed)
    # the first n of one seeded order, different orders for different seeds
    orders = {tuple(patient_order(train, s)) for s in range(8)}
    assert len(orders) > 1 and all(set(o) == train_ids for o in orders)


def test_curve_rejects_too_many_patients_and_test_leaks(data):
    train, test, sets = data
    with pytest.raises(ValueError, match="n_real_patients"):
        run_segmentation_protocol(train, test, None, SegmentationConfig(**TINY, seeds=[0], n_real_patients=[5]))
    with pytest.raises(ValueError, match="test patients"):
        run_segmentation_protocol(train, train, None, SegmentationConfig(**TINY, seeds=[0]))
    with pytest.raises(ConfigError, match="n_real_patients"):
        validate(SegmentationConfig, {"n_real_patients": [2, 2]})
    with pytest.raises(ConfigError, match="n_real_patients"):
        validate(SegmentationConfig, {"n_real_patients": [0]})


def test_run_config_curve_keys_are_validated():
    from medsynth.workflows.config import RunConfig

    base = {"models": [{"family": "gmm"}]}
    ok = validate(RunConfig, {**base, "evaluation": {"segmentation": {"n_real_patients": [2, "all"]}}})
    assert ok.evaluation.segmentation.n_real_patients == [2, "all"]
    with pytest.raises(ConfigError, match="n_real_patients"):
        validate(RunConfig, {**base, "evaluation": {"segmentation": {"n_real_patients": ["most"]}}})
    with pytest.raises(ConfigError, match="params.n_real_patients"):
        validate(RunConfig, {**base, "evaluation": {"segmentation": {"params": {"n_real_patients": [2]}}}})
    with pytest.raises(ConfigError, match="mixing"):
        validate(RunConfig, {**base, "evaluation": {"segmentation": {"params": {"mixing": "blend"}}}})


def test_mixing_and_augmentation_are_recorded(data):
    train, test, sets = data
    one = {"a": sets["a"]}
    cfg = SegmentationConfig(
        **{**TINY, "batch_size": 8}, seeds=[0], arms=["real+synthetic"], mixing="per_batch", synthetic_batch_share=0.25
    )
    per_case = run_segmentation_protocol(train, test, one, cfg)
    assert (per_case["mixing"] == "per_batch").all()
    assert np.allclose(per_case["synthetic_batch_fraction"], 2 / 8)  # exactly 2 of every 8
    assert json.loads(per_case["augmentation"].iloc[0]) == AugmentationConfig().model_dump()
    pool = run_segmentation_protocol(
        train, test, one, cfg.model_copy(update={"mixing": "pool", "synthetic_ratio": 0.5, "augment": False})
    )
    assert (pool["synthetic_ratio"] == 0.5).all() and (pool["mixing"] == "pool").all()
    frac = pool["synthetic_batch_fraction"].iloc[0]
    assert 0.0 < frac < 1.0
    assert pool["augmentation"].iloc[0] == "null"
    n_real = int(pool["n_train_slices"].iloc[0] - pool["n_synthetic_slices"].iloc[0])
    assert pool["n_synthetic_slices"].iloc[0] == round(0.5 * n_real)


def test_flip_augmentation_mirrors_or_keeps():
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(16, 1, 8, 8)
    x[:, :, 2:6, 1] = 1.0  # a bar near the left edge
    y = (x[:, 0] > 0).long()
    still = AugmentationConfig(rotate_deg=0, zoom=0, shift=0, intensity_scale=0, intensity_offset=0, flip=True)
    xa, ya = seg._augment(x, y, gen, still)
    mirrored = torch.flip(y, dims=[2])
    kinds = [bool(torch.equal(ya[i], y[i])) or (bool(torch.equal(ya[i], mirrored[i])) and 2) for i in range(16)]
    assert all(kinds) and True in kinds and 2 in kinds  # each slice kept or mirrored; both happen
    assert torch.allclose(xa.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))


def _per_case(deltas: dict[tuple[str, int], np.ndarray], base: dict[int, np.ndarray]) -> pd.DataFrame:
    rows = []
    for (arm, n), delta in deltas.items():
        for seed in range(delta.shape[0]):
            for c in range(delta.shape[1]):
                ref = base[n if n else max(base)][c]
                rows.append(
                    {"arm": arm, "n_real_patients": n, "seed": seed, "case": f"c{c}", "class": "lv",
                     "dice": ref + delta[seed, c], "hd95": 10.0 - 10 * delta[seed, c]}  # fmt: skip
                )
    return pd.DataFrame(rows)


def test_paired_ci_is_against_real_at_the_same_n():
    gen = np.random.default_rng(0)
    base = {2: gen.uniform(0.4, 0.6, 6), 4: gen.uniform(0.7, 0.9, 6)}
    zeros = np.zeros((2, 6))
    step = np.tile([[0.05], [0.03]], (1, 6))  # +0.05 in seed 0, +0.03 in seed 1, every case
    noisy = gen.normal(-0.02, 0.03, (2, 6))
    per_case = _per_case(
        {("real", 2): zeros, ("real", 4): zeros, ("real+x", 2): step, ("real+x", 4): noisy, ("x only", 0): -step},
        base,
    )
    s = summarise(per_case, n_bootstrap=200).set_index(["arm", "n_real_patients", "class"])
    exact = s.loc[("real+x", 2, "lv")]
    assert exact["dice_diff_vs_real"] == pytest.approx(0.04)  # per case mean over seeds, then mean over cases
    assert exact["dice_diff_ci_low"] == pytest.approx(0.04) and exact["dice_diff_ci_high"] == pytest.approx(0.04)
    assert exact["hd95_diff_vs_real"] == pytest.approx(-0.4)
    assert exact["reference_n"] == 2
    other = s.loc[("real+x", 4, "lv")]
    assert other["dice_diff_vs_real"] == pytest.approx(noisy.mean(axis=0).mean())
    assert other["dice_diff_ci_low"] <= other["dice_diff_vs_real"] <= other["dice_diff_ci_high"]
    assert other["dice_diff_ci_low"] < other["dice_diff_ci_high"]
    syn = s.loc[("x only", 0, "lv")]
    assert syn["reference_n"] == 4 and syn["dice_diff_vs_real"] == pytest.approx(-0.04)
    assert np.isnan(s.loc[("real", 2, "lv"), "dice_diff_vs_real"])
    assert s.loc[("real", 4, "lv"), "dice_ci_low"] <= base[4].mean() <= s.loc[("real", 4, "lv"), "dice_ci_high"]


def test_reach_statements_from_the_curve():
    summary = pd.DataFrame(
        [
            {"arm": "real", "n_real_patients": 2, "class": "mean", "dice_mean": 0.6},
            {"arm": "real", "n_real_patients": 8, "class": "mean", "dice_mean": 0.8},
            {"arm": "real+x", "n_real_patients": 2, "class": "mean", "dice_mean": 0.72},
            {"arm": "real+x", "n_real_patients": 8, "class": "mean", "dice_mean": 0.82},
            {"arm": "real+x", "n_real_patients": 2, "class": "lv", "dice_mean": 0.1},
        ]
    )
    (r,) = reach_statements(summary)
    assert r["arm"] == "real+x" and r["n_real_patients"] == 2 and r["n_all"] == 8
    assert r["x_pct"] == pytest.approx(25.0)
    assert r["y_pct"] == pytest.approx(90.0) and r["real_y_pct"] == pytest.approx(75.0)
