"""Reference-image style transfer (capability ``style``) of the SPADE family with its VAE style encoder, on tiny
phantom slices of scanners A and B (the same hearts rendered by both scanners): a styled sample takes its
reference's scanner appearance, determinism, save/load, the capability only with the encoder, bad references,
and ``medsynth sample --reference`` end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth.data.slices import SliceSet
from medsynth.errors import CapabilityError, GeometryError, LabelError
from medsynth.labels import LV, MYO, RV
from medsynth.models.registry import create_model, load_model

SIZE = 32
# tiny but enough for the code to carry the scanner: a few hundred steps on 32 px slices of both scanners
SPADE = {
    "image_size": SIZE, "channels": (8, 16), "spade_hidden": 8, "z_dim": 4, "disc_channels": 8, "num_d": 2,
    "disc_layers": 1, "steps": 200, "batch_size": 8, "lr": 1e-3, "disc_lr": 2e-3, "progress": False,
}  # fmt: skip
TISSUES = (0, LV, MYO, RV)


def _phantom(tmp: Path, scanner: str, subjects: int = 4, slices: int = 6) -> SliceSet:
    from medsynth.data.preprocess import PreprocessConfig, load_slices
    from medsynth.phantom import generate_dataset

    m = generate_dataset(
        tmp / scanner, subjects=subjects, contrast="cine", scanner=scanner, seed=0, shape=(64, 64, slices),
        spacing=(3.0, 3.0, 8.0),
    )  # fmt: skip
    return load_slices(m, cfg=PreprocessConfig(size=SIZE, spacing_mm=6.0))


@pytest.fixture(scope="module")
def scanners(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SliceSet]:
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("scanners")
    out = {s: _phantom(tmp, s) for s in "AB"}
    # paired acquisitions: slice i of A and of B show the same heart
    np.testing.assert_array_equal(out["A"].labels, out["B"].labels)
    return out


@pytest.fixture(scope="module")
def fitted(scanners: dict[str, SliceSet]):
    model = create_model("spade", SPADE)
    model.fit(SliceSet.concat([scanners["A"], scanners["B"]]), seed=0)
    return model


def tissue_means(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean intensity of background, LV, myocardium and RV over all pixels of a set of slices."""
    return np.array([images[:, 0][labels == k].mean() for k in TISSUES])


@pytest.mark.parametrize(("ref", "other"), [("A", "B"), ("B", "A")])
def test_style_reference_sample_is_closer_to_its_reference_scanner(
    fitted, scanners: dict[str, SliceSet], ref: str, other: str
) -> None:
    """Label map of slice i rendered with the scanner-``ref`` image of slice i+1 (another anatomy) as reference:
    its per-tissue means are closer to the references' than to the other scanner's images of the same hearts.
    The threshold is the data's own: the distance to the other scanner's images of the same slices."""
    ref_set, other_set = scanners[ref], scanners[other]
    n = len(ref_set)
    shift = (np.arange(n) + 1) % n
    labels, refs = ref_set.labels, ref_set.images[shift]
    styled = fitted.sample_with_style(labels, refs, seed=0)
    m = tissue_means(styled.images, labels)
    to_ref = np.linalg.norm(m - tissue_means(refs, ref_set.labels[shift]))
    to_other = np.linalg.norm(m - tissue_means(other_set.images[shift], other_set.labels[shift]))
    assert to_ref < to_other, (ref, m, to_ref, to_other)


def test_the_two_scanners_give_different_styles(fitted, scanners: dict[str, SliceSet]) -> None:
    """The same label maps with scanner-A and with scanner-B references: the myocardium (the tissue the contrast
    curves move most) differs in the direction the real images differ."""
    labels = scanners["A"].labels
    a = fitted.sample_with_style(labels, scanners["A"].images, seed=0).images
    b = fitted.sample_with_style(labels, scanners["B"].images, seed=0).images
    real_diff = tissue_means(scanners["B"].images, labels)[2] - tissue_means(scanners["A"].images, labels)[2]
    fake_diff = tissue_means(b, labels)[2] - tissue_means(a, labels)[2]
    assert np.sign(fake_diff) == np.sign(real_diff) and fake_diff != 0, (real_diff, fake_diff)


