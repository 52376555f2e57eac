"""Normalizing flow: invertibility, exact log-determinant, training, sampling, scoring, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsynth.models.base import GenerativeModel
from medsynth.models.flow.layers import ActNorm, AffineCoupling, Glow, InvConv1x1, squeeze, unsqueeze
from medsynth.models.flow.model import FlowModel
from medsynth.models.latent.toy import toy_slices
from medsynth.models.registry import create_model, get_family

TINY = {"image_size": 16, "levels": 2, "depth": 2, "hidden": 8, "batch_size": 8, "progress": False}


def _randomise(net: torch.nn.Module, seed: int = 0) -> None:
    """Perturb every parameter (zero-initialised couplings would otherwise be the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.fixture(scope="module")
def train():
    return toy_slices(6, 2, size=16, seed=1)


@pytest.fixture(scope="module")
def fitted(train):
    m = create_model("flow", {**TINY, "steps": 40, "lr": 2e-3})
    return m, m.fit(train, toy_slices(2, 2, size=16, seed=2), seed=0)


def test_registry():
    assert get_family("flow") is FlowModel


def test_squeeze_roundtrip():
    x = torch.randn(2, 3, 8, 8)
    assert squeeze(x).shape == (2, 12, 4, 4)
    torch.testing.assert_close(unsqueeze(squeeze(x)), x, rtol=0, atol=0)


@pytest.mark.parametrize("layer", [ActNorm(4), InvConv1x1(4), AffineCoupling(4, 8)])
def test_layers_invert(layer):
    _randomise(layer)
    layer.eval()
    x = torch.randn(3, 4, 4, 4)
    y, _ = layer(x)
    assert (layer.reverse(y) - x).abs().max() < 1e-5


def test_glow_roundtrip_below_1e4():
    torch.manual_seed(0)
    net = Glow(1, 16, levels=2, depth=2, hidden=8).double()
    net.train()
    net(torch.randn(8, 1, 16, 16, dtype=torch.float64))  # ActNorm data init
    _randomise(net, 1)
    net.eval()
    x = torch.randn(4, 1, 16, 16, dtype=torch.float64)
    zs, _ = net(x)
    assert [tuple(z.shape[1:]) for z in zs] == net.latent_shapes(1, 16)
    assert (net.reverse(zs) - x).abs().max().item() < 1e-4
    x32 = x.float()
    net32 = net.float()
    assert (net32.reverse(net32(x32)[0]) - x32).abs().max().item() < 1e-4


def test_logdet_matches_numerical_jacobian():
    net = Glow(1, 4, levels=2, depth=2, hidden=4, seed=3).double()
    net.train()
    net(torch.randn(5, 1, 4, 4, dtype=torch.float64))
    _randomise(net, 2)
    net.eval()
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64)

    def f(v: torch.Tensor) -> torch.Tensor:
        zs, _ = net(v.view(1, 1, 4, 4))
        return torch.cat([z.flatten() for z in zs])

    jac = torch.autograd.functional.jacobian(f, x.flatten())
    assert jac.shape == (16, 16)
    _, logabsdet = torch.linalg.slogdet(jac)
    _, logdet = net(x)
    assert abs(logabsdet.item() - logdet.item()) < 1e-6
    # and by finite differences, independent of autograd
    eps, cols = 1e-6, []
    for i in range(16):
        e = torch.zeros(16, dtype=torch.float64)
        e[i] = eps
        cols.append((f(x.flatten() + e) - f(x.flatten() - e)) / (2 * eps))
    assert abs(torch.linalg.slogdet(torch.stack(cols, 1))[1].item() - logdet.item()) < 1e-4


def test_training_lowers_bits_per_dim(fitted):
    _, rep = fitted
    assert rep["loss_last"] < rep["loss_first"] - 0.05
    assert np.isfinite(rep["val_bits_per_dim"]) and rep["val_bits_per_dim"] < rep["loss_first"]


def test_sample_shapes_ranges_deterministic(fitted):
    m, _ = fitted
    s = m.sample(4, seed=3)
    assert s.images.shape == (4, 1, 16, 16) and s.labels is None and s.images.dtype == np.float32
    assert np.all(np.isfinite(s.images)) and s.images.min() > -2 and s.images.max() < 3
    np.testing.assert_array_equal(s.images, m.sample(4, seed=3).images)


def test_score_map_sums_to_prior_nll(fitted):
    m, _ = fitted
    x = toy_slices(2, 1, size=16, seed=4)
    sc = m.score(x)
    assert sc.slice_scores.shape == (2,) and sc.pixel_maps.shape == (2, 16, 16)
    np.testing.assert_allclose(sc.slice_scores, m.bits_per_dim(x), rtol=1e-5)
    y = m._prep(x)
    zs, _ = m.net(y)
    prior = 0.0
    for z, (mean, logs) in zip(zs, _priors_by_hand(m.net, zs), strict=True):
        prior = prior + (0.5 * ((z - mean) / logs.exp()) ** 2 + logs + 0.5 * np.log(2 * np.pi)).flatten(1).sum(1)
    np.testing.assert_allclose(sc.pixel_maps.reshape(2, -1).sum(1), prior.detach().numpy(), rtol=1e-4)


