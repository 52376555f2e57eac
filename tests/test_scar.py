"""Scar shape model, insertion / removal, and the scar evaluation (n-SD, FWHM, GMM)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from lge_toys import make_slices, ring_labels

from medsynth.evaluation.scar import BASELINES, evaluate_scar, patient_split, scar_metrics  # noqa: E402
from medsynth.labels import LV, MVO, MYO, SCAR  # noqa: E402
from medsynth.synthesis.scar import ScarModel, ScarParams, insert_scar, remove_scar, wall_coordinates  # noqa: E402


def healthy_pair(size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lab = ring_labels(size, size, size / 2, size / 2, 9, 15, scar=False)
    img = np.select([lab == LV, lab == MYO], [0.8, 0.25], 0.4).astype(np.float32)
    return img + rng.normal(0, 0.03, img.shape).astype(np.float32), lab


PARAMS = ScarParams(
    center=np.pi / 2,
    extent=np.radians(120),
    transmurality=0.6,
    mvo_fraction=0.2,
    t_scar=1.0,
    r_scar=0.3,
    t_mvo=-0.2,
    r_mvo=0.0,
    seed=3,
)


def test_wall_coordinates_depth_runs_endo_to_epi() -> None:
    _, lab = healthy_pair()
    theta, depth, wall = wall_coordinates(lab)
    endo = wall & (np.abs(np.hypot(*(np.indices(lab.shape) - 32)) - 9.5) < 1)
    epi = wall & (np.abs(np.hypot(*(np.indices(lab.shape) - 32)) - 14.5) < 1)
    assert depth[endo].mean() < 0.25 and depth[epi].mean() > 0.75
    assert np.isnan(depth[~wall]).all() and np.nanmax(np.abs(theta)) <= np.pi


def test_insert_changes_only_myocardium_and_labels_consistent() -> None:
    img, lab = healthy_pair()
    out, new = insert_scar(img, lab, PARAMS)
    changed_px = out != img
    assert changed_px.any() and np.all(lab[changed_px] == MYO)
    changed_lab = new != lab
    assert np.all(lab[changed_lab] == MYO) and set(np.unique(new[changed_lab])) <= {SCAR, MVO}
    assert (new == SCAR).sum() > 20 and (new == MVO).sum() > 0
    remote = new == MYO
    assert out[new == SCAR].mean() > out[remote].mean() + 5 * out[remote].std() / 2  # bright, as labelled
    assert out[new == MVO].mean() < out[new == SCAR].mean()  # MVO dark core
    theta, depth, _ = wall_coordinates(lab)
    assert np.nanmean(depth[new == SCAR]) < np.nanmean(depth[remote])  # subendocardial wavefront
    np.testing.assert_array_equal(insert_scar(img, lab, PARAMS)[0], out)  # deterministic


def test_transmurality_controls_depth() -> None:
    img, lab = healthy_pair()
    _, thin = insert_scar(img, lab, ScarParams(**{**PARAMS.__dict__, "transmurality": 0.3, "mvo_fraction": 0.0}))
    _, thick = insert_scar(img, lab, ScarParams(**{**PARAMS.__dict__, "transmurality": 1.0, "mvo_fraction": 0.0}))
    assert (thick == SCAR).sum() > 1.5 * (thin == SCAR).sum()


def test_remove_scar_counterpart() -> None:
    img, lab = healthy_pair()
    with_scar, scar_lab = insert_scar(img, lab, PARAMS)
    free, free_lab = remove_scar(with_scar, scar_lab)
    np.testing.assert_array_equal(free_lab, lab)
    infarct = np.isin(scar_lab, (SCAR, MVO))
    assert np.all(free[~infarct] == with_scar[~infarct])
    assert abs(free[infarct].mean() - img[lab == MYO].mean()) < 0.05


def test_scar_model_fit_and_sample() -> None:
    train = make_slices(n_subjects=6, per=2, size=48)
    model = ScarModel.fit(train.images, train.labels)
    assert len(model.shapes) == 6  # the 6 scarred slices
    centre = np.arctan2(np.sin(model.shapes[:, 0]).mean(), np.cos(model.shapes[:, 0]).mean())
    assert abs(centre - np.pi / 2) < 0.2  # anterior territory of the toy scars
    assert np.all((model.shapes[:, 2] > 0.3) & (model.shapes[:, 2] < 0.9))
    assert model.intensities[:, 0].mean() > 1.0  # scar brighter than the toy blood pool offset
    rng = np.random.default_rng(0)
    draws = [model.sample_params(rng) for _ in range(20)]
    assert all(0.15 <= d.transmurality <= 1.0 for d in draws)
    assert len({round(d.center, 6) for d in draws}) == 20


def test_scar_evaluation_all_methods() -> None:
    from medsynth.models.gmm.model import GMMModel

    train, test = make_slices(n_subjects=6, seed=0), make_slices(n_subjects=4, seed=5)
    model = GMMModel({"n_components": 2})
    model.fit(train, seed=0)
    table = evaluate_scar(test, model)
    assert list(table["method"]) == [*BASELINES, "gmm"]
    assert table["n_cases"].eq(4).all() and table["n_scar_cases"].eq(2).all()
    gmm = table.set_index("method").loc["gmm"]
    assert gmm["slice_auroc"] == 1.0 and gmm["dice_mean"] > 0.7
    # A method predicting nothing scores Dice 0 and AUROC 0.5
    empty = scar_metrics(test, {"none": np.zeros(test.labels.shape, bool)}).iloc[0]
    assert empty["dice_mean"] == 0.0 and empty["slice_auroc"] == 0.5


def test_patient_split_is_patient_level() -> None:
    s = make_slices(n_subjects=10, per=3)
    test = patient_split(s, 0.5, seed=1)
    subj = s.meta["subject_id"].to_numpy()
    assert not set(subj[test]) & set(subj[~test])
    scar = np.isin(s.labels, (SCAR,)).any(axis=(1, 2))
    for part in (test, ~test):  # stratified: scar and scar-free patients on both sides
        assert scar[part].any() and not scar[part].all()
    np.testing.assert_array_equal(test, patient_split(s, 0.5, seed=1))


def test_insert_into_phantom_lge(tmp_path: Path) -> None:
    from medsynth.data.preprocess import PreprocessConfig, load_slices
    from medsynth.phantom.generate import generate_dataset

    manifest = generate_dataset(tmp_path / "ph", subjects=2, contrast="lge", seed=4, shape=(64, 64, 4), scar_prob=0.0)
    slices = load_slices(manifest, cfg=PreprocessConfig(size=64))
    model = ScarModel.fit(*(lambda s: (s.images, s.labels))(make_slices(n_subjects=4)))
    rng = np.random.default_rng(0)
    done = 0
    for img, lab in zip(slices.images[:, 0], slices.labels, strict=True):
        if (lab == MYO).sum() < 30 or not (lab == LV).any():
            continue
        out, new = insert_scar(img, lab, model.sample_params(rng))
        diff = out != img
        assert np.all(lab[diff] == MYO) and np.all(lab[new != lab] == MYO)
        if (new == SCAR).sum() >= 5:
            assert out[new == SCAR].mean() > out[new == MYO].mean()
        done += 1
    assert done >= 4


def test_emidec_scar_evaluation(emidec_png_root: Path, tmp_path: Path) -> None:
    from medsynth.data.layouts import build_manifest
    from medsynth.data.manifest import write_manifest
    from medsynth.workflows.commands import run_scar_evaluation

    df = build_manifest("png-slices", emidec_png_root)
    keep = sorted(set(df["subject_id"]))[::2]  # 25 of 50 cases keep the test short
    path = write_manifest(df[df["subject_id"].isin(keep)], tmp_path / "m.csv", data_root=emidec_png_root)
    out = run_scar_evaluation(path, tmp_path / "eval", seed=0, preprocess={"spacing_mm": None, "size": 128})
    table = pd.read_csv(out)
    assert list(table["method"]) == [*BASELINES, "gmm"]
    assert table["slice_auroc"].notna().all() and table["case_auroc"].notna().all()
    gmm = table.set_index("method").loc["gmm"]
    assert gmm["slice_auroc"] > 0.6 and gmm["dice_mean"] > 0.2