def test_same_seed_same_bytes_broadcast_and_save_load(fitted, scanners: dict[str, SliceSet], tmp_path: Path) -> None:
    labels, refs = scanners["A"].labels[:4], scanners["B"].images[4:8]
    a = fitted.sample_with_style(labels, refs, seed=3)
    assert a.images.shape == (4, 1, SIZE, SIZE) and a.images.dtype == np.float32 and np.isfinite(a.images).all()
    np.testing.assert_array_equal(a.labels, labels)
    np.testing.assert_array_equal(fitted.sample_with_style(labels, refs, seed=3).images, a.images)
    # one reference for every map = that reference repeated (to float rounding: the encoder's batch differs); a
    # (H, W) image is one reference
    one = fitted.sample_with_style(labels, refs[:1], seed=3).images
    repeated = fitted.sample_with_style(labels, np.repeat(refs[:1], 4, axis=0), seed=3).images
    np.testing.assert_allclose(one, repeated, rtol=0, atol=1e-5)
    assert not np.allclose(one, a.images, atol=1e-3)  # another reference, another appearance
    np.testing.assert_array_equal(one, fitted.sample_with_style(labels, refs[0, 0], seed=3).images)
    # a reference at another size is resized to the working size; a label map at another size comes back at it
    big_ref = np.kron(refs, np.ones((1, 1, 2, 2), np.float32))
    assert fitted.sample_with_style(labels, big_ref).images.shape == (4, 1, SIZE, SIZE)
    big = np.kron(labels, np.ones((2, 2), np.uint8))
    assert fitted.sample_with_style(big, refs).images.shape == (4, 1, 2 * SIZE, 2 * SIZE)
    fitted.save(tmp_path / "spade")
    loaded = load_model(tmp_path / "spade")
    assert loaded.supports("style")
    np.testing.assert_array_equal(loaded.sample_with_style(labels, refs, seed=3).images, a.images)


def test_bad_references_and_labels_are_clean_errors(fitted, scanners: dict[str, SliceSet]) -> None:
    labels, refs = scanners["A"].labels[:2], scanners["B"].images[:2]
    with pytest.raises(GeometryError, match="reference_images"):
        fitted.sample_with_style(labels, refs[:, :, None])  # (n, 1, 1, H, W)
    with pytest.raises(GeometryError, match="reference_images"):
        fitted.sample_with_style(labels, np.concatenate([refs, refs], axis=1))  # two channels
    with pytest.raises(GeometryError, match="reference_images.*one reference per label map"):
        fitted.sample_with_style(labels, scanners["B"].images[:3])
    with pytest.raises(GeometryError, match="reference_images"):
        fitted.sample_with_style(labels, refs[:, :, :1])  # 1 pixel high
    bad = refs.copy()
    bad[0, 0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="reference_images"):
        fitted.sample_with_style(labels, bad)
    with pytest.raises(LabelError, match="spade"):
        fitted.sample_with_style(np.full((2, SIZE, SIZE), 9, np.uint8), refs)


def test_without_the_style_encoder_there_is_no_style_capability(scanners: dict[str, SliceSet]) -> None:
    model = create_model("spade", {**SPADE, "steps": 2, "style_encoder": False})
    model.fit(scanners["A"], seed=0)
    assert not model.supports("style") and "style" not in model.supported() and model.supports("sample")
    with pytest.raises(CapabilityError, match="spade.*style"):
        model.sample_with_style(scanners["A"].labels[:2], scanners["B"].images[:2])
    assert create_model("spade", {**SPADE, "steps": 0}).supports("style")


