"""Downstream segmentation protocol: U-Net on the phantom, per-patient 3-D metrics, arms × seeds tables."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from slice_sets import phantom_slices

from medsynth.config import validate
from medsynth.data.slices import SliceSet
from medsynth.errors import ConfigError
from medsynth.evaluation import segmentation as seg
from medsynth.evaluation.segmentation import (
    SegmentationConfig,
    build_arm,
    per_seed_table,
    run_segmentation_protocol,
    select_patients,
    summarise,
)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> tuple[SliceSet, SliceSet]:

    s = phantom_slices(tmp_path_factory.mktemp("phantom") / "ph", subjects=8, seed=0)
    subj = s.meta["subject_id"].unique()
    return s.subset(s.meta["subject_id"].isin(subj[:5])), s.subset(s.meta["subject_id"].isin(subj[5:]))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> SliceSet:

    return phantom_slices(tmp_path_factory.mktemp("phantom_syn") / "ph", subjects=3, seed=11)


@pytest.mark.slow
def test_unet_on_phantom_reaches_dice(phantom):
    train, test = phantom
    cfg = SegmentationConfig(iterations=200, batch_size=8, seeds=[0], arms=["real"], num_threads=1)
    per_case = run_segmentation_protocol(train, test, None, cfg)
    by_class = per_case.groupby("class")["dice"].mean()
    assert set(by_class.index) >= {"lv", "myo", "rv"}
    assert by_class.mean() > 0.7, by_class.to_dict()
    assert (by_class > 0.6).all(), by_class.to_dict()
    assert per_case["case"].nunique() == test.meta["case"].nunique()  # one row per test volume and class
    assert (per_case["hd95_unit"] == "mm").all() and per_case["hd95"].notna().any()


def test_arms_by_seeds_table(phantom, synthetic):
    train, test = phantom
    cfg = SegmentationConfig(
        iterations=3,
        batch_size=4,
        image_size=32,
        channels=(4, 8),
        seeds=[0, 1, 2],
        n_train_patients=2,
        synthetic_ratio=0.5,
        n_bootstrap=50,
        num_threads=1,
    )
    per_case = run_segmentation_protocol(train, test, synthetic, cfg)
    table = per_seed_table(per_case)
    classes = sorted(per_case["class"].unique())
    assert len(table) == 3 * 3 * len(classes)
    assert set(table["arm"]) == {"real", "real+synthetic", "synthetic"}
    assert {"dice", "hd95", "n_cases"} <= set(table.columns)
    real_rows = table[table["arm"] == "real"]
    assert (real_rows["n_real_patients"] == 2).all()
    summary = summarise(per_case, n_bootstrap=50).set_index(["arm", "class"])
    assert len(summary) == 3 * (len(classes) + 1)  # + the 'mean' class
    assert summary.loc[("real", "mean"), "n_seeds"] == 3
    assert np.isnan(summary.loc[("real", "mean"), "dice_diff_vs_real"])
    other = summary.loc[("real+synthetic", "mean")]
    assert other["dice_diff_ci_low"] <= other["dice_diff_vs_real"] <= other["dice_diff_ci_high"]
    # no synthetic set: only the real arm runs
    only_real = run_segmentation_protocol(train, test, None, cfg.model_copy(update={"seeds": [0]}))
    assert set(only_real["arm"]) == {"real"}


def test_patient_draw_and_arm_composition(phantom, synthetic):
    train, _ = phantom
    a, b = select_patients(train, 2, seed=0), select_patients(train, 2, seed=0)
    assert a.meta["subject_id"].nunique() == 2 and a.meta.equals(b.meta)
    draws = {tuple(sorted(select_patients(train, 2, seed=s).meta["subject_id"].unique())) for s in range(6)}
    assert len(draws) > 1
    assert len(select_patients(train, None, 0)) == len(train)
    mixed = build_arm("real+synthetic", a, synthetic, 0.5, seed=0)
    assert len(mixed) == len(a) + round(0.5 * len(a))
    assert (mixed.meta["origin"] == "synthetic").sum() == round(0.5 * len(a))
    only_syn = build_arm("synthetic", a, synthetic, 1.0, 0)
    assert only_syn.images is synthetic.images and (only_syn.meta["origin"] == "synthetic").all()
    with pytest.raises(ValueError, match="arm"):
        build_arm("bogus", a, synthetic, 1.0, 0)
    with pytest.raises(ValueError, match="synthetic"):
        build_arm("synthetic", a, None, 1.0, 0)


def test_per_case_metrics_perfect_and_shifted(phantom, monkeypatch):
    _, test = phantom
    size = 32
    _, gt = seg._resize(test.images, test.labels, size)
    gt = gt.numpy().astype(np.uint8)
    monkeypatch.setattr(seg, "_predict_inputs", lambda model, x: gt)
    perfect = seg.evaluate_cases(None, test, SegmentationConfig(image_size=size))
    assert np.allclose(perfect["dice"].dropna(), 1.0) and np.allclose(perfect["hd95"].dropna(), 0.0)
    # record spacing: target 3 mm on a 64-px grid resized to 32 px → 6 mm pixels
    rec = json.loads(test.meta["record"].iloc[0])
    assert rec["target_spacing"] == [3.0, 3.0]
    shifted = np.roll(gt, 2, axis=2)
    monkeypatch.setattr(seg, "_predict_inputs", lambda model, x: shifted)
    worse = seg.evaluate_cases(None, test, SegmentationConfig(image_size=size))
    assert (worse["dice"].dropna() < 1.0).all()
    assert np.allclose(worse.loc[worse["class"] == "lv", "hd95"].dropna(), 12.0)  # 2 px × 6 mm


def test_config_rejects_unknown_key():
    with pytest.raises(ConfigError, match="iteratons"):
        validate(SegmentationConfig, {"iteratons": 5})
    with pytest.raises(ValueError, match="arms"):
        run_segmentation_protocol(*_tiny(), None, SegmentationConfig(arms=["real", "nope"]))


def _tiny() -> tuple[SliceSet, SliceSet]:
    import pandas as pd

    img = np.zeros((2, 1, 16, 16), np.float32)
    lab = np.zeros((2, 16, 16), np.uint8)
    lab[:, 4:8, 4:8] = 1
    meta = pd.DataFrame({"subject_id": ["a", "b"], "case": ["a", "b"], "slice_index": ["0", "0"]})
    return SliceSet(img, lab, meta), SliceSet(img, lab, meta)


@pytest.mark.slow
def test_acdc_real_only_protocol(acdc_root, tmp_path):
    from slice_sets import acdc_slices

    s = acdc_slices(acdc_root, tmp_path, n_patients=5)
    subj = sorted(s.meta["subject_id"].unique())
    train, test = s.subset(s.meta["subject_id"].isin(subj[:3])), s.subset(s.meta["subject_id"].isin(subj[3:]))
    cfg = SegmentationConfig(iterations=150, batch_size=8, seeds=[0], arms=["real"], n_train_patients=2)
    per_case = run_segmentation_protocol(train, test, None, cfg)
    assert per_case["case"].nunique() == test.meta["case"].nunique()  # ED and ES volumes of 2 patients
    assert set(per_case["class"]) == {"lv", "myo", "rv"} and (per_case["hd95_unit"] == "mm").all()
    assert per_case.loc[per_case["class"] == "lv", "dice"].mean() > 0.3  # far above chance after 150 steps


def _phantom_manifest(tmp_path, name: str, subjects: int, seed: int):
    from medsynth.phantom import generate_dataset

    return generate_dataset(
        tmp_path / name,
        subjects=subjects,
        contrast="cine",
        scanner="A",
        seed=seed,
        shape=(48, 48, 6),
        spacing=(3.0, 3.0, 8.0),
    )


def test_cli_segmentation(tmp_path):
    import pandas as pd

    from medsynth.cli.main import main

    real = _phantom_manifest(tmp_path, "real", 4, 0)
    syn = _phantom_manifest(tmp_path, "syn", 2, 9)
    cfg = tmp_path / "seg.yaml"
    cfg.write_text(
        "iterations: 2\nseeds: [0, 1]\nimage_size: 32\nchannels: [4, 8]\nn_bootstrap: 20\ntest_fraction: 0.5\n"
    )
    out = tmp_path / "out"
    rc = main(
        [
            "evaluate",
            "segmentation",
            "--real",
            str(real),
            "--synthetic",
            str(syn),
            "--out",
            str(out),
            "--config",
            str(cfg),
            "--size",
            "32",
        ]
    )
    assert rc == 0
    table = pd.read_csv(out / "segmentation.csv")
    assert {"arm", "seed", "class", "dice", "hd95"} <= set(table.columns)
    assert len(table) == 3 * 2 * table["class"].nunique()
    summary = pd.read_csv(out / "summary.csv")
    assert {"dice_mean", "dice_std", "dice_diff_vs_real", "dice_diff_ci_low"} <= set(summary.columns)
    assert (out / "report.md").is_file() and (out / "dice_boxes.png").is_file()
    cfg.write_text("iteratons: 2\n")
    assert (
        main(["evaluate", "segmentation", "--real", str(real), "--out", str(tmp_path / "o2"), "--config", str(cfg)])
        == 2
    )
    assert not (tmp_path / "o2").exists()


def test_training_is_deterministic_when_runs_share_a_process(tmp_path) -> None:
    """Thread-pool task runners train several U-Nets at once; each must still depend on its seed alone."""
    from concurrent.futures import ThreadPoolExecutor

    from medsynth.evaluation.segmentation import SegmentationConfig, train_unet

    s = phantom_slices(tmp_path / "ph", subjects=3, seed=1)
    cfg = SegmentationConfig(iterations=6, image_size=32, progress=False)

    def weights(seed: int) -> list:
        model, _ = train_unet(s, cfg, seed)
        return [v.clone() for v in model.state_dict().values()]

    alone = [weights(0), weights(1)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        together = list(pool.map(weights, [0, 1]))
    for a, b in zip(alone, together, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_concurrent_trainings_write_whole_attributable_lines(phantom, monkeypatch) -> None:
    """Two U-Net seeds trained side by side (as the thread-pool task runner does): no progress bar fragments
    (carriage returns, escape codes) reach the stream, and every line names the training it belongs to."""
    import io
    import logging
    import re
    import sys
    import threading

    from medsynth.evaluation.segmentation import train_unet
    from medsynth.utils import progress

    train, _ = phantom
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)  # where a tqdm bar would draw
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)  # a progress line after every step
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(message)s"))
    medsynth_log = logging.getLogger("medsynth")
    old_level = medsynth_log.level
    medsynth_log.addHandler(handler)
    medsynth_log.setLevel(logging.INFO)
    cfg = SegmentationConfig(iterations=12, batch_size=4, image_size=32, channels=(4, 8), progress=True)
    names = {seed: f"real+gmm n=5 seed {seed}" for seed in (0, 1)}
    errors = []

    def run(seed: int) -> None:
        try:
            train_unet(train, cfg, seed, name=names[seed])
        except Exception as err:  # surfaced below: an exception in a thread would otherwise pass silently
            errors.append(err)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (0, 1)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        medsynth_log.removeHandler(handler)
        medsynth_log.setLevel(old_level)
    assert not errors, errors
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text  # no bar fragments
    lines = [line for line in text.split("\n") if line]
    owner = re.compile(r"^U-Net (real\+gmm n=5 seed [01]): ")
    assert all(owner.match(line) for line in lines), [line for line in lines if not owner.match(line)][:3]
    for seed, name in names.items():
        mine = [line for line in lines if line.startswith(f"U-Net {name}: ")]
        steps = [int(m.group(1)) for line in mine if (m := re.search(r": step (\d+)/12 ", line))]
        assert steps == list(range(1, 12)), (seed, steps)  # every step's line, whole and in order
        assert sum("expected ≈" in line for line in mine) == 1  # the announced length
        assert any("done in" in line for line in mine)


def test_roi_boxes_cover_each_case_once(phantom):
    _, test = phantom
    boxes = seg.roi_boxes(test, margin=0.25)
    cases = test.meta["case"].to_numpy()
    for case in np.unique(cases):
        idx = np.flatnonzero(cases == case)
        assert np.allclose(boxes[idx], boxes[idx[0]])  # one grid per stacked volume
        cy, cx, side = boxes[idx[0]]
        rows = np.flatnonzero((test.labels[idx] > 0).any(axis=(0, 2)))
        cols = np.flatnonzero((test.labels[idx] > 0).any(axis=(0, 1)))
        extent = max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
        assert side == pytest.approx(1.5 * extent)
        assert cy - side / 2 < rows[0] and rows[-1] < cy + side / 2
        assert cx - side / 2 < cols[0] and cols[-1] < cx + side / 2
    # a case without labels keeps the whole slice
    img, lab = np.zeros((1, 1, 20, 30), np.float32), np.zeros((1, 20, 30), np.uint8)
    import pandas as pd

    empty = SliceSet(img, lab, pd.DataFrame({"subject_id": ["z"], "case": ["z"], "slice_index": ["0"]}))
    assert np.allclose(seg.roi_boxes(empty, 0.3), [[9.5, 14.5, 30.0]])


def test_roi_crop_geometry():
    rng = np.random.default_rng(0)
    img = rng.random((2, 1, 24, 24)).astype(np.float32)
    lab = rng.integers(0, 4, size=(2, 24, 24)).astype(np.uint8)
    whole = np.array([[11.5, 11.5, 24.0], [11.5, 11.5, 24.0]])
    x, y = seg._crop(img, lab, whole, 24)  # the whole slice at its own size: identity
    assert np.allclose(x.numpy(), img, atol=1e-5) and np.array_equal(y.numpy(), lab)
    half = np.array([[5.5, 17.5, 12.0], [5.5, 17.5, 12.0]])  # rows 0-11, cols 12-23 upsampled 2x
    _, y2 = seg._crop(img, lab, half, 24)
    assert np.array_equal(y2.numpy()[:, ::2, ::2], lab[:, :12, 12:])


def test_roi_metrics_use_the_crop_grid(phantom, monkeypatch):
    _, test = phantom
    cfg = SegmentationConfig(image_size=32, roi="heart", roi_margin=0.3)
    _, gt, boxes = seg._inputs(test, cfg)
    gt = gt.numpy().astype(np.uint8)
    monkeypatch.setattr(seg, "_predict_inputs", lambda model, x: gt)
    perfect = seg.evaluate_cases(None, test, cfg)
    assert np.allclose(perfect["dice"].dropna(), 1.0)
    shifted = np.roll(gt, 2, axis=2)
    monkeypatch.setattr(seg, "_predict_inputs", lambda model, x: shifted)
    worse = seg.evaluate_cases(None, test, cfg)
    # 2 px on the 32-px crop grid: 2 × side (slice px) × 3 mm / 32 per case
    lv = worse[worse["class"] == "lv"].set_index("case")["hd95"].dropna()
    cases = test.meta["case"].to_numpy()
    for case, hd in lv.items():
        side = boxes[np.flatnonzero(cases == case)[0], 2]
        assert hd == pytest.approx(2 * side * 3.0 / 32, rel=1e-3)


def test_roi_protocol_runs(phantom, synthetic):
    train, test = phantom
    cfg = SegmentationConfig(
        iterations=3, batch_size=4, image_size=32, channels=(4, 8), seeds=[0], roi="heart", num_threads=1
    )
    per_case = run_segmentation_protocol(train, test, synthetic, cfg)
    assert set(per_case["arm"]) == {"real", "real+synthetic", "synthetic"}
    assert per_case["case"].nunique() == test.meta["case"].nunique()
    with pytest.raises(ConfigError, match="roi"):
        validate(SegmentationConfig, {"roi": "lungs"})
