"""Latent-variable families (PCA/PPCA, shape model, AE/DAE/VAE/cVAE) and the shared training loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsynth.errors import LabelError, TrainingError
from medsynth.labels import LV, MYO, RV
from medsynth.models.base import GenerativeModel
from medsynth.models.latent.toy import toy_slices
from medsynth.models.registry import create_model, get_family
from medsynth.models.training import TrainStep, train_loop

NET = {"image_size": 16, "channels": (4, 8), "strides": (2, 2), "latent_size": 4, "batch_size": 8, "progress": False}
NEURAL = {
    "ae": {**NET, "recon_loss": "l1"},
    "dae": {**NET, "noise_res": 4},
    "vae": {**NET, "kl_anneal_steps": 5},
    "cvae": {**NET, "beta": 0.5},
}


@pytest.fixture(scope="module")
def train():
    return toy_slices(6, 2, size=24, seed=1)


@pytest.fixture(scope="module")
def val():
    return toy_slices(2, 2, size=24, seed=2, split="val")


@pytest.fixture(scope="module")
def fitted(train, val):
    """One small fitted model per neural family (40 steps), shared by the tests below."""
    out = {}
    for fam, cfg in NEURAL.items():
        m = create_model(fam, {**cfg, "steps": 40})
        out[fam] = (m, m.fit(train, val, seed=0))
    return out


def test_registry_names_resolve():
    for name, cls in [("pca", "PCAModel"), ("ppca", "PPCAModel"), ("shape_pca", "ShapeModel"), ("ae", "AEModel"),
                      ("dae", "DAEModel"), ("vae", "VAEModel"), ("cvae", "CVAEModel")]:  # fmt: skip
        fam = get_family(name)
        assert fam.__name__ == cls and fam.family == name


@pytest.mark.parametrize("family", ["ae", "dae", "vae", "cvae"])
def test_training_lowers_loss(fitted, family):
    _, report = fitted[family]
    assert report["steps"] == 40
    assert report["loss_last"] < 0.8 * report["loss_first"]


def test_vae_reports_heldout_elbo(fitted):
    for fam in ("vae", "cvae"):
        rep = fitted[fam][1]
        assert np.isfinite(rep["val_elbo_nats"]) and np.isfinite(rep["val_elbo_bits_per_dim"])
    assert "val_elbo_nats" not in fitted["ae"][1]  # an AE has no ELBO


@pytest.mark.parametrize("family", ["ae", "dae", "vae", "cvae"])
def test_sample_shapes_ranges_and_determinism(fitted, val, family):
    m, _ = fitted[family]
    labels = val.labels[:3] if m.conditional else None
    s = m.sample(3, labels=labels, seed=5)
    assert s.images.shape == (3, 1, 24, 24) and s.images.dtype == np.float32
    assert np.all(np.isfinite(s.images)) and s.images.min() > -1.5 and s.images.max() < 2.5
    np.testing.assert_array_equal(s.images, m.sample(3, labels=labels, seed=5).images)
    assert not np.array_equal(s.images, m.sample(3, labels=labels, seed=6).images)
    if m.conditional:
        np.testing.assert_array_equal(s.labels, labels)


def test_cvae_needs_labels(fitted):
    m, _ = fitted["cvae"]
    with pytest.raises(LabelError):
        m.sample(2)
    with pytest.raises(LabelError):
        m.sample(2, labels=np.zeros((3, 24, 24), np.uint8))


@pytest.mark.parametrize("family", ["ae", "vae", "cvae"])
def test_save_load_identity(fitted, val, tmp_path, family):
    m, _ = fitted[family]
    m.save(tmp_path / family)
    back = GenerativeModel.load(tmp_path / family)
    assert type(back) is type(m) and back.model_hash == m.model_hash
    labels = val.labels[:2] if m.conditional else None
    np.testing.assert_array_equal(
        back.sample(2, labels=labels, seed=3).images, m.sample(2, labels=labels, seed=3).images
    )
    a, b = m.score(val), back.score(val)
    np.testing.assert_array_equal(a.slice_scores, b.slice_scores)
    np.testing.assert_array_equal(a.pixel_maps, b.pixel_maps)


def test_autoencoder_scores_bright_scar_higher(fitted):
    normal = toy_slices(3, 2, size=24, seed=7)
    scar = toy_slices(3, 2, size=24, seed=7, scar=True)
    m, _ = fitted["dae"]
    assert m.score(scar).slice_scores.mean() > m.score(normal).slice_scores.mean()


@pytest.mark.parametrize("family", ["pca", "ppca"])
def test_pca_fit_sample_score_roundtrip(train, val, tmp_path, family):
    m = create_model(family, {"n_components": 4, "image_size": 16})
    rep = m.fit(train, val, seed=0)
    total_var = float(np.var(train.images.reshape(len(train), -1)[:, :], axis=0).mean())
    assert rep["train_recon_mse"] < total_var  # projecting on 4 components beats the mean image
    assert np.isfinite(rep["val_nll_bits_per_dim"])
    s = m.sample(5, seed=1)
    assert s.images.shape == (5, 1, 16, 16) and s.labels is None and np.all(np.isfinite(s.images))
    sc = m.score(val)
    assert sc.slice_scores.shape == (len(val),) and sc.pixel_maps.shape == val.labels.shape
    m.save(tmp_path / family)
    back = GenerativeModel.load(tmp_path / family)
    np.testing.assert_array_equal(back.sample(5, seed=1).images, s.images)
    np.testing.assert_allclose(back.score(val).slice_scores, sc.slice_scores)


def test_ppca_likelihood_prefers_in_distribution(train, val):
    m = create_model("ppca", {"n_components": 4, "image_size": 16})
    m.fit(train, seed=0)
    shuffled = val.subset(np.arange(len(val)))
    g = np.random.default_rng(0)
    flat = shuffled.images.reshape(len(val), -1).copy()
    for row in flat:
        g.shuffle(row)
    shuffled.images = flat.reshape(val.images.shape)
    assert m.score(shuffled).slice_scores.min() > m.score(val).slice_scores.max()


def test_shape_model_samples_plausible_labels(train, val, tmp_path):
    m = create_model("shape_pca", {"n_components": 4, "image_size": 24})
    rep = m.fit(train, val, seed=0)
    assert rep["train_dice"] > 0.85 and rep["val_dice"] > 0.7
    s = m.sample(6, seed=2)
    assert s.labels.shape == (6, 24, 24) and s.images.shape == (6, 1, 24, 24)
    assert set(np.unique(s.labels)) <= {0, LV, MYO, RV}
    for lab in s.labels:
        assert (lab == LV).sum() > 5 and (lab == MYO).sum() > 5
        # the LV wall surrounds the blood pool: every LV pixel's 4-neighbours are LV or MYO (no LV touching bg)
        lv = lab == LV
        nb = np.pad(lab, 1)[:-2, 1:-1], np.pad(lab, 1)[2:, 1:-1], np.pad(lab, 1)[1:-1, :-2], np.pad(lab, 1)[1:-1, 2:]
        assert all(((n[lv] == LV) | (n[lv] == MYO) | (n[lv] == RV)).mean() > 0.95 for n in nb)
    m.save(tmp_path / "shape")
    np.testing.assert_array_equal(GenerativeModel.load(tmp_path / "shape").sample(6, seed=2).labels, s.labels)


# ---- training loop ---------------------------------------------------------------------------------------
def test_resume_from_checkpoint_continues_and_matches(train, tmp_path):
    cfg = {**NEURAL["vae"], "checkpoint_every": 3}
    straight = create_model("vae", {**cfg, "steps": 8, "checkpoint_dir": str(tmp_path / "a")})
    straight.fit(train, seed=0)
    part = create_model("vae", {**cfg, "steps": 5, "checkpoint_dir": str(tmp_path / "b")})
    assert part.fit(train, seed=0)["steps"] == 5
    resumed = create_model("vae", {**cfg, "steps": 8, "checkpoint_dir": str(tmp_path / "b")})
    rep = resumed.fit(train, seed=0)
    assert rep["resumed_from"] == 5 and rep["steps"] == 8
    for (k, a), b in zip(straight.net.state_dict().items(), resumed.net.state_dict().values(), strict=True):
        assert torch.equal(a, b), k  # same bytes: every RNG, optimiser and batch state is restored


def test_nan_loss_raises_training_error_naming_step():
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def loss_fn(batch, step):
        loss = net(batch).pow(2).mean()
        return (loss * float("nan") if step == 3 else loss), {}

    step = TrainStep("loss", opt, loss_fn, [net])
    with pytest.raises(TrainingError, match="step 3"):
        train_loop([step], torch.randn(10, 2), 6, 4, modules={"net": net}, progress=False)


def test_diverging_family_raises_training_error(train):
    m = create_model("ae", {**NET, "steps": 20, "lr": 1e30})
    with pytest.raises(TrainingError, match="at step"):
        m.fit(train, seed=0)


def test_bad_config_rejected():
    from medsynth.errors import ConfigError

    with pytest.raises(ConfigError):
        create_model("vae", {"betaa": 2.0})
    with pytest.raises(ValueError, match="image_size"):
        create_model("ae", {"image_size": 20, "strides": (2, 2, 2), "channels": (4, 4, 4)})


def test_default_checkpoint_dir_resumes_and_leaves_the_hash_alone(train, tmp_path):
    """``create_model(..., checkpoint_dir=)`` fills the family's checkpoint folder (used by ``medsynth fit`` and
    the flows), a second fit resumes from it, and where checkpoints go does not change the model hash."""
    cfg = {**NEURAL["ae"], "steps": 6, "checkpoint_every": 3}
    a = create_model("ae", cfg, checkpoint_dir=tmp_path / "ckpt_a")
    assert a.config.checkpoint_dir == str(tmp_path / "ckpt_a")
    a.fit(train, seed=0)
    assert any((tmp_path / "ckpt_a").iterdir())
    b = create_model("ae", cfg, checkpoint_dir=tmp_path / "ckpt_b")
    b.fit(train, seed=0)
    assert a.model_hash == b.model_hash
    resumed = create_model("ae", cfg, checkpoint_dir=tmp_path / "ckpt_a")
    report = resumed.fit(train, seed=0)
    assert resumed.model_hash == a.model_hash
    assert report["resumed_from"] == 6 and report["steps"] == 6  # finished run: loaded, not retrained
    explicit = create_model("ae", {**cfg, "checkpoint_dir": str(tmp_path / "mine")}, checkpoint_dir=tmp_path / "x")
    assert explicit.config.checkpoint_dir == str(tmp_path / "mine")
    assert create_model("pca", {}, checkpoint_dir=tmp_path / "y").config.model_dump().get("checkpoint_dir") is None
