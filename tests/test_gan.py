"""pix2pix and SPADE (label-conditioned GANs) on tiny phantom slices: losses fall, shapes and range, label
consistency, determinism, save/load, random styles. The contract test covers fit/sample/save/load on
toy slices through each family's ``tiny_config``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth.data.slices import SliceSet
from medsynth.errors import ConfigError, LabelError
from medsynth.labels import LV, MYO, RV
from medsynth.models.registry import create_model, load_model

SIZE = 32
# tiny but sufficient: a few hundred generator steps on 32 px phantom slices (seconds on one CPU thread)
PIX2PIX = {
    "image_size": SIZE, "channels": (8, 16, 32), "num_res_units": 0, "disc_channels": 8, "disc_layers": 2,
    "steps": 80, "batch_size": 8, "lr": 1e-3, "progress": False,
}  # fmt: skip
SPADE = {
    "image_size": SIZE, "channels": (8, 16), "spade_hidden": 8, "z_dim": 4, "disc_channels": 8, "num_d": 2,
    "disc_layers": 1, "steps": 80, "batch_size": 8, "lr": 1e-3, "disc_lr": 2e-3, "progress": False,
}  # fmt: skip
CONFIGS = {"pix2pix": PIX2PIX, "spade": SPADE}


def _phantom(tmp: Path, scanner: str) -> SliceSet:
    from medsynth.data.preprocess import PreprocessConfig, load_slices
    from medsynth.phantom import generate_dataset

    m = generate_dataset(
        tmp / scanner, subjects=4, contrast="cine", scanner=scanner, seed=0, shape=(64, 64, 6), spacing=(3.0, 3.0, 8.0)
    )
    return load_slices(m, cfg=PreprocessConfig(size=SIZE, spacing_mm=6.0))


@pytest.fixture(scope="module")
def cine(tmp_path_factory: pytest.TempPathFactory) -> SliceSet:
    torch.set_num_threads(1)
    return _phantom(tmp_path_factory.mktemp("cine"), "A")


@pytest.fixture(scope="module")
def fitted(cine: SliceSet) -> dict:
    out = {}
    for family, cfg in CONFIGS.items():
        model = create_model(family, cfg)
        report = model.fit(cine, seed=0)
        out[family] = (model, report)
    return out


def tissue_means(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean intensity of background, LV, myocardium, RV over a set of slices."""
    return np.array([images[:, 0][labels == k].mean() for k in (0, LV, MYO, RV)])


@pytest.mark.parametrize("family", list(CONFIGS))
def test_tiny_fit_lowers_the_generator_l1(family: str, fitted: dict) -> None:
    model, report = fitted[family]
    l1 = np.asarray(model.history["l1"])
    l1 = l1[np.isfinite(l1)]
    assert np.mean(l1[-10:]) < 0.7 * np.mean(l1[:10]), (family, l1[:10], l1[-10:])
    assert report["loss_last"] < report["loss_first"]
    if family == "spade":
        assert {"feature_matching", "kl", "adv"} <= set(model.history)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_samples_have_the_label_shape_and_the_training_range(family: str, fitted: dict, cine: SliceSet) -> None:
    model, _ = fitted[family]
    labels = cine.labels[:5]
    s = model.sample(5, labels, seed=3)
    assert s.images.shape == (5, 1, SIZE, SIZE) and s.images.dtype == np.float32 and np.isfinite(s.images).all()
    np.testing.assert_array_equal(s.labels, labels)
    lo, hi = float(cine.images.min()), float(cine.images.max())
    span = hi - lo
    assert s.images.min() >= lo - 0.1 * span - 1e-5 and s.images.max() <= hi + 0.1 * span + 1e-5
    # a label map at another size: the sample comes back at that size
    big = np.kron(labels, np.ones((2, 2), np.uint8))
    assert model.sample(5, big, seed=3).images.shape == (5, 1, 2 * SIZE, 2 * SIZE)
    with pytest.raises(LabelError, match=family):
        model.sample(2, np.full((2, SIZE, SIZE), 9, np.uint8))


@pytest.mark.parametrize("family", list(CONFIGS))
def test_lv_blood_is_brighter_than_myocardium_as_in_training(family: str, fitted: dict, cine: SliceSet) -> None:
    real = tissue_means(cine.images, cine.labels)
    assert real[1] > real[2]  # cine: bright blood
    model, _ = fitted[family]
    s = model.sample(len(cine), cine.labels, seed=1)
    fake = tissue_means(s.images, cine.labels)
    assert fake[1] > fake[2], (family, real, fake)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_same_seed_same_sample_and_save_load_identical(
    family: str, fitted: dict, cine: SliceSet, tmp_path: Path
) -> None:
    model, _ = fitted[family]
    labels = cine.labels[:4]
    a = model.sample(4, labels, seed=7).images
    np.testing.assert_array_equal(model.sample(4, labels, seed=7).images, a)
    model.save(tmp_path / family)
    loaded = load_model(tmp_path / family)
    np.testing.assert_array_equal(loaded.sample(4, labels, seed=7).images, a)
    if family == "spade":  # a random style: another seed, another image
        assert not np.array_equal(model.sample(4, labels, seed=8).images, a)


