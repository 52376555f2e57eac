"""CycleGAN translation family: learns the target appearance on phantom cine → LGE, deterministic, save/load,
checkpoint resume (both optimizers), bad inputs, and the ``medsynth translate`` dataset writer."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medsynth.config import validate
from medsynth.data.manifest import read_manifest, write_manifest
from medsynth.data.slices import SliceSet
from medsynth.errors import ConfigError, MedsynthError
from medsynth.labels import LV, MYO
from medsynth.models.base import CapabilityError, GenerativeModel
from medsynth.models.registry import create_model, get_family

TINY = {
    "image_size": 32,
    "channels": (8, 16),
    "n_res_blocks": 1,
    "disc_channels": 8,
    "disc_layers": 2,
    "batch_size": 4,
    "progress": False,
}


def _phantom(tmp: Path, contrast: str, seed: int) -> Path:
    from medsynth.phantom import generate_dataset

    return generate_dataset(tmp / contrast, subjects=3, contrast=contrast, seed=seed, shape=(64, 64, 4))


@pytest.fixture(scope="module")
def two_domains(tmp_path_factory) -> tuple[SliceSet, Path]:
    """Phantom cine and LGE slices in one set (and one manifest), 64×64 (the family works at 32×32)."""
    from medsynth.data.preprocess import PreprocessConfig, load_slices

    tmp = tmp_path_factory.mktemp("domains")
    frames = []
    for contrast, seed in (("cine", 0), ("lge", 1)):
        m = _phantom(tmp, contrast, seed)
        df = read_manifest(m)
        df["image"] = contrast + "/" + df["image"]
        df["label"] = contrast + "/" + df["label"]
        df["subject_id"] = contrast + "_" + df["subject_id"]
        frames.append(df)
    manifest = write_manifest(pd.concat(frames, ignore_index=True), tmp / "both.csv", data_root=tmp)
    return load_slices(manifest, cfg=PreprocessConfig(size=64)), manifest


@pytest.fixture(scope="module")
def fitted(two_domains) -> tuple[GenerativeModel, dict]:
    slices, _ = two_domains
    model = create_model("cyclegan", {**TINY, "steps": 240})
    return model, model.fit(slices, slices, seed=0)


def _tissue_means(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.array([images[:, 0][labels == c].mean() for c in (0, LV, MYO)])


def test_translation_moves_cine_towards_lge_appearance(two_domains, fitted):
    slices, _ = two_domains
    model, report = fitted
    assert get_family("cyclegan") is type(model) and model.supports("translate")
    assert report["n_source"] > 0 and report["n_target"] > 0 and report["steps"] == 240
    assert np.isfinite(report["val_cycle_l1_source"]) and np.isfinite(report["val_cycle_l1_target"])
    is_cine = (slices.meta["modality"] == "cine").to_numpy()
    cine, lge = slices.subset(is_cine), slices.subset(~is_cine)
    out = model.translate(cine.images)
    assert out.shape == cine.images.shape and out.dtype == np.float32
    target = _tissue_means(lge.images, lge.labels)
    before = np.linalg.norm(_tissue_means(cine.images, cine.labels) - target)
    after = np.linalg.norm(_tissue_means(out, cine.labels) - target)
    assert after < 0.5 * before, (before, after)
    back = model.translate(out, direction="backward")
    assert np.abs(back - cine.images).mean() < np.abs(out - cine.images).mean()  # cycle closes


def test_deterministic_and_save_load(two_domains, fitted, tmp_path):
    slices, _ = two_domains
    model, _ = fitted
    a = create_model("cyclegan", {**TINY, "steps": 4}).fit(slices, seed=3)
    m1, m2 = create_model("cyclegan", {**TINY, "steps": 4}), create_model("cyclegan", {**TINY, "steps": 4})
    m1.fit(slices, seed=3)
    m2.fit(slices, seed=3)
    assert a["loss_last"] == pytest.approx(m1.fit(slices, seed=3)["loss_last"])
    np.testing.assert_array_equal(m1.translate(slices.images[:4]), m2.translate(slices.images[:4]))
    model.save(tmp_path / "m")
    loaded = GenerativeModel.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.translate(slices.images[:6]), model.translate(slices.images[:6]))
    assert loaded.model_hash == model.model_hash


def test_resume_restores_both_optimizers(two_domains, tmp_path):
    slices, _ = two_domains
    straight = create_model("cyclegan", {**TINY, "steps": 6, "checkpoint_dir": str(tmp_path / "a")})
    straight.fit(slices, seed=0)
    part = create_model("cyclegan", {**TINY, "steps": 3, "checkpoint_dir": str(tmp_path / "b")})
    part.fit(slices, seed=0)
    resumed = create_model("cyclegan", {**TINY, "steps": 6, "checkpoint_dir": str(tmp_path / "b")})
    report = resumed.fit(slices, seed=0)
    assert report["resumed_from"] == 3
    np.testing.assert_array_equal(resumed.translate(slices.images[:4]), straight.translate(slices.images[:4]))


def test_bad_inputs_named(two_domains):
    slices, _ = two_domains
    with pytest.raises(ConfigError, match="lamda_cycle"):
        validate(get_family("cyclegan").Config, {"lamda_cycle": 1.0})
    with pytest.raises(ValueError, match="source/target"):
        create_model("cyclegan", {"source": "lge", "target": "LGE"})
    with pytest.raises(ValueError, match="image_size"):
        create_model("cyclegan", {"image_size": 30, "channels": (8, 16, 32)})
    with pytest.raises(MedsynthError, match="'vendor'"):
        create_model("cyclegan", {**TINY, "domain_key": "vendor", "source": "a", "target": "b"}).fit(slices)
    with pytest.raises(MedsynthError, match="no column 'scanner'"):
        create_model("cyclegan", {**TINY, "domain_key": "scanner"}).fit(slices)
    model = create_model("cyclegan", {**TINY, "steps": 1})
    model.fit(slices, seed=0)
    with pytest.raises(CapabilityError, match="translate"):
        model.sample(2)
    bad = slices.images[:2].copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model.translate(bad)
    with pytest.raises(ValueError, match="direction"):
        model.translate(slices.images[:2], direction="sideways")
    with pytest.raises(CapabilityError, match="translate"):
        create_model("pca").translate(slices.images[:2])


def test_translate_dataset_writes_pairs_with_source_labels(two_domains, fitted, tmp_path):
    from medsynth.workflows.commands import translate_dataset

    slices, manifest = two_domains
    model, _ = fitted
    model.save(tmp_path / "model")
    out = translate_dataset(tmp_path / "model", manifest, tmp_path / "out", seed=0)
    df = read_manifest(out)
    n_cine = int((slices.meta["modality"] == "cine").sum())
    assert len(df) == n_cine
    assert (df["modality"] == "lge").all() and (df["translated_from"] == "cine").all()
    assert (df["family"] == "cyclegan").all() and (df["model_hash"] == model.model_hash).all()
    first = df.iloc[0]
    lab = np.asarray(nib.load(str(tmp_path / "out" / first["label"])).dataobj)
    assert set(np.unique(lab)) <= set(np.unique(slices.labels))
    with pytest.raises(MedsynthError, match="no slice"):
        translate_dataset(tmp_path / "model", manifest, tmp_path / "none", split="nosuchsplit")
    assert not (tmp_path / "none").exists()


def test_evaluate_translation_reports_appearance_and_anatomy(two_domains, fitted):
    from medsynth.evaluation.translation import TranslationEvalConfig, evaluate_translation

    slices, _ = two_domains
    model, _ = fitted
    cfg = TranslationEvalConfig(
        bootstrap=20, segmentation={"image_size": 32, "iterations": 30, "channels": (4, 8), "num_threads": 1}
    )
    table, translated = evaluate_translation(model, slices, slices, cfg)
    assert (table["direction"] == "cine->lge").all()
    fd = table[table["metric"] == "fd_random_cnn"].iloc[0]
    assert fd["after"] < fd["before"]  # the translated cine is closer to the LGE slices than the cine itself
    assert fd["before_ci_low"] <= fd["before"] <= fd["before_ci_high"]
    dice = table[table["metric"] == "target_unet_dice"].set_index("class")
    assert {"lv", "myo", "mean"} <= set(dice.index)
    assert dice[["before", "after"]].notna().all().all()
    assert dice["diff"].to_numpy() == pytest.approx((dice["after"] - dice["before"]).to_numpy(), abs=1e-9)
    assert len(translated) == int((slices.meta["modality"] == "cine").sum())
    with pytest.raises(MedsynthError, match="cannot translate"):
        evaluate_translation(create_model("pca"), slices, slices, cfg)


def test_cli_fit_translate_and_evaluate(two_domains, tmp_path):
    """``medsynth fit cyclegan`` → ``medsynth translate`` → ``medsynth evaluate translation`` on a split manifest."""
    import yaml

    from medsynth.cli.main import main
    from medsynth.data.splits import assign_splits

    _, manifest = two_domains
    df = read_manifest(manifest)
    split = write_manifest(
        assign_splits(df, fractions={"train": 0.5, "val": 0.0, "test": 0.5}, seed=0),
        tmp_path / "split.csv",
        data_root=manifest.parent,
    )
    cfg = tmp_path / "cyclegan.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "channels": [8, 16], "steps": 3, "preprocess": {"size": 64}}))
    model = tmp_path / "model"
    assert main(["fit", "cyclegan", "--manifest", str(split), "--out", str(model), "--config", str(cfg)]) == 0
    out = tmp_path / "translated"
    assert (
        main(["translate", "--model", str(model), "--manifest", str(split), "--out", str(out), "--split", "test"]) == 0
    )
    rows = read_manifest(out / "manifest.csv")
    assert len(rows) > 0 and (rows["split"] == "test").all() and (rows["modality"] == "lge").all()
    ev_cfg = tmp_path / "eval.yaml"
    ev_cfg.write_text(yaml.safe_dump({"bootstrap": 5, "segmentation": {"image_size": 32, "iterations": 3}}))
    ev = tmp_path / "eval"
    args = ["evaluate", "translation", "--model", str(model), "--manifest", str(split), "--out", str(ev)]
    assert main([*args, "--config", str(ev_cfg)]) == 0
    metrics = pd.read_csv(ev / "translation_metrics.csv")
    assert {"fd_random_cnn", "target_unet_dice"} == set(metrics["metric"])
    assert "cine->lge" in (ev / "report.md").read_text(encoding="utf-8")
