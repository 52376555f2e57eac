"""GMM intensity family: fitting, population sampling, determinism, save/load, score, fidelity vs baselines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from lge_toys import TRUE_MEANS, make_slices, ring_labels  # noqa: E402,F401

from medsynth.data.slices import SliceSet
from medsynth.errors import ConfigError, MedsynthError
from medsynth.labels import LV, MVO, MYO, RV, SCAR
from medsynth.models.base import GenerativeModel
from medsynth.models.gmm.model import GMMModel
from medsynth.models.registry import create_model
from medsynth.synthesis.degrade import DegradeConfig, RandomDegrade, apply_degrade
from medsynth.synthesis.labels_to_image import tissue_wasserstein, uniform_prior_images


@pytest.fixture(scope="module")
def tiny() -> SliceSet:
    return make_slices()


@pytest.fixture(scope="module")
def fitted(tiny: SliceSet) -> GMMModel:
    model = create_model("gmm", {"n_components": 2})
    model.fit(tiny, seed=0)
    return model


def test_fit_recovers_tissue_means(fitted: GMMModel) -> None:
    means = fitted.class_means()["lge"]
    for code, name in ((LV, "lv"), (MYO, "myo"), (RV, "rv"), (SCAR, "scar")):
        assert means[name] == pytest.approx(TRUE_MEANS[code], abs=0.05), name
    assert fitted.scar_model is not None and fitted.supports("score")


def test_sampling_deterministic_and_seed_dependent(fitted: GMMModel, tiny: SliceSet) -> None:
    a = fitted.sample(4, tiny.labels[:4], seed=7)
    b = fitted.sample(4, tiny.labels[:4], seed=7)
    c = fitted.sample(4, tiny.labels[:4], seed=8)
    assert a.images.shape == (4, 1, 48, 48) and a.images.dtype == np.float32
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, tiny.labels[:4])
    assert not np.array_equal(a.images, c.images)


def test_sampling_does_not_depend_on_threads(fitted: GMMModel, tiny: SliceSet) -> None:
    labels = np.repeat(tiny.labels[:3], 30, axis=0)  # several render chunks
    out, before = [], fitted.threads
    try:
        for threads in (1, 2):
            fitted.threads = threads
            out.append(fitted.sample(len(labels), labels, seed=5).images)
    finally:
        fitted.threads = before
    np.testing.assert_array_equal(out[0], out[1])


def test_sampling_draws_per_image_parameters(fitted: GMMModel, tiny: SliceSet) -> None:
    """The spread of per-image myocardium means is the fitted population's, not one global mean plus noise."""
    labels = np.repeat(tiny.labels[:1], 200, axis=0)
    myo = labels[0] == MYO

    def myo_means(model: GMMModel) -> np.ndarray:
        return np.array([im[myo].mean() for im in model.sample(200, labels, seed=1).images[:, 0]])

    frozen = GMMModel({"n_components": 2, "population_scale": 0.0})
    frozen.set_state(*fitted.get_state())
    spread, noise = myo_means(fitted).std(), myo_means(frozen).std()
    assert noise < 0.5 * spread
    fitted_sd = float(np.sqrt(fitted.arrays["pop_cov"][0][2 * MYO, 2 * MYO]))  # (mean, log sd) per class
    assert np.sqrt(spread**2 - noise**2) == pytest.approx(fitted_sd, rel=0.3)


def test_save_load_sample_identical(fitted: GMMModel, tiny: SliceSet, tmp_path: Path) -> None:
    fitted.save(tmp_path / "m")
    loaded = GenerativeModel.load(tmp_path / "m")
    assert isinstance(loaded, GMMModel) and loaded.model_hash == fitted.model_hash
    np.testing.assert_array_equal(
        loaded.sample(3, tiny.labels[:3], seed=5).images, fitted.sample(3, tiny.labels[:3], seed=5).images
    )
    record = json.loads((tmp_path / "m" / "model.json").read_text(encoding="utf-8"))
    assert record["family"] == "gmm"


def test_unseen_class_uses_donor_and_unknown_key_rejected(fitted: GMMModel) -> None:
    lab = ring_labels(48, 48, 24, 24, 7, 11, scar=False)
    lab[lab == SCAR] = MYO
    lab[20:23, 20:23] = MVO  # MVO never seen in training: borrowed from myocardium
    out = fitted.sample(1, lab[None], seed=0).images[0, 0]
    assert np.isfinite(out).all()
    with pytest.raises(ConfigError, match="bogus"):
        GMMModel({"bogus": 1})
    with pytest.raises(MedsynthError, match="label"):
        fitted.sample(1, None, seed=0)