def test_scar_and_mvo_labels_condition_the_image(fitted: dict, cine: SliceSet) -> None:
    """EMIDEC codes 4/5 are one-hot channels of their own: painting scar over myocardium changes the image."""
    model, _ = fitted["pix2pix"]
    labels = cine.labels[:4].copy()
    scarred = labels.copy()
    scarred[labels == MYO] = 4
    a, b = model.sample(4, labels, seed=0).images, model.sample(4, scarred, seed=0).images
    assert not np.array_equal(a, b)


def test_adversarial_criterion_is_selectable_and_validated(cine: SliceSet) -> None:
    for kind in ("vanilla", "lsgan", "hinge"):
        model = create_model("pix2pix", {**PIX2PIX, "steps": 2, "adversarial": kind})
        report = model.fit(cine, seed=0)
        assert np.isfinite(report["loss_last"])
    with pytest.raises(ConfigError, match="adversarial"):
        create_model("pix2pix", {"adversarial": "wgan"})
    with pytest.raises(ConfigError, match="image_size"):
        create_model("spade", {"image_size": 36, "channels": (8, 16, 32)})


def test_spade_without_style_encoder_is_deterministic_per_label_map(cine: SliceSet) -> None:
    # heart labels only: with the (default) partition the seed also draws the bank partitions
    model = create_model("spade", {**SPADE, "steps": 2, "style_encoder": False, "surroundings": "none"})
    model.fit(cine, seed=0)
    a = model.sample(2, cine.labels[:2], seed=0).images
    assert a.shape == (2, 1, SIZE, SIZE)
    np.testing.assert_array_equal(model.sample(2, cine.labels[:2], seed=5).images, a)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_cli_fit_then_sample_from_label_maps(family: str, tmp_path: Path) -> None:
    """``medsynth fit <family>`` → ``medsynth sample --labels`` on a phantom manifest."""
    import pandas as pd
    import yaml

    from medsynth.cli.main import main
    from medsynth.phantom import generate_dataset

    manifest = generate_dataset(tmp_path / "ph", subjects=2, contrast="cine", seed=0, shape=(64, 64, 4))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({**CONFIGS[family], "steps": 3, "preprocess": {"size": SIZE}}))
    model = tmp_path / "model"
    assert main(["fit", family, "--manifest", str(manifest), "--out", str(model), "--config", str(cfg)]) == 0
    out = tmp_path / "samples"
    assert main(["sample", "--model", str(model), "--labels", str(manifest), "--n", "5", "--out", str(out)]) == 0
    rows = pd.read_csv(out / "manifest.csv")
    assert len(rows) == 5 and (out / rows["image"].iloc[0]).is_file()


@pytest.mark.parametrize("family", list(CONFIGS))
def test_deformed_lge_label_maps_with_scar_and_mvo_through_the_augment_path(family: str) -> None:
    """The augment flow's synthesis (:func:`medsynth.workflows.ops.synthesize`): seeded deformations of real
    LGE label maps with scar / MVO → one image per map, the labels returned unchanged."""
    from medsynth.labels import MVO, SCAR
    from medsynth.models.latent.toy import toy_slices
    from medsynth.workflows.ops import synthesize

    lge = toy_slices(3, 2, SIZE, scar=True, seed=0)
    assert np.isin(lge.labels, (SCAR, MVO)).any()
    model = create_model(family, {**CONFIGS[family], "steps": 3})
    model.fit(lge, seed=0)
    out, has_labels = synthesize(model, lge, 6, seed=0, deformation={"rotate_deg": 10.0, "scale": 0.1})
    assert has_labels and out.images.shape == (6, 1, SIZE, SIZE) and np.isfinite(out.images).all()
    assert np.isin(out.labels, (SCAR, MVO)).any()
    again, _ = synthesize(model, lge, 6, seed=0, deformation={"rotate_deg": 10.0, "scale": 0.1})
    np.testing.assert_array_equal(again.images, out.images)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_same_fit_seed_gives_the_same_model(family: str, cine: SliceSet) -> None:
    cfg = {**CONFIGS[family], "steps": 4}
    a, b = create_model(family, cfg), create_model(family, cfg)
    a.fit(cine, seed=3)
    b.fit(cine, seed=3)
    assert a.model_hash == b.model_hash