def _priors_by_hand(net: Glow, zs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Glow's learned prior of a 2-level flow written out: the split-off half is normal with a mean and log std
    computed from the half that went on (recovered by undoing the coarse level's steps on the coarsest latent);
    the coarsest latent has a learned per-position mean and log std."""
    fine, coarse = zs
    rest = coarse
    for step in reversed(net.levels[1]):
        rest = step.reverse(rest)
    heads = [net.split_priors[0](unsqueeze(rest)), net.top.expand(len(coarse), -1, -1, -1)]
    return [(h[:, 0::2], h[:, 1::2]) for h in heads]


def test_learned_prior_sample_inverts_encode():
    """Sampling from draws eps and encoding the result gives back temperature × eps once whitened by the prior."""
    net = Glow(1, 16, levels=2, depth=2, hidden=8, learned_prior=True).double()
    net.train()
    net(torch.randn(8, 1, 16, 16, dtype=torch.float64))
    _randomise(net, 4)  # the zero-initialised prior heads too, so the prior is not the standard normal
    net.eval()
    g = torch.Generator().manual_seed(0)
    eps = [torch.randn((3, *s), generator=g, dtype=torch.float64) for s in net.latent_shapes(1, 16)]
    with torch.no_grad():
        zs, _ = net(net.sample(eps, temperature=0.7))
        priors = _priors_by_hand(net, zs)
    for z, e, (mean, logs) in zip(zs, eps, priors, strict=True):
        assert logs.abs().max() > 1e-2  # a non-trivial prior
        torch.testing.assert_close((z - mean) / logs.exp(), 0.7 * e, rtol=1e-6, atol=1e-6)
    standard = Glow(1, 16, levels=2, depth=2, hidden=8, learned_prior=False)
    assert not [k for k, _ in standard.named_parameters() if "prior" in k or k == "top"]


def test_model_saved_before_the_prior_key_loads_standard(tmp_path):
    """A flow saved before ``prior`` existed has standard-normal latents and no prior weights: it loads as such."""
    import json

    m = create_model("flow", {**TINY, "steps": 2, "prior": "standard"})
    m.fit(toy_slices(4, 1, size=16, seed=1), seed=0)
    m.save(tmp_path / "old")
    path = tmp_path / "old" / "model.json"
    record = json.loads(path.read_text())
    del record["meta"]["prior_key"], record["config"]["prior"]
    path.write_text(json.dumps(record))
    back = GenerativeModel.load(tmp_path / "old")
    assert back.config.prior == "standard"
    np.testing.assert_array_equal(back.sample(2, seed=1).images, m.sample(2, seed=1).images)


def test_downsamples_larger_slices(fitted):
    m, _ = fitted
    big = toy_slices(1, 2, size=32, seed=5)
    sc = m.score(big)
    assert sc.pixel_maps.shape == (2, 32, 32)


def test_save_load_identity(fitted, tmp_path):
    m, _ = fitted
    m.save(tmp_path / "flow")
    back = GenerativeModel.load(tmp_path / "flow")
    np.testing.assert_array_equal(back.sample(3, seed=1).images, m.sample(3, seed=1).images)
    x = toy_slices(1, 2, size=16, seed=6)
    np.testing.assert_array_equal(back.score(x).slice_scores, m.score(x).slice_scores)


def test_flow_resume_continues(train, tmp_path):
    cfg = {**TINY, "checkpoint_dir": str(tmp_path / "ck"), "checkpoint_every": 2}
    create_model("flow", {**cfg, "steps": 4}).fit(train, seed=0)
    rep = create_model("flow", {**cfg, "steps": 6}).fit(train, seed=0)
    assert rep["resumed_from"] == 4 and rep["steps"] == 6


def test_bad_size_rejected():
    with pytest.raises(ValueError, match="image_size"):
        FlowModel({"image_size": 12, "levels": 3})


def test_samples_stay_finite_and_in_the_training_range(fitted):
    """Draws far in the tails (temperature 50) overflow the inverse couplings: the samples are still finite, and
    clamped to the training intensities' range."""
    m, _ = fitted
    hot = FlowModel(m.config.model_copy(update={"temperature": 50.0}))
    hot.set_state(*m.get_state())
    s = hot.sample(8, seed=0).images
    lo, hi = m.value_range
    assert np.isfinite(s).all()
    assert s.min() >= lo + 0.5 - 1e-5 and s.max() <= hi + 0.5 + 1e-5