def test_cli_sample_with_reference_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``medsynth fit spade`` → ``medsynth sample --reference`` with a NIfTI, a PNG and a slice-set reference;
    a model without the style encoder, a missing or NaN reference: one error line, exit 2, nothing written."""
    import nibabel as nib
    import pandas as pd
    import yaml
    from PIL import Image

    from medsynth.cli.main import main
    from medsynth.data.preprocess import PreprocessConfig, load_slices
    from medsynth.phantom import generate_dataset

    manifest = generate_dataset(tmp_path / "a", subjects=2, contrast="cine", scanner="A", seed=0, shape=(64, 64, 4))
    ref_manifest = generate_dataset(tmp_path / "b", subjects=1, contrast="cine", scanner="B", seed=1, shape=(64, 64, 4))
    rows = pd.read_csv(ref_manifest)
    nifti = ref_manifest.parent / rows["image"].iloc[0]
    models = {}
    for name, extra in (("style", {}), ("plain", {"style_encoder": False})):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump({**SPADE, "steps": 3, **extra, "preprocess": {"size": SIZE}}))
        models[name] = tmp_path / f"model_{name}"
        args = ["fit", "spade", "--manifest", str(manifest), "--out", str(models[name]), "--config", str(cfg)]
        assert main(args) == 0
    png = tmp_path / "ref.png"
    mid = nib.load(nifti).get_fdata()[:, :, 2]
    Image.fromarray(np.uint8(255 * mid / mid.max())).save(png)
    ref_slices = load_slices(ref_manifest, cfg=PreprocessConfig(size=SIZE)).subset([0])
    npz = ref_slices.save(tmp_path / "ref.npz")

    def sample(model: Path, reference: Path, out: Path) -> int:
        args = ["sample", "--model", str(model), "--labels", str(manifest), "--n", "3", "--out", str(out)]
        return main([*args, "--reference", str(reference)])

    for kind, ref in (("nifti", nifti), ("png", png), ("npz", npz)):
        out = tmp_path / f"out_{kind}"
        assert sample(models["style"], ref, out) == 0
        written = pd.read_csv(out / "manifest.csv")
        assert len(written) == 3 and (written["style_reference"] == ref.name).all()
        assert (out / written["image"].iloc[0]).is_file() and (out / written["label"].iloc[0]).is_file()
    # the same seed: the same bytes as the in-memory operation
    again = tmp_path / "again"
    assert sample(models["style"], nifti, again) == 0
    first = pd.read_csv(tmp_path / "out_nifti" / "manifest.csv")
    assert list(pd.read_csv(again / "manifest.csv")["sha256"]) == list(first["sha256"])
    capsys.readouterr()

    bad_ref = tmp_path / "nan.npz"
    SliceSet(np.full_like(ref_slices.images, np.nan), ref_slices.labels, ref_slices.meta).save(bad_ref)
    for model, ref, message in (
        (models["plain"], nifti, "cannot style"),
        (models["style"], tmp_path / "missing.nii.gz", "missing.nii.gz"),
        (models["style"], bad_ref, "nan.npz"),
    ):
        out = tmp_path / "refused"
        assert sample(model, ref, out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("medsynth: error:") and message in err[0], err
        assert not out.exists()


def test_model_saved_before_the_style_keys_loads_as_plain_spade(scanners: dict[str, SliceSet], tmp_path: Path) -> None:
    import json

    from medsynth.models.gan.spade import SpadeModel

    legacy = create_model("spade", {**SPADE, "steps": 3, **SpadeModel.LEGACY_STYLE})
    legacy.fit(scanners["A"], seed=0)
    legacy.save(tmp_path / "m")
    ref = legacy.sample(4, scanners["A"].labels[:4], seed=1).images
    # rewrite model.json as an older medsynth wrote it: no style keys in the config, no marker in the state
    doc = json.loads((tmp_path / "m" / "model.json").read_text(encoding="utf-8"))
    for key in SpadeModel.LEGACY_STYLE:
        doc["config"].pop(key)
    doc["meta"].pop("style_keys")
    (tmp_path / "m" / "model.json").write_text(json.dumps(doc), encoding="utf-8")
    loaded = load_model(tmp_path / "m")
    assert {k: getattr(loaded.config, k) for k in SpadeModel.LEGACY_STYLE} == SpadeModel.LEGACY_STYLE
    np.testing.assert_array_equal(loaded.sample(4, scanners["A"].labels[:4], seed=1).images, ref)
