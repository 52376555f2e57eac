"""Diffusion families: training signal, scheduler maths, the DDIM timestep fix, classifier-free guidance,
determinism, save/load, joint generation's plausibility filter and the plausibility check itself.

Tiny U-Nets (channels (8, 16), 16 px, no attention) and short chains keep every test at seconds on one CPU
thread; the family contract (fit / sample / score / save / load) is also run by tests/test_contract.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth.errors import MedsynthError
from medsynth.labels import LV, MYO, N_CLASSES, RV
from medsynth.models.diffusion.plausibility import check_label_map, check_label_maps
from medsynth.models.diffusion.schedulers import CorrectedDDIMScheduler, make_schedulers, x0_from_prediction
from medsynth.models.latent.common import one_hot, to_size
from medsynth.models.latent.toy import toy_slices
from medsynth.models.registry import create_model, load_model

TINY = {"image_size": 16, "channels": (8, 16), "timesteps": 50, "sample_steps": 5, "anomaly_t0": 10,
        "anomaly_steps": 3, "batch_size": 8, "progress": False}  # fmt: skip


@pytest.fixture(scope="module")
def slices():
    return toy_slices(6, 2, 32, seed=0)


@pytest.fixture(scope="module")
def cond_model(slices):
    m = create_model("ddpm", {**TINY, "steps": 20, "lr": 2e-3, "ema_decay": None})
    m.fit(slices, seed=0)
    return m


# ---- training ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_noise_prediction_loss_falls(slices, prediction: str) -> None:
    m = create_model("ddpm_uncond", {**TINY, "steps": 80, "lr": 3e-3, "prediction": prediction, "ema_decay": 0.9})
    report = m.fit(slices, seed=0)
    losses = np.array(m.history["loss"])
    assert losses[-20:].mean() < 0.7 * losses[:10].mean(), report
    assert report["loss_last"] < report["loss_first"]


# ---- scheduler maths -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("schedule", ["linear_beta", "cosine"])
def test_add_noise_then_one_step_x0_recovery_is_exact(prediction: str, schedule: str) -> None:
    ddpm, ddim = make_schedulers(1000, schedule, prediction, clip=None)
    # float64: near t = T the cosine schedule's ᾱ is ~1e-9 and ε → x0 amplifies float32 rounding by 1/√ᾱ
    for s in (ddpm, ddim):
        s.alphas_cumprod = s.alphas_cumprod.double()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn((6, 1, 8, 8), generator=g, dtype=torch.float64) * 0.5 + 0.3
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 100, 500, 900, 999])
    xt = ddpm.add_noise(x0, noise, t)
    target = noise if prediction == "epsilon" else ddpm.get_velocity(x0, noise, t)
    torch.testing.assert_close(x0_from_prediction(ddpm, xt, target, t), x0, atol=1e-9, rtol=1e-9)
    # the schedulers' own steps agree: MONAI DDPM and the corrected DDIM return the same x0
    for i in range(len(t)):
        _, x0_ddpm = ddpm.step(target[i : i + 1], int(t[i]), xt[i : i + 1])
        ddim.timesteps = torch.tensor([int(t[i])])
        _, x0_ddim = ddim.step(target[i : i + 1], int(t[i]), xt[i : i + 1])
        torch.testing.assert_close(x0_ddpm, x0[i : i + 1], atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(x0_ddim, x0[i : i + 1], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("n", [50, 30, 7])
def test_ddim_previous_timestep_is_the_next_of_the_sequence_set(n: int) -> None:
    sched = CorrectedDDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    sched.set_timesteps(n)
    seq = [int(t) for t in sched.timesteps]
    assert seq[0] == 999 and seq[-1] == 0 and len(seq) == n
    assert [sched.prev_timestep(t) for t in seq] == seq[1:] + [-1]
    # the installed MONAI step rule (t − T // N) disagrees with its own linspace sequence: the bug corrected here
    assert any(t - 1000 // n != p for t, p in zip(seq[:-1], seq[1:], strict=True))
    # numerically: with the true ε, a step from x_t lands exactly on the noising of x0 at the next timestep
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn((2, 1, 4, 4), generator=g), torch.randn((2, 1, 4, 4), generator=g)
    for t, p in zip(seq[:-1], seq[1:], strict=True):
        xt = sched.add_noise(x0, eps, torch.tensor([t, t]))
        x_prev, _ = sched.step(eps, t, xt, eta=0.0)
        torch.testing.assert_close(x_prev, sched.add_noise(x0, eps, torch.tensor([p, p])), atol=1e-4, rtol=1e-4)
    x_last, _ = sched.step(eps, 0, sched.add_noise(x0, eps, torch.tensor([0, 0])))
    torch.testing.assert_close(x_last, x0, atol=1e-4, rtol=1e-4)


# ---- guidance, determinism, save / load --------------------------------------------------------------------
@torch.no_grad()
def test_cfg_w0_is_unconditional_and_w1_conditional(cond_model, slices) -> None:
    m = cond_model
    g = torch.Generator().manual_seed(0)
    x = torch.randn((3, 1, 16, 16), generator=g)
    t = torch.tensor([3, 20, 45])
    cond = one_hot(torch.as_tensor(slices.labels[:3, ::2, ::2].astype(np.int64)))
    unet = m.module("unet")
    uncond = unet(torch.cat([x, torch.zeros_like(cond)], 1), t)
    conditional = unet(torch.cat([x, cond], 1), t)
    assert not torch.allclose(uncond, conditional)
    torch.testing.assert_close(m.guided(x, t, cond, 0.0), uncond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.guided(x, t, cond, 1.0), conditional, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.predict(x, t, cond, 0.0), uncond)
    torch.testing.assert_close(m.predict(x, t, cond, 1.0), conditional)
    torch.testing.assert_close(m.predict(x, t, cond, 3.0), uncond + 3.0 * (conditional - uncond), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_ddim_eta0_is_deterministic_and_eta_positive_is_not(cond_model, slices) -> None:
    m = cond_model
    x = torch.randn((2, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    cond = one_hot(torch.as_tensor(slices.labels[:2, ::2, ::2].astype(np.int64)))
    a = m.reverse(x.clone(), cond, torch.Generator().manual_seed(1))
    b = m.reverse(x.clone(), cond, torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    m.config.eta = 1.0
    try:
        c = m.reverse(x.clone(), cond, torch.Generator().manual_seed(1))
        d = m.reverse(x.clone(), cond, torch.Generator().manual_seed(2))
    finally:
        m.config.eta = 0.0
    assert not torch.equal(c, d)


@pytest.mark.parametrize(
    ("family", "extra"),
    [("ddpm", {"guidance_scale": 2.0, "eta": 0.5}), ("ddpm", {"sampler": "ddpm"}), ("ddpm_uncond", {})],
)
def test_same_seed_same_sample_and_save_load_identical(slices, tmp_path: Path, family: str, extra: dict) -> None:
    m = create_model(family, {**TINY, "steps": 4, "ema_decay": 0.9, **extra})
    m.fit(slices, seed=0)
    labels = slices.labels[:3] if m.conditional else None
    a = m.sample(3, labels, seed=5)
    assert a.images.shape == (3, 1, 32, 32) and np.isfinite(a.images).all()
    np.testing.assert_array_equal(m.sample(3, labels, seed=5).images, a.images)
    assert not np.array_equal(m.sample(3, labels, seed=6).images, a.images)
    m.save(tmp_path / "m")
    np.testing.assert_array_equal(load_model(tmp_path / "m").sample(3, labels, seed=5).images, a.images)


def test_score_maps_and_t0(slices) -> None:
    m = create_model("ddpm_uncond", {**TINY, "steps": 4})
    m.fit(slices, seed=0)
    s = m.score(slices)
    assert s.pixel_maps.shape == slices.labels.shape and (s.pixel_maps >= 0).all()
    np.testing.assert_array_equal(m.score(slices).slice_scores, s.slice_scores)  # fixed-seed noise
    m.config.anomaly_t0 = 40
    assert not np.array_equal(m.score(slices).slice_scores, s.slice_scores)


# ---- joint generation --------------------------------------------------------------------------------------
def test_joint_filter_rejects_the_implausible_and_reports_the_fraction(slices, monkeypatch) -> None:
    m = create_model("ddpm_joint", {**TINY, "image_size": 32, "steps": 2})
    m.fit(slices, seed=0)
    good = slices.labels[:4].copy()
    bad = good.copy()
    bad[:, 0:2, 0:2] = LV  # a second LV island (2 × 2 px) in two of the four maps
    maps = np.concatenate([good[:2], bad[2:]])

    def draw(n, labels, seed):  # the reverse process replaced by known maps encoded as the model encodes them
        lab = torch.as_tensor(np.resize(maps, (n, 32, 32)).astype(np.int64))
        return torch.cat([torch.zeros((n, 1, 32, 32)), one_hot(lab) * 2 - 1], 1)

    monkeypatch.setattr(m, "_draw", draw)
    out = m.sample(2, seed=0)
    np.testing.assert_array_equal(out.labels, good[:2])
    m.config.max_draw_factor = 1
    with pytest.raises(MedsynthError, match="plausible"):
        m.sample(4, seed=0)
    assert m.last_sample_report["rejected_fraction"] == 0.5 and m.last_sample_report["reasons"] == {"LV islands": 2}


def test_joint_draws_until_the_budget_not_a_fixed_number_of_rounds(slices, monkeypatch) -> None:
    """At 40 % acceptance, 8 rounds of just the missing count leave maps missing (200 × 0.6^8 ≈ 3 of 200, the
    ACDC failure); the draw budget (max_draw_factor × n) is what bounds the loop."""
    m = create_model("ddpm_joint", {**TINY, "image_size": 32, "steps": 2})
    m.fit(slices, seed=0)
    good = slices.labels[:2].copy()
    bad = good.copy()
    bad[:, 0:2, 0:2] = LV
    cycle = np.concatenate([good, bad, bad[:1]])  # 2 of every 5 plausible

    def draw(n, labels, seed):
        lab = torch.as_tensor(np.resize(cycle, (n, 32, 32)).astype(np.int64))
        return torch.cat([torch.zeros((n, 1, 32, 32)), one_hot(lab) * 2 - 1], 1)

    monkeypatch.setattr(m, "_draw", draw)
    out = m.sample(200, seed=0)
    assert len(out.labels) == 200 and check_label_maps(out.labels).keep.all()
    assert m.last_sample_report["n"] <= 8 * 200 and m.last_sample_report["rejected_fraction"] > 0.5


def test_joint_decodes_only_trained_classes_at_the_native_size(tmp_path: Path, monkeypatch) -> None:
    """Generated scar-channel noise of a model trained without scar never becomes a label, and the label channels
    are upsampled before the argmax (smooth boundaries at the native size, not working-grid blocks)."""
    from medsynth.labels import SCAR

    cine = toy_slices(6, 2, 64, seed=1)  # no scar in the training maps
    assert not (cine.labels == SCAR).any()
    m = create_model("ddpm_joint", {**TINY, "image_size": 32, "steps": 2, "plausibility_filter": False})
    m.fit(cine, seed=0)
    assert SCAR not in m.label_classes
    small = torch.as_tensor(to_size(cine.labels[:2, None].astype(np.float32), 32)[:, 0].round().astype(np.int64))
    field = one_hot(small) * 2 - 1
    field[:, SCAR] = 3.0  # louder than any trained channel everywhere

    def draw(n, labels, seed):
        return torch.cat([torch.zeros((n, 1, 32, 32)), field[:n]], 1)

    monkeypatch.setattr(m, "_draw", draw)
    out = m.sample(2, seed=0)
    assert out.labels.shape == (2, 64, 64) and not (out.labels == SCAR).any()
    # bilinear: the 45° zero crossing of a smooth field decodes into steps of one native pixel, not into the
    # working grid's two-pixel blocks (nearest-neighbour upsampling)
    diag = torch.full((1, N_CLASSES, 32, 32), -1.0)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    diag[0, LV] = (xx - yy + 0.5) / 8
    diag[0, 0] = -(xx - yy + 0.5) / 8
    lab = m._decode_labels(diag)[0]
    per_row = (lab == LV).sum(1)  # LV pixels per native row: one fewer each row down
    assert set(np.diff(per_row[4:-4]).tolist()) == {-1}
    m.save(tmp_path / "m")
    assert load_model(tmp_path / "m").label_classes == m.label_classes


# ---- the plausibility check --------------------------------------------------------------------------------
def _heart(size: int = 48) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    r = np.hypot(yy - 24, xx - 26)
    lab = np.zeros((size, size), np.uint8)
    lab[r < 12] = MYO
    lab[r < 8] = LV
    lab[(np.hypot(yy - 24, xx - 8) < 8) & (lab == 0)] = RV
    return lab


def test_plausibility_accepts_a_heart_and_rejects_broken_maps() -> None:
    ok = _heart()
    assert check_label_map(ok) is None
    two_lv = ok.copy()
    two_lv[2:4, 44:46] = LV
    open_ring = ok.copy()
    open_ring[22:27, 32:40] = 0  # a gap through the wall on the right
    rv_inside = ok.copy()
    rv_inside[22:26, 24:28] = RV
    island = ok.copy()
    island[44:46, 44:46] = MYO
    assert check_label_map(two_lv) == "LV islands"
    assert check_label_map(open_ring) == "open myocardial ring"
    assert check_label_map(rv_inside) == "RV inside the ring"
    assert check_label_map(island) == "myocardium islands"
    assert check_label_map(np.zeros_like(ok)) == "no LV"
    rep = check_label_maps(np.stack([ok, two_lv, open_ring, rv_inside]))
    assert rep.keep.tolist() == [True, False, False, False] and rep.rejected_fraction == 0.75


def test_plausibility_accepts_toy_and_phantom_hearts(tmp_path: Path) -> None:
    from slice_sets import phantom_slices

    for s in (toy_slices(4, 2, 32, scar=True, seed=3), phantom_slices(tmp_path, subjects=2)):
        has_lv = (s.labels == LV).reshape(len(s), -1).any(1)
        assert has_lv.sum() >= 4
        assert check_label_maps(s.labels[has_lv]).keep.all()


@pytest.mark.realdata
def test_plausibility_accepts_real_acdc_maps(acdc_root: Path, tmp_path: Path) -> None:
    from slice_sets import acdc_slices

    s = acdc_slices(acdc_root, tmp_path, n_patients=6)
    has_lv = (s.labels == LV).reshape(len(s), -1).any(1)
    rep = check_label_maps(s.labels[has_lv])
    # basal slices can be open at the outflow tract in real annotations: most, not all, must pass
    assert rep.rejected_fraction <= 0.1, rep.as_dict()


def test_attention_levels_build_and_sample(slices) -> None:
    """Attention blocks (MONAI needs einops for them) in the tiny U-Net: fit, then a finite sample."""
    m = create_model("ddpm_uncond", {**TINY, "steps": 2, "attention_levels": (False, True)})
    m.fit(slices, seed=0)
    assert np.isfinite(m.sample(2, seed=0).images).all()


def test_ldm_scale_factor_is_the_inverse_latent_std_and_samples_decode(slices, tmp_path: Path) -> None:
    m = create_model("ldm", {**TINY, "ae_channels": (8, 8), "ae_steps": 3, "steps": 3, "image_size": 16})
    report = m.fit(slices, seed=0)
    x = torch.from_numpy(to_size(slices.images, 16)) * 2 - 1  # the model's own resize and scale
    with torch.no_grad():
        z = m.module("ae").encode(x)[0] * m.scale_factor
    assert float(z.std()) == pytest.approx(1.0, rel=1e-4) and report["scale_factor"] == m.scale_factor
    assert m.work_size == 8 and set(m.history) >= {"autoencoder", "loss"}
    s = m.sample(2, slices.labels[:2], seed=0)
    assert s.images.shape == (2, 1, 32, 32) and np.isfinite(s.images).all()
    m.save(tmp_path / "ldm")
    np.testing.assert_array_equal(load_model(tmp_path / "ldm").sample(2, slices.labels[:2], seed=0).images, s.images)


def test_area_condition_keeps_a_thin_ring_as_class_fractions() -> None:
    """``label_resize: area``: each working-size cell holds the class fractions of its block of the full-size
    map (the block means of the one-hot), so a 1-px myocardium ring survives a 4x reduction; nearest keeps one
    pixel per block and can miss it."""
    lab = np.zeros((1, 32, 32), np.uint8)
    lab[0, 8:24, 8:24] = MYO
    lab[0, 9:23, 9:23] = LV  # a 1-px MYO ring around the LV
    area = create_model("ddpm", {**TINY, "image_size": 8, "label_resize": "area"})
    near = create_model("ddpm", {**TINY, "image_size": 8, "label_resize": "nearest"})
    c = area.cond_tensor(lab).numpy()
    block = one_hot(torch.from_numpy(lab).long(), N_CLASSES).numpy().reshape(1, N_CLASSES, 8, 4, 8, 4).mean((3, 5))
    np.testing.assert_allclose(c, block, atol=1e-6)
    np.testing.assert_allclose(c.sum(1), 1.0, atol=1e-6)
    crossed = (lab[0] == MYO).reshape(8, 4, 8, 4).any((1, 3))  # the blocks the ring passes through
    np.testing.assert_array_equal(c[0, MYO] > 0, crossed)
    n = near.cond_tensor(lab).numpy()
    assert set(np.unique(n)) <= {0.0, 1.0} and (n[0, MYO] > 0).sum() < crossed.sum()


def test_area_condition_fits_samples_and_reloads(slices, tmp_path: Path) -> None:
    m = create_model("ddpm", {**TINY, "steps": 3, "label_resize": "area"})
    m.fit(slices, seed=0)
    a = m.sample(2, slices.labels[:2], seed=1)
    assert a.images.shape == (2, 1, 32, 32) and np.isfinite(a.images).all()
    assert np.isfinite(m.score(slices).slice_scores).all()
    m.save(tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert back.config.label_resize == "area"
    np.testing.assert_array_equal(back.sample(2, slices.labels[:2], seed=1).images, a.images)


def test_diffusion_saved_before_label_resize_loads_nearest(slices, tmp_path: Path) -> None:
    """A model saved before the key conditioned on nearest-resized maps: it loads so, whatever the default."""
    import json

    m = create_model("ldm", {**TINY, "ae_channels": (8, 8), "ae_steps": 2, "steps": 2, "image_size": 16,
                             "label_resize": "nearest"})  # fmt: skip
    m.fit(slices, seed=0)
    m.save(tmp_path / "old")
    path = tmp_path / "old" / "model.json"
    record = json.loads(path.read_text())
    del record["meta"]["label_resize"], record["config"]["label_resize"]
    path.write_text(json.dumps(record))
    back = load_model(tmp_path / "old")
    assert back.config.label_resize == "nearest"
    np.testing.assert_array_equal(back.sample(2, slices.labels[:2], seed=0).images,
                                  m.sample(2, slices.labels[:2], seed=0).images)  # fmt: skip
