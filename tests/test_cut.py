"""CUT / FastCUT translation families, PatchNCE, the segmentation-consistency loss and the paired PSNR / SSIM
evaluation (toy domains: phantom slices and their inverted contrast, which are paired by construction)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medsynth.data.slices import SliceSet
from medsynth.errors import ConfigError, MedsynthError
from medsynth.evaluation.translation import pair_index, paired_rows, paired_similarity, paired_targets
from medsynth.models.base import GenerativeModel
from medsynth.models.latent.common import to_size
from medsynth.models.registry import create_model, get_family
from medsynth.models.translation.patchnce import PatchProjection, patch_nce_loss

TINY = {
    "domain_key": "vendor", "source": "toy-a", "target": "toy-b", "image_size": 32, "channels": (8, 16),
    "n_res_blocks": 1, "disc_channels": 8, "disc_layers": 2, "batch_size": 4, "num_patches": 64, "nce_dim": 32,
    "progress": False,
}  # fmt: skip


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> SliceSet:
    """Phantom cine slices (domain toy-a) and the same slices with inverted contrast (toy-b), 64 × 64."""
    from medsynth.data.preprocess import PreprocessConfig, load_slices
    from medsynth.phantom import generate_dataset

    tmp = tmp_path_factory.mktemp("toy")
    m = generate_dataset(tmp / "cine", subjects=3, contrast="cine", seed=0, shape=(64, 64, 4))
    a = load_slices(m, cfg=PreprocessConfig(size=64))
    meta_a, meta_b = a.meta.copy(), a.meta.copy()
    meta_a["vendor"], meta_b["vendor"] = "toy-a", "toy-b"
    inverted = (1.0 - a.images).astype(np.float32)
    return SliceSet(
        np.concatenate([a.images, inverted]),
        np.concatenate([a.labels, a.labels]),
        pd.concat([meta_a, meta_b], ignore_index=True),
    )


def _domains(s: SliceSet) -> tuple[SliceSet, SliceSet]:
    v = s.meta["vendor"].to_numpy()
    return s.subset(v == "toy-a"), s.subset(v == "toy-b")


# ---- PatchNCE -----------------------------------------------------------------------------------------
def test_patchnce_prefers_the_identity_mapping_over_a_shuffled_one():
    torch.manual_seed(0)
    feats = [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)]
    head = PatchProjection([8, 16], dim=16)
    shuffled = []
    for f in feats:  # the same features, moved to other locations: the content no longer matches the place
        perm = torch.randperm(f.shape[-2] * f.shape[-1])
        shuffled.append(f.flatten(2)[:, :, perm].reshape(f.shape))
    torch.manual_seed(1)
    same = patch_nce_loss(feats, feats, head, num_patches=32, tau=0.07)
    torch.manual_seed(1)
    moved = patch_nce_loss(shuffled, feats, head, num_patches=32, tau=0.07)
    assert float(same.detach()) < float(moved.detach())
    # a query that is its own key is the nearest of the P keys: the loss is below chance level log(P)
    assert float(same.detach()) < np.log(32)


def test_patchnce_gradients_reach_queries_not_keys():
    torch.manual_seed(0)
    q = torch.randn(1, 4, 4, 4, requires_grad=True)
    k = torch.randn(1, 4, 4, 4, requires_grad=True)
    patch_nce_loss([q], [k], PatchProjection([4], dim=8), num_patches=8).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None


# ---- config -------------------------------------------------------------------------------------------
def test_fastcut_defaults_follow_the_paper_and_bad_keys_name_themselves():
    cut, fast = get_family("cut").Config(), get_family("fastcut").Config()
    assert (cut.lambda_gan, cut.lambda_nce, cut.nce_identity, cut.flip_equivariance) == (1.0, 1.0, True, False)
    assert (fast.lambda_nce, fast.nce_identity, fast.flip_equivariance) == (10.0, False, True)
    assert cut.num_patches == 256 and cut.nce_tau == 0.07
    with pytest.raises(ConfigError, match="nce_layers"):
        create_model("cut", {**TINY, "nce_layers": (0, 9)})
    with pytest.raises(ConfigError, match="lambda_seg"):
        create_model("fastcut", {**TINY, "lambda_seg": -1})


@pytest.mark.parametrize("family", ["cyclegan", "cut", "fastcut"])
def test_untrained_residual_generator_is_exactly_the_identity(toy, family):
    """Default generator: input + a zero-initialised correction, so before any step every family returns its
    input bit for bit (working size = input size: no resampling), up to the clip to the target domain's training
    intensity range; the plain generator does not."""
    a, b = _domains(toy)
    params = {k: v for k, v in TINY.items() if family != "cyclegan" or k not in ("num_patches", "nce_dim")}
    params = {**params, "image_size": a.images.shape[-1], "steps": 0}
    model = create_model(family, params)
    assert model.config.residual is True
    model.fit(toy, seed=0)
    expected = np.clip(a.images[:3], b.images.min(), b.images.max())
    assert np.array_equal(model.translate(a.images[:3]), expected)
    plain = create_model(family, {**params, "residual": False})
    plain.fit(toy, seed=0)
    assert not np.allclose(plain.translate(a.images[:3]), a.images[:3], atol=1e-2)
    with pytest.raises(ConfigError, match="residual"):
        create_model(family, {**params, "residual": "sometimes"})


@pytest.mark.parametrize("family", ["cyclegan", "cut"])
def test_translation_stays_in_the_to_domain_intensity_range(toy, family, tmp_path):
    """Output is clipped to the [min, max] of the to-domain's training slices (a residual correction is
    otherwise unbounded), and the range survives save -> load."""
    a, b = _domains(toy)
    params = {k: v for k, v in TINY.items() if family != "cyclegan" or k not in ("num_patches", "nce_dim")}
    model = create_model(family, {**params, "steps": 2})
    model.fit(toy, seed=0)
    far = a.images[:2] * 10.0 + 5.0  # far above anything either domain holds
    out = model.translate(far)
    working = to_size(b.images, model.config.image_size)
    lo, hi = float(working.min()), float(working.max())
    assert out.min() >= lo - 1e-6 and out.max() <= hi + 1e-6
    assert np.isclose(out.max(), hi)  # clipped, not rescaled: the overshoot sits at the range's top
    model.save(tmp_path / "m")
    assert np.array_equal(GenerativeModel.load(tmp_path / "m").translate(far), out)


def test_a_model_saved_before_residual_generators_loads_as_plain(toy, tmp_path):
    """model.json of an older save has no residual key (its weights are a plain generator's) and no intensity
    range: it must load as a plain generator and translate unclipped."""
    a, _ = _domains(toy)
    model = create_model("cut", {**TINY, "steps": 2, "residual": False})
    model.fit(toy, seed=0)
    model.intensity_range = None
    model.save(tmp_path / "m")
    record = json.loads((tmp_path / "m" / "model.json").read_text(encoding="utf-8"))
    del record["config"]["residual"], record["meta"]["residual"]
    (tmp_path / "m" / "model.json").write_text(json.dumps(record), encoding="utf-8")
    loaded = GenerativeModel.load(tmp_path / "m")
    assert loaded.config.residual is False
    assert np.array_equal(loaded.translate(a.images[:3]), model.translate(a.images[:3]))


# ---- fitting, translating, state ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted_cut(toy) -> GenerativeModel:
    model = create_model("cut", {**TINY, "steps": 150})
    model.fit(toy, seed=0)
    return model


def test_short_fit_beats_the_untranslated_baseline_on_paired_ssim(toy, fitted_cut):
    a, b = _domains(toy)
    translated = SliceSet(fitted_cut.translate(a.images), a.labels, a.meta)
    rows = {r["metric"]: r for r in paired_rows(a, translated, b, bootstrap=0)}
    assert rows["paired_ssim"]["after"] > rows["paired_ssim"]["before"], rows["paired_ssim"]
    assert rows["paired_ssim"]["n_slices"] == len(a)


def test_translation_keeps_shape_and_intensity_range(toy, fitted_cut):
    a, b = _domains(toy)
    out = fitted_cut.translate(a.images[:5])
    assert out.shape == a.images[:5].shape and out.dtype == np.float32 and np.isfinite(out).all()
    lo, hi = float(b.images.min()), float(b.images.max())
    span = hi - lo
    assert out.min() > lo - span and out.max() < hi + span
    big = np.repeat(np.repeat(a.images[:2], 2, axis=2), 2, axis=3)  # other input sizes come back at their size
    assert fitted_cut.translate(big).shape == big.shape


def test_cut_is_one_sided(toy, fitted_cut):
    a, _ = _domains(toy)
    assert fitted_cut.directions == ("forward",)
    with pytest.raises(MedsynthError, match="direction"):
        fitted_cut.translate(a.images[:2], direction="backward")
    # the domains are still described both ways (the evaluation asks which slices are target-domain)
    assert fitted_cut.translation_domains(toy, "backward").mask.sum() == len(a)


@pytest.mark.parametrize("family", ["cut", "fastcut"])
def test_same_seed_same_output_and_save_load_identical(toy, family, tmp_path: Path):
    a, _ = _domains(toy)
    outs = []
    for _ in range(2):
        m = create_model(family, {**TINY, "steps": 6})
        m.fit(toy, seed=3)
        outs.append(m.translate(a.images[:4]))
    assert np.array_equal(outs[0], outs[1])
    m.save(tmp_path / family)
    loaded = GenerativeModel.load(tmp_path / family)
    assert loaded.family == family and np.array_equal(loaded.translate(a.images[:4]), outs[1])
    other = create_model(family, {**TINY, "steps": 6})
    other.fit(toy, seed=4)
    assert not np.array_equal(other.translate(a.images[:4]), outs[0])


@pytest.mark.parametrize("family", ["cut", "fastcut", "cyclegan"])
def test_segmentation_consistency_loss_is_trained_and_logged(toy, family):
    params = {k: v for k, v in TINY.items() if family != "cyclegan" or k not in ("num_patches", "nce_dim")}
    m = create_model(family, {**params, "steps": 4, "lambda_seg": 1.0, "seg_iterations": 3})
    report = m.fit(toy, seed=0)
    assert report["lambda_seg"] == 1.0 and np.isfinite(report["last_seg_ce"]) and report["last_seg_ce"] > 0
    off = create_model(family, {**params, "steps": 4}).fit(toy, seed=0)
    assert "last_seg_ce" not in off


# ---- paired PSNR / SSIM --------------------------------------------------------------------------------
def test_paired_similarity_on_known_inputs():
    rng = np.random.default_rng(0)
    y = rng.random((3, 1, 24, 24))
    same = paired_similarity(y, y)
    assert np.all(np.isinf(same["psnr"])) and np.allclose(same["ssim"], 1.0)
    shifted = paired_similarity(y + 0.1, y, data_range=1.0)  # MSE = 0.01 → PSNR = 10 log10(1 / 0.01) = 20 dB
    assert np.allclose(shifted["psnr"], 20.0)
    assert np.all(shifted["ssim"] < 1.0)
    noisy = paired_similarity(y + rng.normal(0, 0.3, y.shape), y, data_range=1.0)
    assert np.all(noisy["ssim"] < shifted["ssim"]) and np.all(noisy["psnr"] < 20.0)
    with pytest.raises(ValueError, match="shapes"):
        paired_similarity(y, y[:2])


def test_pairs_are_matched_by_subject_phase_and_slice(toy):
    a, b = _domains(toy)
    order = np.arange(len(b))[::-1]
    idx = pair_index(a, b.subset(order))
    assert np.array_equal(order[idx], np.arange(len(a)))
    assert np.array_equal(paired_targets(a, b.subset(order)).images, b.images)
    lone = b.subset(np.arange(len(b) - 1))  # the last source slice has lost its partner
    assert pair_index(a, lone)[-1] == -1 and paired_targets(a, lone) is None
    twice = SliceSet.concat([b, b])  # ambiguous partners are not pairs
    assert (pair_index(a, twice) == -1).all()


# ---- the translate flow on the phantom's paired scanners --------------------------------------------------
@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):  # PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
        yield


def test_translate_flow_on_paired_scanners_reports_paired_fidelity(prefect_harness, tmp_path: Path) -> None:
    """scanner A → B with cut and fastcut: paired PSNR / SSIM rows beside FD and Dice, the true target in the
    figure's last row, the translated slices labelled as the target scanner."""
    from medsynth.data.manifest import load_manifest
    from medsynth.workflows.config import RunConfig
    from pipelines.run import run_flow

    params = {**TINY, "domain_key": "vendor", "source": "phantom-A", "target": "phantom-B", "steps": 4}
    cfg = RunConfig.model_validate(
        {
            "run_name": "paired",
            "seed": 0,
            "flow": "translate",
            "data": {
                "source": "phantom",
                "phantom": {"subjects": 4, "contrast": "cine", "scanner": "A+B"},
                "splits": {"train": 0.5, "test": 0.5},
            },
            "preprocess": {"size": 64, "spacing_mm": 2.5},
            "models": [{"family": "cut", "params": params}, {"family": "fastcut", "params": params}],
            "evaluation": {"translation": {"bootstrap": 5, "segmentation": {"image_size": 32, "iterations": 5}}},
        }  # fmt: skip
    ).model_dump(mode="json")
    state = run_flow(cfg, str(tmp_path / "work"), str(tmp_path / "out"), None, return_state=True)
    assert state.is_completed(), state
    run_dir = Path(state.result()["path"])
    metrics = pd.read_csv(run_dir / "metrics" / "translation_metrics.csv")
    assert {"fd_random_cnn", "target_unet_dice", "paired_psnr", "paired_ssim"} <= set(metrics["metric"])
    assert set(metrics["model"]) == {"cut", "fastcut"} and (metrics["direction"] == "phantom-a->phantom-b").all()
    paired = metrics[metrics["metric"].str.startswith("paired_")]
    assert paired[["before", "after"]].notna().all().all() and (paired["n_cases"] == 2).all()
    manifest, _ = load_manifest(run_dir / "manifest.csv")
    assert (manifest["vendor"].str.lower() == "phantom-b").all()
    assert "true target" in (run_dir / "report.md").read_text(encoding="utf-8")
    assert (run_dir / "figures" / "samples.png").is_file()
    with pytest.raises(ValueError, match="scanner"):
        RunConfig.model_validate(
            {**cfg, "data": {"source": "phantom", "phantom": {"contrast": "cine+lge", "scanner": "A+B"}}}
        )


def test_target_unet_is_trained_once_per_run_and_reused_for_the_same_data_and_config(toy):
    from medsynth.evaluation.segmentation import SegmentationConfig
    from medsynth.evaluation.translation import _target_unet

    _, b = _domains(toy)
    cfg = SegmentationConfig(image_size=32, iterations=2, progress=False)
    first, _ = _target_unet(b, cfg, seed=0)
    again, _ = _target_unet(b, cfg, seed=0)
    assert again is first
    other, _ = _target_unet(b, cfg, seed=1)  # another seed (or data, or config) trains its own
    assert other is not first
    shifted, _ = _target_unet(SliceSet(b.images + 0.1, b.labels, b.meta), cfg, seed=0)
    assert shifted is not first