def test_score_posterior_higher_in_scar(fitted: GMMModel) -> None:
    test = make_slices(n_subjects=4, per=1, seed=3)
    scores = fitted.score(test)
    assert scores.pixel_maps.shape == test.labels.shape
    scar_slices = np.isin(test.labels, (SCAR,)).any(axis=(1, 2))
    assert scores.slice_scores[scar_slices].min() > scores.slice_scores[~scar_slices].max()
    maps = scores.pixel_maps[scar_slices]
    labs = test.labels[scar_slices]
    assert maps[labs == SCAR].mean() > 0.8 and maps[labs == MYO].mean() < 0.2
    assert np.all(scores.pixel_maps[~np.isin(test.labels, (MYO, SCAR, MVO))] == 0)


def test_degrade_random_and_deterministic_twin() -> None:
    imgs = np.random.default_rng(0).random((3, 32, 32)).astype(np.float32)
    rd = RandomDegrade(DegradeConfig(downsample_prob=1.0))
    p = rd.sample_params(3, np.random.default_rng(1))
    np.testing.assert_array_equal(apply_degrade(imgs, p), apply_degrade(imgs, p))
    assert apply_degrade(imgs, p).std() < imgs.std()  # blur + coarse axis remove high frequencies
    flat = np.ones((1, 32, 32), np.float32)
    q = rd.sample_params(1, np.random.default_rng(2))
    q.noise[:] = 0
    field = apply_degrade(flat, q)[0]
    assert field.std() > 0 and abs(np.log(field).mean()) < 0.2  # smooth multiplicative bias, no global scale


def _closer_than_baselines(model: GMMModel, held_out: SliceSet) -> tuple[dict, dict, dict]:
    import torch
    import torchio as tio

    syn = model.sample(len(held_out), held_out.labels, seed=11).images
    w_fit = tissue_wasserstein(held_out.images, held_out.labels, syn, held_out.labels)
    uniform = uniform_prior_images(held_out.labels, np.random.default_rng(11))
    w_ss = tissue_wasserstein(held_out.images, held_out.labels, uniform, held_out.labels)
    torch.manual_seed(11)
    t = tio.RandomLabelsToImage(label_key="label", image_key="image")
    tio_imgs = np.stack(
        [
            t(tio.Subject(label=tio.LabelMap(tensor=torch.from_numpy(lab[None, ..., None].astype(np.int64)))))["image"]
            .data[0, ..., 0]
            .numpy()
            for lab in held_out.labels
        ]
    )
    w_tio = tissue_wasserstein(held_out.images, held_out.labels, tio_imgs, held_out.labels)
    mean = {k: float(np.mean(list(w.values()))) for k, w in (("fit", w_fit), ("synthseg", w_ss), ("torchio", w_tio))}
    assert mean["fit"] < mean["synthseg"] and mean["fit"] < mean["torchio"], (mean, w_fit, w_ss, w_tio)
    return w_fit, w_ss, w_tio


def _phantom(tmp: Path, subjects: int, seed: int):
    from medsynth.data.preprocess import PreprocessConfig, load_slices
    from medsynth.phantom import generate

    manifest = generate.generate_dataset(tmp, subjects=subjects, contrast="lge", seed=seed, shape=(64, 64, 4))
    return load_slices(manifest, cfg=PreprocessConfig(size=64)), json.loads(
        (tmp / "phantom_params.json").read_text(encoding="utf-8")
    )


def test_phantom_lge_recovers_known_intensities(tmp_path: Path) -> None:
    slices, params = _phantom(tmp_path / "ph", subjects=6, seed=1)
    model = GMMModel()
    model.fit(slices, seed=0)
    (group,) = model.groups
    fitted = model.class_means()[group]
    truth: dict[str, list[float]] = {"myo": [], "scar": [], "lv": []}
    for sid, p in params["subjects"].items():
        rows = (slices.meta["subject_id"] == sid).to_numpy()
        recs = [json.loads(r) for r in slices.meta.loc[rows, "record"].drop_duplicates()]  # one per volume
        visible_scar = (slices.labels[rows] == SCAR).sum() >= model.config.min_pixels
        for name, tissue in (("myo", "myocardium"), ("lv", "lv_blood"), ("scar", "scar")):
            if name != "scar" or visible_scar:
                # ground truth (before scanner blur/noise) on the SliceSet scale of each volume
                values = [(p["tissue"][tissue]["mean"] - r["p_low"]) / (r["p_high"] - r["p_low"]) for r in recs]
                truth[name].append(float(np.mean(values)))
    true_ratio = np.mean(truth["scar"]) / np.mean(truth["myo"])
    print(f"scar/remote ratio: fitted {fitted['scar'] / fitted['myo']:.3f}, ground truth {true_ratio:.3f}")
    assert fitted["scar"] / fitted["myo"] == pytest.approx(true_ratio, rel=0.10)
    assert fitted["lv"] == pytest.approx(np.mean(truth["lv"]), rel=0.10)


