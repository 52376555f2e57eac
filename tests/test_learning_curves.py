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
                    {
                        "arm": arm,
                        "n_real_patients": n,
                        "seed": seed,
                        "case": f"c{c}",
                        "class": "lv",
                        "dice": ref + delta[seed, c],
                        "hd95": 10.0 - 10 * delta[seed, c],
                    }  # fmt: skip
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


# ---- mixing by sample weight --------------------------------------------------------------------------------
def test_weighted_loss_weights_each_sample():
    from monai.losses import DiceCELoss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 4, 8, 8, generator=gen, requires_grad=True)
    target = torch.randint(0, 4, (4, 8, 8), generator=gen)
    per = seg.per_sample_loss(logits, target)
    assert per.shape == (4,)
    # with equal weights the per-sample losses average to MONAI's DiceCE of the batch
    plain = DiceCELoss(to_onehot_y=True, softmax=True)(logits, target[:, None])
    assert float(per.mean().detach()) == pytest.approx(float(plain.detach()), rel=1e-5)
    w = torch.tensor([1.0, 0.25, 1.0, 3.0])
    loss = seg.weighted_loss(logits, target, w)
    assert float(loss.detach()) == pytest.approx(float((w * per.detach()).sum() / w.sum()), rel=1e-6)
    # the weight reaches each sample's gradient: sample i's gradient is w_i / sum(w) of its own loss's gradient
    (g_w,) = torch.autograd.grad(loss, logits)
    for i in range(4):
        (g_i,) = torch.autograd.grad(seg.per_sample_loss(logits, target)[i], logits)
        assert torch.allclose(g_w[i], g_i[i] * w[i] / w.sum(), atol=1e-7)


def test_weighted_mixing_weights_the_synthetic_slices_of_every_batch(data, monkeypatch):
    train, test, sets = data
    masks, losses = [], []
    make_weights, loss_of = seg.sample_weights, seg.weighted_loss

    def weights_spy(synthetic, weight):
        w = make_weights(synthetic, weight)
        masks.append((synthetic.clone(), w))
        return w

    def loss_spy(logits, target, weights):
        losses.append(weights)
        return loss_of(logits, target, weights)

    monkeypatch.setattr(seg, "sample_weights", weights_spy)
    monkeypatch.setattr(seg, "weighted_loss", loss_spy)
    cfg = SegmentationConfig(**{**TINY, "iterations": 4}, seeds=[0], arms=["real+synthetic"], mixing="weighted",
                             synthetic_weight=0.25)  # fmt: skip
    per_case = run_segmentation_protocol(train, test, {"a": sets["a"]}, cfg)
    assert len(masks) == len(losses) == 4  # every training step of the weighted arm
    for (mask, w), passed in zip(masks, losses, strict=True):
        assert torch.equal(passed, w)  # the weights reach the loss
        assert torch.all(w[mask] == 0.25) and torch.all(w[~mask] == 1.0)
    assert any(bool(m.any()) for m, _ in masks)  # synthetic slices were drawn
    assert (per_case["mixing"] == "weighted").all() and (per_case["synthetic_weight"] == 0.25).all()
    pool = run_segmentation_protocol(
        train, test, {"a": sets["a"]}, cfg.model_copy(update={"mixing": "pool", "synthetic_weight": 1.0})
    )
    assert (pool["synthetic_weight"] == 1.0).all() and len(masks) == 4  # pool: the plain DiceCE, no weights


def test_weight_and_ratio_keys_are_validated():
    from medsynth.workflows.config import RunConfig

    with pytest.raises(ConfigError, match="synthetic_weight"):
        validate(SegmentationConfig, {"synthetic_weight": 2.0})  # ignored by pool mixing: an error, not a no-op
    with pytest.raises(ConfigError, match="synthetic_weight"):
        validate(SegmentationConfig, {"mixing": "weighted", "synthetic_weight": 0})
    for bad in ([], [1, 1], [0.5, -1]):
        with pytest.raises(ConfigError, match="synthetic_ratio"):
            validate(SegmentationConfig, {"synthetic_ratio": bad})
    base = {"models": [{"family": "gmm"}]}
    params = {"mixing": "weighted", "synthetic_weight": 0.5, "synthetic_ratio": [0.5, 2]}
    ok = validate(RunConfig, {**base, "evaluation": {"segmentation": {"params": params}}})
    assert seg.ratio_sweep(ok.evaluation.segmentation.params) == [0.5, 2.0]
    assert seg.ratio_sweep({"synthetic_ratio": 2}) == []


