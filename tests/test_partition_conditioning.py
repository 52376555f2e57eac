"""Label-conditioned torch families conditioned on the heart labels plus the surroundings partition
(``surroundings: partition``, :mod:`medsynth.models.conditioning`): condition channels, the saved bank,
determinism, save/load, heart labels never overwritten, ``none`` unchanged, models saved before the key load.
Tiny fits (each family's ``tiny_config``: a few steps at 16 px) on 32 px phantom slices: these test the
plumbing, not image quality."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from medsynth.data.slices import SliceSet
from medsynth.errors import ConfigError
from medsynth.labels import BACKGROUND, LV, MYO, N_CLASSES
from medsynth.models.conditioning import BANK_ARRAY, bright_classes
from medsynth.models.latent.common import labels_to_size, one_hot
from medsynth.models.registry import create_model, load_model

FAMILIES = ["pix2pix", "spade", "ddpm", "ldm", "cvae"]
K = 4  # not the default (5), so a channel count that ignored the key would show
PARTITION = {"surroundings": "partition", "surroundings_classes": K, "partition_bank": 6}


@pytest.fixture(scope="module")
def cine(tmp_path_factory: pytest.TempPathFactory) -> SliceSet:
    from medsynth.data.preprocess import PreprocessConfig, load_slices
    from medsynth.phantom import generate_dataset

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("cine")
    m = generate_dataset(tmp / "A", subjects=2, contrast="cine", scanner="A", seed=0, shape=(48, 48, 4),
                         spacing=(3.0, 3.0, 8.0))  # fmt: skip
    return load_slices(m, cfg=PreprocessConfig(size=32, spacing_mm=4.5))


def _fit(family: str, train: SliceSet, **params) -> object:
    model = create_model(family, {**create_model(family).tiny_config(), **params})
    model.fit(train, seed=0)
    return model


@pytest.fixture(scope="module")
def fitted(cine: SliceSet) -> dict[str, object]:
    return {f: _fit(f, cine, **PARTITION) for f in FAMILIES}


def _labels(cine: SliceSet, n: int = 5) -> np.ndarray:
    # maps from both subjects, in another order than the training set's
    return cine.labels[:: max(1, len(cine) // n)][:n][::-1].copy()


@pytest.mark.parametrize("family", FAMILIES)
def test_partition_condition_has_the_surroundings_channels_and_the_bank_is_saved(
    family: str, fitted: dict, cine: SliceSet, tmp_path: Path
) -> None:
    model = fitted[family]
    labels = _labels(cine)
    maps = model.condition.maps_for(labels, seed=0)
    cond = model.condition.one_hot(torch.as_tensor(maps, dtype=torch.long))
    assert cond.shape == (len(labels), N_CLASSES + K, *labels.shape[1:])

    # the networks' input layers follow: more weights than the same config's heart-only networks
    def n_weights(m: object) -> int:
        return sum(p.numel() for net in m.build_modules().values() for p in net.parameters())

    heart_only = create_model(family, {**create_model(family).tiny_config(), "surroundings": "none"})
    assert n_weights(model) > n_weights(heart_only)
    # surroundings channels are used (not all-zero), and each pixel has exactly one class
    assert float(cond[:, N_CLASSES:].sum()) > 0
    torch.testing.assert_close(cond.sum(1), torch.ones(cond.shape[0], *cond.shape[2:]))
    model.save(tmp_path / "m")
    arrays = load_file(str(tmp_path / "m" / "weights.safetensors"))
    bank = arrays[BANK_ARRAY]
    assert bank.dtype == np.uint8 and bank.ndim == 3 and 1 <= len(bank) <= PARTITION["partition_bank"]
    assert bank.max() <= K and bank.shape[1:] == cine.labels.shape[1:]
    meta = json.loads((tmp_path / "m" / "model.json").read_text())["meta"]
    assert meta["surroundings_classes"] == K


@pytest.mark.parametrize("family", FAMILIES)
def test_partition_samples_are_seeded_and_survive_save_load(
    family: str, fitted: dict, cine: SliceSet, tmp_path: Path
) -> None:
    model = fitted[family]
    labels = _labels(cine)
    a = model.sample(len(labels), labels, seed=7)
    b = model.sample(len(labels), labels, seed=7)
    assert a.images.tobytes() == b.images.tobytes()
    np.testing.assert_array_equal(a.labels, labels)  # the caller's canonical labels come back, not the extended map
    assert not np.array_equal(model.condition.maps_for(labels, 7), model.condition.maps_for(labels, 8))
    model.save(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.config.surroundings == "partition" and loaded.condition.channels == N_CLASSES + K
    assert loaded.sample(len(labels), labels, seed=7).images.tobytes() == a.images.tobytes()


@pytest.mark.parametrize("family", FAMILIES)
def test_partition_never_overwrites_heart_labels(family: str, fitted: dict, cine: SliceSet) -> None:
    model = fitted[family]
    labels = _labels(cine)
    heart = labels != BACKGROUND
    # bank partitions attached to new maps, and the partition of the real slices (held-out evaluation, scores)
    own = model.condition.maps_for(labels, 0, _images_for(cine, labels))
    for maps in (model.condition.maps_for(labels, seed=3), own):
        np.testing.assert_array_equal(maps[heart], labels[heart])
        # every background pixel carries a surroundings class N_CLASSES .. N_CLASSES + K - 1
        assert np.all((maps[~heart] >= N_CLASSES) & (maps[~heart] < N_CLASSES + K))


def _images_for(cine: SliceSet, labels: np.ndarray) -> np.ndarray:
    """The real images of the slices ``labels`` came from (``_labels``' order)."""
    return cine.images[:: max(1, len(cine) // len(labels))][: len(labels)][::-1].copy()


@pytest.mark.parametrize("family", ["pix2pix", "ddpm"])
def test_none_is_the_heart_labels_alone(family: str, cine: SliceSet, tmp_path: Path) -> None:
    """``none`` conditions on the canonical one-hot and saves no partition state; where ``none`` is the default
    (ddpm; the GANs default to the partition), a config that says ``none`` gives the same model and samples as
    one without the key."""
    keyless = create_model(family).config.surroundings == "none"
    default = _fit(family, cine) if keyless else _fit(family, cine, surroundings="none")
    none = _fit(family, cine, surroundings="none")
    labels = _labels(cine)
    assert default.condition.channels == N_CLASSES and default.condition.maps_for(labels, 0) is labels
    arrays, meta = default.get_state()
    assert BANK_ARRAY not in arrays and "surroundings_classes" not in meta
    assert default.model_hash == none.model_hash
    # the condition is the canonical one-hot of the labels themselves
    s = default.config.image_size
    torch.testing.assert_close(default.condition.one_hot(torch.as_tensor(labels_to_size(labels, s), dtype=torch.long)),
                               one_hot(labels_to_size(labels, s)))  # fmt: skip
    a = default.sample(len(labels), labels, seed=2).images
    assert a.tobytes() == none.sample(len(labels), labels, seed=2).images.tobytes()


@pytest.mark.parametrize("family", ["pix2pix", "spade", "ddpm", "cvae"])
def test_a_model_saved_before_the_key_existed_loads_as_none(family: str, cine: SliceSet, tmp_path: Path) -> None:
    model = _fit(family, cine, surroundings="none")  # what every model was before the key existed
    labels = _labels(cine)
    ref = model.sample(len(labels), labels, seed=1).images
    model.save(tmp_path / "m")
    path = tmp_path / "m" / "model.json"
    record = json.loads(path.read_text())
    for key in ("surroundings", "surroundings_classes", "partition_bank", "partition_match"):
        record["config"].pop(key)
    path.write_text(json.dumps(record))
    old = load_model(tmp_path / "m")
    assert old.config.surroundings == "none" and old.condition.channels == N_CLASSES
    assert old.sample(len(labels), labels, seed=1).images.tobytes() == ref.tobytes()
    # a saved model without a bank stays "none" even where the config asks for a partition (a changed default)
    record["config"]["surroundings"] = "partition"
    path.write_text(json.dumps(record))
    old = load_model(tmp_path / "m")
    assert old.config.surroundings == "none" and old.condition.channels == N_CLASSES
    assert old.sample(len(labels), labels, seed=1).images.tobytes() == ref.tobytes()


def test_surroundings_keys_are_validated() -> None:
    with pytest.raises(ConfigError, match="surroundings"):
        create_model("pix2pix", {"surroundings": "atlas"})
    for k in (1, 17):
        with pytest.raises(ConfigError, match="surroundings_classes"):
            create_model("spade", {"surroundings": "partition", "surroundings_classes": k})
    # only the label-conditioned diffusion has a label condition to extend
    with pytest.raises(ConfigError, match="surroundings"):
        create_model("ddpm_uncond", {"surroundings": "partition"})


def test_classes_brighter_than_the_lv_myocardium_midpoint_do_not_fill_a_bank_heart() -> None:
    labels = np.zeros((1, 8, 8), np.uint8)
    labels[0, 2:4, 2:4], labels[0, 4:6, 2:4] = LV, MYO
    parts = np.where(labels == BACKGROUND, 1, 0).astype(np.uint8)
    parts[0, :, 5:] = 2  # bright: above the midpoint of LV (1.0) and MYO (0.2)
    parts[0, :, 7:] = 3  # dark
    images = np.full((1, 1, 8, 8), 0.1, np.float32)
    images[0, 0][labels[0] == LV], images[0, 0][labels[0] == MYO] = 1.0, 0.2
    images[0, 0][parts[0] == 2] = 0.9
    assert bright_classes(images, labels, parts, 3) == (2,)
    assert bright_classes(images, np.zeros_like(labels), parts, 3) == ()  # no LV / MYO: nothing to compare with