def test_phantom_fitted_closer_than_uniform_priors(tmp_path: Path) -> None:
    slices, _ = _phantom(tmp_path / "ph", subjects=8, seed=2)
    subjects = sorted(set(slices.meta["subject_id"]))
    held = slices.meta["subject_id"].isin(subjects[::3]).to_numpy()
    model = GMMModel()
    model.fit(slices.subset(~held), seed=0)
    _closer_than_baselines(model, slices.subset(held))


@pytest.fixture(scope="module")
def emidec(emidec_png_root: Path, tmp_path_factory) -> SliceSet:
    from medsynth.data.layouts import build_manifest
    from medsynth.data.manifest import write_manifest
    from medsynth.data.preprocess import PreprocessConfig, load_slices

    df = build_manifest("png-slices", emidec_png_root)
    path = write_manifest(df, tmp_path_factory.mktemp("emidec") / "manifest.csv", data_root=emidec_png_root)
    return load_slices(path, cfg=PreprocessConfig(spacing_mm=None, size=128))


def test_emidec_fit_runs_and_beats_baselines(emidec: SliceSet) -> None:
    from medsynth.evaluation.scar import patient_split

    test = patient_split(emidec, 0.4, seed=0)
    model = GMMModel()
    report = model.fit(emidec.subset(~test), seed=0)
    assert report["groups"] == {"lge": int(len(set(emidec.subset(~test).meta["subject_id"])))}
    assert model.scar_model is not None and report["scar_model"]["n_scar_slices"] > 10
    w_fit, w_ss, w_tio = _closer_than_baselines(model, emidec.subset(test))
    assert {"background", "lv", "myo", "scar"} <= set(w_fit)
    for name in w_fit:  # on real data every tissue is closer, not just the average
        assert w_fit[name] < w_ss[name] and w_fit[name] < w_tio[name], (name, w_fit, w_ss, w_tio)


@pytest.fixture(scope="module")
def fitted_field(tiny: SliceSet) -> GMMModel:
    """The background as one random field (``surroundings: field``): one class outside the heart."""
    model = create_model("gmm", {"n_components": 2, "surroundings": "field"})
    model.fit(tiny, seed=0)
    return model


def test_white_texture_mode_keeps_histograms_drops_correlation(fitted_field: GMMModel, tiny: SliceSet) -> None:
    labels = np.repeat(tiny.labels[:1], 16, axis=0)
    quiet = {"blur_sigma": (0.0, 0.0), "bias_coefficient": 0.0, "noise_std": (0.0, 0.0)}
    white = GMMModel({"n_components": 2, "texture": "white", "degrade": quiet, "surroundings": "field"})
    corr = GMMModel({"n_components": 2, "degrade": quiet, "surroundings": "field"})
    arrays, meta = fitted_field.get_state()
    arrays = dict(arrays, smooth_frac=np.full_like(arrays["smooth_frac"], 0.9))
    arrays.update(long_frac=np.zeros_like(arrays["long_frac"]), length=np.full_like(arrays["length"], 3.0))
    for m in (white, corr):
        m.set_state(arrays, meta)
    a, b = white.sample(16, labels, seed=4).images[:, 0], corr.sample(16, labels, seed=4).images[:, 0]
    bg = labels == 0

    def lag1(x: np.ndarray) -> float:
        x = x - np.array([im[bg[0]].mean() for im in x])[:, None, None]  # per image: no population spread
        m = bg[:, :, :-1] & bg[:, :, 1:]
        return float((x[:, :, :-1][m] * x[:, :, 1:][m]).mean() / (x[bg] ** 2).mean())

    assert abs(a[bg].mean() - b[bg].mean()) < 0.05 and abs(a[bg].std() / b[bg].std() - 1) < 0.3
    assert lag1(a) < 0.1 and lag1(b) > 0.5