# ---- ratio sweep -------------------------------------------------------------------------------------------
def test_ratio_sweep_runs_one_named_arm_per_ratio(data):
    train, test, sets = data
    cfg = SegmentationConfig(**TINY, seeds=[0], arms=["real", "real+synthetic"], synthetic_ratio=[0.5, 1])
    per_case = run_segmentation_protocol(train, test, {"a": sets["a"]}, cfg)
    assert set(per_case["arm"]) == {"real", "real+a x0.5", "real+a x1"}
    n_real = int(per_case.loc[per_case["arm"] == "real", "n_train_slices"].iloc[0])
    for arm, ratio in (("real+a x0.5", 0.5), ("real+a x1", 1.0)):
        rows = per_case[per_case["arm"] == arm]
        assert (rows["synthetic_ratio"] == ratio).all()
        assert (rows["n_synthetic_slices"] == round(ratio * n_real)).all()
    assert per_case.loc[per_case["arm"] == "real", "synthetic_ratio"].isna().all()
    # a flow task trains one ratio of the sweep; the arm keeps the name that says its ratio
    one = run_segmentation_protocol(train, test, {"a": sets["a"]}, cfg, only_ratios=[1])
    assert set(one["arm"]) == {"real", "real+a x1"}
    with pytest.raises(ValueError, match="synthetic_ratio"):
        run_segmentation_protocol(train, test, {"a": sets["a"]}, cfg, only_ratios=[3])


def _sweep_per_case() -> pd.DataFrame:
    gen = np.random.default_rng(1)
    base = {6: gen.uniform(0.5, 0.7, 8)}
    best = gen.normal(0.05, 0.01, (2, 8))
    deltas = {
        ("real", 6): np.zeros((2, 8)),
        ("real+g x0.5", 6): gen.normal(0.0, 0.03, (2, 8)),
        ("real+g x1", 6): best,
        ("real+g x2", 6): best - 0.002,  # well inside the best arm's CI
        ("real+g x4", 6): np.full((2, 8), -0.05),
    }
    pc = _per_case(deltas, base)
    ratio = pc["arm"].str.extract(r" x([\d.]+)$")[0].astype(float)
    return pc.assign(synthetic_ratio=ratio, synthetic_set=np.where(ratio.notna(), "g", ""))


def test_best_ratio_is_found_and_said_in_the_report():
    from medsynth.evaluation import report as rp

    summary = summarise(_sweep_per_case(), n_bootstrap=200)
    (best,) = seg.best_ratios(summary).to_dict("records")
    assert best["synthetic_set"] == "g" and best["n_real_patients"] == 6
    assert best["best_ratio"] == 1.0 and best["best_arm"] == "real+g x1"
    assert 0.03 < best["dice_diff"] < 0.07
    assert best["overlapping"].split(";") == ["2"]  # x2 is within its CI; x0.5 and x4 are not
    assert best["ratios"] == "0.5;1;2;4"
    text = rp.segmentation_paragraph(summary)
    assert "ratio 1 (real+g x1" in text and "overlaps that of ratio 2" in text
    curve, _ = rp.segmentation_tables(summary)
    cells = dict(zip(curve["arm"], curve["synthetic ratio"], strict=True))
    assert cells["real+g x1"].startswith("1 (best at this n") and "2" in cells["real+g x1"]
    assert cells["real+g x4"] == "4" and cells["real"] == "–"
    # without a sweep: no ratio sentences, no ratio column
    plain = summarise(_sweep_per_case().query("arm in ['real', 'real+g x1']"), n_bootstrap=50)
    assert seg.best_ratios(plain).empty and "ratio sweep" not in rp.segmentation_paragraph(plain)
    assert "synthetic ratio" not in rp.segmentation_tables(plain)[0].columns


def test_protocol_record_of_a_weighted_sweep():
    from medsynth.workflows.evaluate import _protocol_lines

    params = {"mixing": "weighted", "synthetic_weight": 0.5, "synthetic_ratio": [0.5, 2], "iterations": 10}
    stage = {"params": params, "seeds": [0], "n_real_patients": ["all"]}
    pc = _sweep_per_case().query("synthetic_ratio in [0.5, 2]")
    pc = pc.assign(arm_kind="real+synthetic", synthetic_batch_fraction=np.where(pc["synthetic_ratio"] == 2, 0.6, 0.3))
    lines, table = _protocol_lines(stage, pc, 8)
    row = table.iloc[0]
    assert json.loads(row["synthetic_ratio"]) == [0.5, 2.0] and row["mixing"] == "weighted"
    assert row["synthetic_weight"] == 0.5
    assert json.loads(row["synthetic_batch_share_expected"]) == pytest.approx([0.5 / 1.5, 2 / 3])
    assert json.loads(row["synthetic_batch_share_measured"]) == pytest.approx([0.3, 0.6])  # per ratio
    text = " ".join(lines)
    assert "sweep" in text and "weighted 0.5 times" in text and "batches 30%, 60%" in text
