"""The one training loop and the torch-family base: several optimiser steps, EMA, LR schedules, clipping,
checkpoint/resume, the NaN guard, training curves, device handling and state round trips of every migrated
family."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from medsynth.data.slices import SliceSet
from medsynth.errors import ConfigError, TrainingError
from medsynth.models.base import RUNTIME_CONFIG_KEYS, GenerativeModel
from medsynth.models.latent.toy import toy_slices
from medsynth.models.registry import create_model
from medsynth.models.torch_family import CURVES_CSV, CURVES_PNG, TorchConfig, resolve_device, write_curves
from medsynth.models.training import EMA, TrainStep, make_scheduler, schedule_factor, train_loop
from medsynth.utils.seeding import seed_everything

AE = {"image_size": 16, "channels": (4, 8), "strides": (2, 2), "latent_size": 4, "batch_size": 8, "progress": False}
FLOW = {"image_size": 16, "levels": 2, "depth": 1, "hidden": 8, "batch_size": 8, "progress": False}
GAN = {"image_size": 16, "channels": (4, 8), "n_res_blocks": 1, "disc_channels": 4, "disc_layers": 2,
       "batch_size": 4, "progress": False}  # fmt: skip


@pytest.fixture(scope="module")
def slices() -> SliceSet:
    return toy_slices(4, 2, size=16, seed=1)


@pytest.fixture(scope="module")
def two_domains() -> SliceSet:
    """Toy slices in two 'modality' domains: the second darker with bright myocardium-like texture."""
    a, b = toy_slices(3, 2, size=16, seed=1), toy_slices(3, 2, size=16, seed=2)
    meta = a.meta.copy(), b.meta.copy()
    meta[0]["modality"], meta[1]["modality"] = "cine", "lge"
    import pandas as pd

    return SliceSet(
        np.concatenate([a.images, 0.5 * b.images + 0.2]).astype(np.float32),
        np.concatenate([a.labels, b.labels]),
        pd.concat(meta, ignore_index=True),
    )


# ---- the loop --------------------------------------------------------------------------------------------
def _toy_pair(seed: int = 0):
    seed_everything(seed)
    return nn.Linear(3, 1), nn.Linear(3, 1)


def test_two_optimiser_steps_train_both_and_freeze_the_other():
    a, b = _toy_pair()
    x = torch.randn(32, 3)
    target_a, target_b = x @ torch.tensor([1.0, -2.0, 0.5]), x @ torch.tensor([-1.0, 0.0, 2.0])
    data = torch.cat([x, target_a[:, None], target_b[:, None]], dim=1)
    seen = {"a": 0, "b": 0, "frozen_ok": True}

    def loss_a(batch, it):
        seen["a"] += 1
        seen["frozen_ok"] &= not any(p.requires_grad for p in b.parameters())
        return ((a(batch[:, :3])[:, 0] - batch[:, 3]) ** 2).mean(), {"mse_a": 0.0}

    def loss_b(batch, it):
        seen["b"] += 1
        seen["frozen_ok"] &= not any(p.requires_grad for p in a.parameters())
        # the b loss also runs through a (like a generator loss through a discriminator): a must not learn here
        return ((b(batch[:, :3])[:, 0] + 0 * a(batch[:, :3])[:, 0] - batch[:, 4]) ** 2).mean(), {}

    steps = [
        TrainStep("a", torch.optim.Adam(a.parameters(), 0.05), loss_a, [a], repeats=2),
        TrainStep("b", torch.optim.Adam(b.parameters(), 0.1), loss_b, [b], every=2),  # TTUR: other LR
    ]
    res = train_loop(steps, data, 60, 16, modules={"a": a, "b": b}, seed=0, progress=False)
    assert seen["a"] == 120 and seen["b"] == 30 and seen["frozen_ok"]
    assert all(p.requires_grad for p in [*a.parameters(), *b.parameters()])  # restored after the loop
    hist_a, hist_b = res.history["a"], res.history["b"]
    assert len(hist_a) == len(hist_b) == 60 and math.isnan(hist_b[1]) and not math.isnan(hist_b[2])
    kept_b = [v for v in hist_b if not math.isnan(v)]
    assert np.mean(hist_a[-5:]) < 0.2 * np.mean(hist_a[:5]) and np.mean(kept_b[-5:]) < 0.5 * np.mean(kept_b[:5])
    assert res.main == "b" and res.losses == kept_b
    rep = res.report(32, 16, 1.0)
    assert rep["steps"] == 60 and rep["a_loss_last"] is not None
    assert rep["loss_last"] == pytest.approx(np.mean(kept_b[-20:]))


def test_ema_matches_the_analytic_average():
    """SGD on ½(w − c)² gives w_{t+1} = w_t − lr (w_t − c); EMA: e_0 = w_0, e_{t+1} = d_t e_t + (1 − d_t) w_{t+1}
    with the warmed-up decay d_t = min(d, (1 + t) / (10 + t))."""
    seed_everything(0)
    net = nn.Linear(1, 1, bias=False).double()
    w0, c, lr, d, n = float(net.weight.detach()), 3.0, 0.1, 0.9, 25
    ema = EMA(net, d)

    def loss(batch, it):
        return 0.5 * (net.weight.sum() - c) ** 2, {}

    step = TrainStep("loss", torch.optim.SGD(net.parameters(), lr), loss, [net])
    train_loop([step], torch.zeros(4, 1), n, 4, modules={"net": net}, ema={"net": ema}, progress=False)
    w, e = w0, w0
    for t in range(n):
        w = w - lr * (w - c)
        d_t = min(d, (1 + t) / (10 + t))
        e = d_t * e + (1 - d_t) * w
    assert float(net.weight.detach()) == pytest.approx(w, abs=1e-12)
    assert float(ema.module.weight) == pytest.approx(e, abs=1e-12)
    assert abs(e - w) > 1e-3  # the average lags: the test can tell EMA from the raw weights
    with pytest.raises(ValueError, match="ema_decay"):
        EMA(net, 1.0)


def test_ema_warm_up_leaves_almost_none_of_the_random_initial_weights():
    """The share of the initial weights left in the shadow is the product of the decays: with a fixed 0.999 over
    1000 steps that is 37 % (samples of an under-averaged diffusion model are noise); the warm-up makes it
    negligible while the decay still reaches its configured value."""
    ema = EMA(nn.Linear(1, 1), 0.999)
    share = float(np.prod([ema.decay_at(t) for t in range(1000)]))
    assert 0.999**1000 > 0.3
    assert share < 1e-5
    assert ema.decay_at(10**6) == 0.999 and ema.decay_at(0) == pytest.approx(0.1)


def test_lr_schedule_values_and_the_loop_follows_them():
    assert schedule_factor("constant", 7, 10) == 1.0
    assert [schedule_factor("linear", i, 10, warmup=4) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule_factor("cosine", 4, 10, warmup=4) == pytest.approx(1.0)
    assert schedule_factor("cosine", 7, 10, warmup=4) == pytest.approx(0.5)  # p = 3/6: ½(1 + cos π/2)
    assert schedule_factor("linear", 7, 10, warmup=4) == pytest.approx(0.5)
    assert schedule_factor("cosine", 10, 10) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="lr_schedule"):
        schedule_factor("exponential", 0, 10)
    net = nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    used = []

    def loss(batch, it):
        used.append(opt.param_groups[0]["lr"])
        return net(batch).pow(2).mean(), {}

    step = TrainStep("loss", opt, loss, [net], scheduler=make_scheduler(opt, "cosine", 12, warmup=3))
    train_loop([step], torch.randn(8, 2), 12, 4, modules={"net": net}, progress=False)
    np.testing.assert_allclose(used, [0.2 * schedule_factor("cosine", i, 12, 3) for i in range(12)], rtol=1e-12)
    assert make_scheduler(opt, "constant", 12) is None


def test_grad_clip_bounds_the_update_norm():
    def run(clip):
        seed_everything(0)
        net = nn.Linear(4, 1)
        before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
        opt = torch.optim.SGD(net.parameters(), lr=1.0)
        step = TrainStep("loss", opt, lambda b, it: (1000.0 * net(b).sum(), {}), [net], grad_clip=clip)
        train_loop([step], torch.ones(4, 4), 1, 4, modules={"net": net}, progress=False)
        return float(torch.linalg.vector_norm(torch.cat([p.detach().flatten() for p in net.parameters()]) - before))

    assert run(0.5) == pytest.approx(0.5, rel=1e-5)  # SGD lr 1: the update is the clipped gradient
    assert run(None) > 100.0
    with pytest.raises(ValueError, match="grad_clip"):
        TrainStep("loss", torch.optim.SGD(nn.Linear(1, 1).parameters(), 1.0), lambda b, it: None, grad_clip=0.0)


def _gan_like(seed: int):
    """Two networks, two Adam steps (cosine LR), EMA, torch-RNG noise in the loss and two datasets."""
    seed_everything(seed)
    d, g = nn.Linear(3, 1), nn.Linear(2, 3)
    data = torch.Generator().manual_seed(99)  # the data do not depend on the init seed
    real, noise_src = torch.randn(20, 3, generator=data), torch.randn(14, 2, generator=data)
    opt_d, opt_g = torch.optim.Adam(d.parameters(), 1e-2), torch.optim.Adam(g.parameters(), 5e-3)

    def fake(batch, it):
        return {**batch, "fake": g(batch["z"] + 0.1 * torch.randn_like(batch["z"]))}

    def loss_d(x, it):
        return (d(x["real"]) - 1).pow(2).mean() + d(x["fake"].detach()).pow(2).mean(), {"d_real": 0.0}

    def loss_g(x, it):
        return (d(x["fake"]) - 1).pow(2).mean(), {}

    steps = [
        TrainStep("discriminator", opt_d, loss_d, [d], scheduler=make_scheduler(opt_d, "cosine", 10)),
        TrainStep("generator", opt_g, loss_g, [g], scheduler=make_scheduler(opt_g, "linear", 10, warmup=2)),
    ]
    return steps, {"real": real, "z": noise_src}, {"d": d, "g": g}, {"g": EMA(g, 0.8)}, fake


def _state_bytes(modules, ema, steps) -> dict[str, bytes]:
    out = {f"m.{n}.{k}": v.numpy().tobytes() for n, m in modules.items() for k, v in m.state_dict().items()}
    out.update({f"e.{n}.{k}": v.numpy().tobytes() for n, e in ema.items() for k, v in e.state_dict().items()})
    for s in steps:
        for pid, st in s.optimizer.state_dict()["state"].items():
            out.update({f"o.{s.name}.{pid}.{k}": v.numpy().tobytes() for k, v in st.items()})
    return out


def test_interrupted_run_resumed_from_checkpoint_gives_the_same_bytes(tmp_path):
    steps, data, mods, ema, prep = _gan_like(0)
    straight = train_loop(steps, data, 10, 4, modules=mods, ema=ema, prepare=prep, seed=3, progress=False)
    reference = _state_bytes(mods, ema, steps)

    steps, data, mods, ema, prep = _gan_like(0)
    inner = steps[1].loss

    def crash_at_7(x, it):
        if it == 7:
            raise KeyboardInterrupt  # killed mid-run, after the checkpoint of iteration 6
        return inner(x, it)

    steps[1].loss = crash_at_7
    with pytest.raises(KeyboardInterrupt):
        train_loop(steps, data, 10, 4, modules=mods, ema=ema, prepare=prep, seed=3, checkpoint_dir=tmp_path,
                   checkpoint_every=3, progress=False)  # fmt: skip
    steps, data, mods, ema, prep = _gan_like(1)  # fresh objects, other init: all must come from the checkpoint
    resumed = train_loop(steps, data, 10, 4, modules=mods, ema=ema, prepare=prep, seed=3, checkpoint_dir=tmp_path,
                         checkpoint_every=3, progress=False)  # fmt: skip
    assert resumed.resumed_from == 6 and resumed.step == 10
    assert _state_bytes(mods, ema, steps) == reference
    for key in straight.history:
        np.testing.assert_array_equal(resumed.history[key], straight.history[key])
    assert [s.scheduler.last_epoch for s in steps] == [10, 10]


def test_family_resume_with_ema_and_schedule_gives_identical_weights_file(slices, tmp_path):
    # (a cosine / linear schedule depends on `steps`, so a 5-step run is not the start of an 8-step one; the
    # loop-level test above interrupts a scheduled run for real)
    cfg = {**AE, "ema_decay": 0.9, "warmup_steps": 2, "grad_clip": 1.0, "checkpoint_every": 3}
    straight = create_model("vae", {**cfg, "steps": 8})
    straight.fit(slices, seed=0)
    create_model("vae", {**cfg, "steps": 5, "checkpoint_dir": str(tmp_path / "ck")}).fit(slices, seed=0)
    resumed = create_model("vae", {**cfg, "steps": 8, "checkpoint_dir": str(tmp_path / "ck")})
    assert resumed.fit(slices, seed=0)["resumed_from"] == 5
    straight.save(tmp_path / "a")
    resumed.save(tmp_path / "b")
    weights = "weights.safetensors"
    assert (tmp_path / "a" / weights).read_bytes() == (tmp_path / "b" / weights).read_bytes()
    assert (tmp_path / "a" / CURVES_CSV).read_bytes() == (tmp_path / "b" / CURVES_CSV).read_bytes()
    assert straight.model_hash == resumed.model_hash


def test_nan_guard_names_the_step_and_the_loss():
    a, b = _toy_pair()

    def loss_g(batch, it):
        out = b(batch).pow(2).mean()
        return (out * float("nan") if it == 2 else out), {}

    steps = [
        TrainStep("discriminator", torch.optim.SGD(a.parameters(), 0.1), lambda x, it: (a(x).pow(2).mean(), {}), [a]),
        TrainStep("generator", torch.optim.SGD(b.parameters(), 0.1), loss_g, [b]),
    ]
    with pytest.raises(TrainingError, match="loss 'generator' became nan at step 2"):
        train_loop(steps, torch.randn(8, 3), 5, 4, modules={"a": a, "b": b}, progress=False, desc="fit toy")
    with pytest.raises(ValueError, match="unique"):
        train_loop([steps[0], steps[0]], torch.randn(8, 3), 5, 4, modules={}, progress=False)


def test_corrupt_checkpoint_is_an_input_error(tmp_path):
    from medsynth.errors import InputFileError

    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    net = nn.Linear(2, 1)
    step = TrainStep("loss", torch.optim.SGD(net.parameters(), 0.1), lambda x, it: (net(x).mean(), {}), [net])
    with pytest.raises(InputFileError, match="last.pt"):
        train_loop([step], torch.randn(4, 2), 2, 2, modules={"net": net}, checkpoint_dir=tmp_path, progress=False)


# ---- the family base -------------------------------------------------------------------------------------
def test_curves_written_beside_a_saved_model_deterministically(slices, tmp_path):
    paths = []
    for name in ("a", "b"):
        m = create_model("ae", {**AE, "steps": 7})
        m.fit(slices, seed=0)
        paths.append(m.save(tmp_path / name))
    csv = (paths[0] / CURVES_CSV).read_text(encoding="utf-8").splitlines()
    assert csv[0] == "step,loss,recon_nll,kl,beta" and len(csv) == 8
    assert [int(r.split(",")[0]) for r in csv[1:]] == list(range(1, 8))
    assert float(csv[1].split(",")[1]) == m.history["loss"][0]
    png = (paths[0] / CURVES_PNG).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and b"Software" not in png
    for f in (CURVES_CSV, CURVES_PNG):
        assert (paths[0] / f).read_bytes() == (paths[1] / f).read_bytes(), f
    loaded = GenerativeModel.load(paths[0])
    loaded.save(tmp_path / "again")  # a loaded model has no history: no curves, no error
    assert not (tmp_path / "again" / CURVES_CSV).exists()


def test_curves_csv_values_round_trip_and_gaps(tmp_path):
    hist = {"discriminator": [0.5, math.nan, 0.25], "generator": [1 / 3, 2.0, 1e-30]}
    write_curves(hist, tmp_path, title="toy")
    rows = (tmp_path / CURVES_CSV).read_text(encoding="utf-8").splitlines()
    assert rows[0] == "step,discriminator,generator"
    assert rows[2].split(",")[1] == ""  # the step did not run
    assert float(rows[1].split(",")[2]) == 1 / 3 and float(rows[3].split(",")[2]) == 1e-30


def test_tensorboard_gets_every_value_when_installed(tmp_path, monkeypatch):
    calls = []

    class Writer:
        def __init__(self, log_dir):
            calls.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    written = write_curves({"loss": [2.0, 1.0, math.nan, 0.5]}, tmp_path)
    assert calls[0] == ("dir", str(tmp_path / "tensorboard")) and calls[-1] == ("close",)
    assert calls[1:-1] == [("train/loss", 2.0, 1), ("train/loss", 1.0, 2), ("train/loss", 0.5, 4)]
    assert tmp_path / "tensorboard" in written


def test_device_auto_resolves_here_and_outputs_are_cpu_numpy(slices):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert TorchConfig().device == "auto" and resolve_device("auto").type == expected
    assert "device" in RUNTIME_CONFIG_KEYS
    m = create_model("ae", {**AE, "steps": 2})
    report = m.fit(slices, seed=0)
    assert m.device.type == expected and report["device"].startswith(expected)
    s = m.sample(2, seed=0)
    assert type(s.images) is np.ndarray and s.images.dtype == np.float32
    sc = m.score(slices)
    assert type(sc.pixel_maps) is np.ndarray and type(sc.slice_scores) is np.ndarray
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device"):
            resolve_device("cuda:0")
        cpu = create_model("ae", {**AE, "steps": 2, "device": "cpu"})
        cpu.fit(slices, seed=0)
        assert cpu.model_hash == m.model_hash  # where it ran is not part of the model


def test_amp_is_ignored_on_cpu(slices):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU path: amp must not change a CPU run")
    plain, mixed = create_model("ae", {**AE, "steps": 3}), create_model("ae", {**AE, "steps": 3, "amp": True})
    plain.fit(slices, seed=0)
    mixed.fit(slices, seed=0)
    for (k, a), b in zip(plain.net.state_dict().items(), mixed.net.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.parametrize(
    "bad, key",
    [({"device": "gpu"}, "device"), ({"ema_decay": 1.5}, "ema_decay"), ({"warmup_steps": 9, "steps": 3}, "warmup"),
     ({"grad_clip": 0}, "grad_clip"), ({"lr_schedule": "exp"}, "lr_schedule"), ({"devise": "cpu"}, "devise")],
)  # fmt: skip
def test_shared_keys_validated_naming_the_key(bad, key):
    for family in ("ae", "flow", "cyclegan"):
        with pytest.raises(ConfigError, match=key):
            create_model(family, bad)


def test_flow_still_accepts_clip_grad():
    m = create_model("flow", {**FLOW, "clip_grad": 7.0})
    assert m.config.grad_clip == 7.0 and "clip_grad" not in m.config.model_dump()


FAMILIES = {
    "ae": AE, "dae": {**AE, "noise_res": 4}, "vae": AE, "cvae": AE, "flow": {**FLOW, "lr": 2e-3}, "cyclegan": GAN,
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_state_round_trip_with_ema_gives_identical_outputs(family, slices, two_domains, tmp_path):
    data = two_domains if family == "cyclegan" else slices
    m = create_model(family, {**FAMILIES[family], "steps": 4, "ema_decay": 0.5})
    m.fit(data, seed=0)
    name = next(iter(m.nets))
    assert m.module(name) is m.ema[name].module  # inference runs on the EMA weights
    arrays, _ = m.get_state()
    assert any(k.startswith(f"ema.{name}.") for k in arrays) and any(k.startswith(f"{name}.") for k in arrays)
    m.save(tmp_path / family)
    back = GenerativeModel.load(tmp_path / family)
    assert back.model_hash == m.model_hash and sorted(back.ema) == sorted(m.ema)
    if family == "cyclegan":
        x = data.images[:3]
        np.testing.assert_array_equal(back.translate(x), m.translate(x))
        np.testing.assert_array_equal(back.translate(x, direction="backward"), m.translate(x, direction="backward"))
        return
    labels = data.labels[:3] if m.conditional else None
    a, b = back.sample(3, labels=labels, seed=4), m.sample(3, labels=labels, seed=4)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(back.score(data).slice_scores, m.score(data).slice_scores)


def test_paired_tuple_batches_stay_aligned_and_mappings_are_independent():
    from medsynth.models.training import draw_batch

    x = torch.arange(20.0)[:, None]
    for it in range(7):
        a, b = draw_batch((x, 2 * x), 4, it, seed=5)
        assert torch.equal(b, 2 * a) and len(a) == 4
    d = draw_batch({"a": x, "b": x}, 4, 0, seed=5)
    assert not torch.equal(d["a"], d["b"])  # unpaired domains: each key has its own permutation
    with pytest.raises(ValueError, match="same length"):
        draw_batch((x, x[:3]), 4, 0, seed=0)


def test_model_saved_with_an_unavailable_device_loads_on_cpu(slices, tmp_path):
    import json

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    m = create_model("ae", {**AE, "steps": 2, "device": "cpu"})
    m.fit(slices, seed=0)
    m.save(tmp_path / "m")
    record = json.loads((tmp_path / "m" / "model.json").read_text(encoding="utf-8"))
    record["config"]["device"] = "cuda"  # as written by a fit on a GPU machine
    (tmp_path / "m" / "model.json").write_text(json.dumps(record))
    back = GenerativeModel.load(tmp_path / "m")
    assert back.device.type == "cpu" and back.model_hash == m.model_hash
    np.testing.assert_array_equal(back.sample(2, seed=1).images, m.sample(2, seed=1).images)
    with pytest.raises(ConfigError, match="device"):
        create_model("ae", {**AE, "steps": 1, "device": "cuda"}).fit(slices, seed=0)  # fitting there is refused


def test_checkpoint_of_another_configuration_is_an_input_error(slices, tmp_path):
    from medsynth.errors import InputFileError

    create_model("ae", {**AE, "steps": 2, "checkpoint_dir": str(tmp_path)}).fit(slices, seed=0)
    other = create_model("ae", {**AE, "latent_size": 6, "steps": 4, "checkpoint_dir": str(tmp_path)})
    with pytest.raises(InputFileError, match="does not match"):
        other.fit(slices, seed=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (checks device placement and AMP)")
@pytest.mark.parametrize("family", ["vae", "cyclegan"])
def test_cuda_fit_with_amp_resumes_and_returns_cpu_numpy(family, slices, two_domains, tmp_path):
    data = two_domains if family == "cyclegan" else slices
    cfg = {**FAMILIES[family], "device": "cuda", "amp": True, "ema_decay": 0.9, "checkpoint_every": 2}
    m = create_model(family, {**cfg, "steps": 4, "checkpoint_dir": str(tmp_path / "ck")})
    report = m.fit(data, seed=0)
    assert report["device"].startswith("cuda") and all(p.is_cuda for p in m.nets[next(iter(m.nets))].parameters())
    resumed = create_model(family, {**cfg, "steps": 6, "checkpoint_dir": str(tmp_path / "ck")})
    assert resumed.fit(data, seed=0)["resumed_from"] == 4
    out = resumed.translate(data.images[:2]) if family == "cyclegan" else resumed.sample(2, seed=0).images
    assert type(out) is np.ndarray and out.dtype == np.float32 and np.all(np.isfinite(out))
    resumed.save(tmp_path / "m")
    back = GenerativeModel.load(tmp_path / "m")
    again = back.translate(data.images[:2]) if family == "cyclegan" else back.sample(2, seed=0).images
    np.testing.assert_array_equal(again, out)


# ---- announcing the length of a fit, progress without garbled bars -------------------------------------------
def test_long_fit_announces_its_expected_length_early(slices, caplog):
    import logging
    import re

    with caplog.at_level(logging.INFO):
        create_model("vae", {**AE, "steps": 12}).fit(slices, seed=0)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("medsynth")]
    announced = [i for i, m in enumerate(messages) if "expected ≈" in m]
    assert len(announced) == 1, messages
    line = messages[announced[0]]
    number = r"[\d.]+ (?:s|min|h)"
    assert re.fullmatch(rf"fit vae: 12 steps × batch 8 on cpu; expected ≈ {number} \({number} for the first 5 steps\)",
                        line), line  # fmt: skip
    done = [i for i, m in enumerate(messages) if re.fullmatch(rf"fit vae: 12 steps in {number}", m)]
    assert done and announced[0] < done[0]  # up front, not after the fact
    caplog.clear()
    with caplog.at_level(logging.INFO):
        create_model("vae", {**AE, "steps": 4}).fit(slices, seed=0)  # shorter than the timed steps
    assert not [r for r in caplog.records if "expected ≈" in r.getMessage()]


def test_expected_length_is_the_rate_of_the_first_steps(monkeypatch, caplog):
    import logging

    from medsynth.utils import progress

    clock = iter(np.arange(0.0, 100.0, 0.42))  # 0.42 s per step
    monkeypatch.setattr(progress.time, "perf_counter", lambda: float(next(clock)))
    with caplog.at_level(logging.INFO), progress.Progress(150, "fit toy", "150 steps × batch 4 on cpu") as p:
        for _ in range(6):
            p.update({"loss": 1.0})
    (line,) = [r.getMessage() for r in caplog.records if "expected" in r.getMessage()]
    assert line == "fit toy: 150 steps × batch 4 on cpu; expected ≈ 63 s (2.1 s for the first 5 steps)"
    assert progress.format_seconds(4.6 * 60) == "4.6 min" and progress.format_seconds(3 * 3600) == "3.0 h"


def test_one_bar_at_a_time_and_none_outside_the_main_thread(monkeypatch):
    import threading

    from medsynth.utils import progress

    seen = []
    t = threading.Thread(target=lambda: seen.append(progress.bar_allowed()))
    t.start()
    t.join()
    assert seen == [False]  # a task runner's worker thread logs lines instead
    monkeypatch.setattr(progress, "bar_allowed", lambda: True)  # as on a terminal
    first = progress.Progress(10, "fit a", "10 steps")
    second = progress.Progress(10, "fit b", "10 steps")
    try:
        assert first.bar and not second.bar  # the second would draw over the first one's line
    finally:
        second.close()
        first.close()
    third = progress.Progress(10, "fit c", "10 steps", enabled=True)
    assert third.bar
    third.close()
    assert not progress.Progress(10, "fit d", "10 steps", enabled=False).bar