def test_context_keeps_real_surroundings(fitted: GMMModel, tiny: SliceSet) -> None:
    """With ``context`` only the heart is synthesised: far from the labels the real image is kept exactly."""
    from scipy import ndimage

    labels, context = tiny.labels[:4], tiny.images[:4]
    assert fitted.supports("context")
    plain = fitted.sample(4, labels, seed=3).images
    kept = fitted.sample_in_context(labels, context, seed=3).images
    again = fitted.sample_in_context(labels, context, seed=3).images
    assert np.array_equal(kept, again)
    far = ~ndimage.binary_dilation(labels > 0, iterations=4, axes=(1, 2))
    assert np.allclose(kept[:, 0][far], context[:, 0][far], atol=1e-5)
    inner = ndimage.binary_erosion(labels > 0, iterations=4, axes=(1, 2))
    assert inner.any() and np.allclose(kept[:, 0][inner], plain[:, 0][inner], atol=1e-4)
    assert not np.allclose(kept[:, 0][far], plain[:, 0][far])
    with pytest.raises(ValueError, match="context"):
        fitted.sample_in_context(labels, context[:2], seed=3)


def test_batched_blur_matches_scipy_per_image() -> None:
    from scipy import ndimage

    from medsynth.synthesis.degrade import gaussian_blur

    x = np.random.default_rng(0).random((6, 40, 50)).astype(np.float32)
    sigma = np.array([0.0, 0.4, 0.7, 1.0, 1.6, 2.3])
    ref = np.stack(
        [ndimage.gaussian_filter(x[i], s, mode="nearest", truncate=3.0) if s > 0 else x[i] for i, s in enumerate(sigma)]
    )
    assert np.abs(gaussian_blur(x, sigma) - ref).max() < 1e-5
    with pytest.raises(ValueError, match="sigma"):
        gaussian_blur(x, sigma[:2])


def _outline_measures(images: np.ndarray, labels: np.ndarray, threshold: float) -> np.ndarray:
    """Per image (N, 2): share of the image that is dark *and* connected to the border (outside the body),
    and share of a 4-px ring around the heart that is not dark (body tissue around the heart)."""
    from scipy import ndimage

    out = []
    for im, lab in zip(images, labels, strict=True):
        dark = ndimage.gaussian_filter(im, 1.5) < threshold
        comp, _ = ndimage.label(dark, structure=np.ones((3, 3), bool))
        edge = list(set(np.unique(np.concatenate([comp[0], comp[-1], comp[:, 0], comp[:, -1]]))) - {0})
        outside = np.isin(comp, edge) & dark
        heart = lab > 0
        ring = ndimage.binary_dilation(heart, iterations=4) & ~heart
        out.append((outside.mean(), 1.0 - dark[ring].mean()))
    return np.array(out)


def test_partition_samples_have_a_body_outline(tmp_path_factory) -> None:
    """Whole-image synthesis on the phantom: like the real slices, samples have a dark outside connected to
    the border and body tissue (not dark blotches) around the heart; the single random field has not."""
    from slice_sets import phantom_slices

    from medsynth.synthesis.partition import OUTSIDE, partition_slices
    from medsynth.transforms.label_deformation import RandomLabelDeformation

    real = phantom_slices(tmp_path_factory.mktemp("phantom") / "p", subjects=6)
    part = partition_slices(real.images, real.labels)
    img = real.images[:, 0]
    threshold = 0.5 * (img[part == OUTSIDE].mean() + img[part >= 2].mean())  # outside vs body, from real data
    rng = np.random.default_rng(0)
    deform = RandomLabelDeformation()
    labels = np.stack([deform(real.labels[i], rng)[0] for i in rng.integers(0, len(real), 32)])
    ref = _outline_measures(img, real.labels, threshold)
    got = {}
    for mode in ("partition", "field"):
        model = GMMModel({"surroundings": mode})
        model.fit(real, seed=0)
        assert model.uses_partition == (mode == "partition")
        out = model.sample(len(labels), labels, seed=1)
        np.testing.assert_array_equal(out.labels, labels)  # canonical labels back, no partition codes
        got[mode] = _outline_measures(out.images[:, 0], labels, threshold)
    p = got["partition"]
    assert np.mean(p[:, 0] > 0.03) >= 0.8 * np.mean(ref[:, 0] > 0.03)
    assert np.median(p[:, 1]) >= np.median(ref[:, 1]) - 0.15
    assert np.median(p[:, 1]) > np.median(got["field"][:, 1])


def test_partition_state_is_uint8_and_round_trips(fitted: GMMModel, tiny: SliceSet, tmp_path: Path) -> None:
    arrays, _ = fitted.get_state()
    assert arrays["partition_bank"].dtype == np.uint8 and arrays["partition_bank"].shape[1:] == tiny.labels.shape[1:]
    fitted.save(tmp_path / "m")
    again = GenerativeModel.load(tmp_path / "m")
    assert again.uses_partition
    a = fitted.sample(3, tiny.labels[:3], seed=2).images
    np.testing.assert_array_equal(a, again.sample(3, tiny.labels[:3], seed=2).images)
    assert fitted.n_render_classes == len(fitted.arrays["mode"][0]) > 6
