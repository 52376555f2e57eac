"""One contract test for every registered family, according to what it declares, plus config validation at
load and third-party families through the ``medsynth.families`` entry-point group.

Each family is fitted on tiny toy slices with its own :meth:`GenerativeModel.tiny_config`, so a family added to
the registry (or installed as a plug-in) is tested here without editing this file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth.data.cohorts import scar_eligible
from medsynth.data.slices import SliceSet
from medsynth.errors import CapabilityError, ConfigError, InputFileError, LabelError
from medsynth.labels import MVO, MYO, SCAR
from medsynth.models.base import CAPABILITIES, CAPABILITY_METHODS, GenerativeModel, TranslationDomains, require
from medsynth.models.latent.toy import toy_slices
from medsynth.models.registry import available_families, create_model, get_family, load_model

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def tiny() -> SliceSet:
    """3 healthy + 3 infarct toy subjects, 2 slices each, 32 × 32 (LGE-like, pathology normal / infarct)."""
    torch.set_num_threads(1)
    return SliceSet.concat([toy_slices(3, 2, 32, scar=False, seed=0), toy_slices(3, 2, 32, scar=True, seed=1)])


def exercise(model: GenerativeModel, slices: SliceSet) -> dict[str, np.ndarray]:
    """Call every capability the model offers, check the shapes of what comes back; return the arrays."""
    out: dict[str, np.ndarray] = {}
    h, w = slices.image_size
    labels = slices.labels[:3]
    if model.supports("sample"):
        s = model.sample(3, labels if model.conditional else None, seed=1)
        assert s.images.shape[:2] == (3, 1) and s.images.dtype == np.float32 and np.isfinite(s.images).all()
        if model.conditional:
            assert s.images.shape[2:] == (h, w) and np.array_equal(s.labels, labels)
            with pytest.raises(LabelError):
                model.sample(3, None, seed=1)
        if s.labels is not None:
            assert s.labels.shape == (3, *s.images.shape[2:])
            out["sample_labels"] = s.labels
        out["sample"] = s.images
        np.testing.assert_array_equal(model.sample(3, labels if model.conditional else None, seed=1).images, s.images)
    if model.supports("context"):
        c = model.sample_in_context(labels, slices.images[:3], seed=1)
        assert c.images.shape == (3, 1, h, w) and np.isfinite(c.images).all()
        out["context"] = c.images
    if model.supports("score"):
        part = slices.subset(np.arange(4))
        sc = model.score(part)
        assert np.asarray(sc.slice_scores).shape == (4,) and np.isfinite(sc.slice_scores).all()
        if sc.pixel_maps is not None:
            assert sc.pixel_maps.shape == part.labels.shape
            out["pixel_maps"] = sc.pixel_maps
        out["slice_scores"] = np.asarray(sc.slice_scores)
    if model.supports("translate"):
        for direction in model.directions:
            d = model.translation_domains(slices, direction)
            assert isinstance(d, TranslationDomains) and d.mask.shape == (len(slices),) and d.mask.any()
            x = slices.images[d.mask][:3]
            y = model.translate(x, seed=0, direction=direction)
            assert y.shape == x.shape and np.isfinite(y).all()
            out[f"translate_{direction}"] = y
    if model.supports("scar"):
        ok = scar_eligible(slices.labels)
        img, lab = slices.images[ok][:2], slices.labels[ok][:2]
        new = model.insert_scar(img, lab, seed=0)
        assert new.images.shape == img.shape and new.labels.shape == lab.shape
        changed = (new.labels != lab) | (new.images != img)[:, 0]
        assert np.isin(lab[changed], (MYO,)).all() and np.isin(new.labels[changed], (MYO, SCAR, MVO)).all()
        out["scar_images"], out["scar_labels"] = new.images, new.labels
    if model.supports("style"):
        refs = slices.images[3:6]
        st = model.sample_with_style(labels, refs, seed=1)
        assert st.images.shape == (3, 1, h, w) and np.isfinite(st.images).all() and np.array_equal(st.labels, labels)
        np.testing.assert_array_equal(model.sample_with_style(labels, refs, seed=1).images, st.images)
        out["style"] = st.images
    return out


def check_contract(family: str, slices: SliceSet, tmp_path: Path) -> None:
    cls = get_family(family)
    assert cls.family == family and cls.capabilities <= set(CAPABILITIES)
    model = create_model(family, cls.tiny_config())
    report = model.fit(slices, seed=0)
    json.dumps(report, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    assert model.supported(), f"{family}: a fitted model offers none of its capabilities"
    before = exercise(model, slices)
    model.save(tmp_path / family)
    loaded = load_model(tmp_path / family)
    assert type(loaded) is cls and loaded.model_hash == model.model_hash and loaded.supported() == model.supported()
    after = exercise(loaded, slices)
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=f"{family}: {key} differs after load")
    for capability in sorted(set(CAPABILITIES) - cls.capabilities):
        with pytest.raises(CapabilityError, match=f"{family}.*{capability}"):
            require(model, capability)
        for method in (m for m, c in CAPABILITY_METHODS.items() if c == capability):
            with pytest.raises(CapabilityError, match=capability):
                getattr(model, method)
            assert getattr(model, method, None) is None


def check_bad_config(family: str) -> None:
    cls = get_family(family)
    with pytest.raises(ConfigError, match="no_such_key"):
        create_model(family, {**cls.tiny_config(), "no_such_key": 1})
    numeric = [k for k, f in cls.Config.model_fields.items() if f.annotation in (int, float)]
    if numeric:  # a mistyped value is named by its key
        with pytest.raises(ConfigError, match=numeric[0]):
            create_model(family, {**cls.tiny_config(), numeric[0]: "not a number"})


@pytest.mark.parametrize("family", available_families())
def test_family_contract(family: str, tiny: SliceSet, tmp_path: Path) -> None:
    """tiny fit → every declared capability → save → load → identical output; undeclared → CapabilityError."""
    check_contract(family, tiny, tmp_path)


@pytest.mark.parametrize("family", available_families())
def test_family_bad_config_names_the_key(family: str) -> None:
    check_bad_config(family)


def test_cross_field_checks_fail_at_validation() -> None:
    with pytest.raises(ConfigError, match="'target'.*must differ"):
        create_model("cyclegan", {"source": "cine", "target": "CINE"})
    with pytest.raises(ConfigError, match="'image_size'"):
        create_model("cyclegan", {"image_size": 30, "channels": (8, 16, 32)})
    with pytest.raises(ConfigError, match="'n_components'"):
        create_model("gmm", {"n_components": 0})
    with pytest.raises(ConfigError, match="'image_size'"):
        create_model("flow", {"image_size": 20, "levels": 3})
    with pytest.raises(ConfigError, match="'strides'"):
        create_model("ae", {"channels": (4, 8), "strides": (2,)})


@pytest.mark.parametrize("family", available_families())
def test_bad_training_input_is_the_same_error_in_every_family(family: str, tiny: SliceSet) -> None:
    model = create_model(family, get_family(family).tiny_config())
    with pytest.raises(InputFileError, match=f"{family}.*empty"):
        model.fit(tiny.subset(np.zeros(len(tiny), bool)), seed=0)
    bad = SliceSet(tiny.images.copy(), tiny.labels, tiny.meta)
    bad.images[0, 0, 3, 3] = np.nan
    with pytest.raises(InputFileError, match=f"{family}.*NaN"):
        model.fit(bad, seed=0)


def test_missing_labels_is_the_same_error_in_every_conditional_family(tiny: SliceSet) -> None:
    conditional = [f for f in available_families() if get_family(f).conditional]
    assert len(conditional) >= 2
    for family in conditional:
        model = create_model(family, get_family(family).tiny_config())
        model.fit(tiny, seed=0)
        with pytest.raises(LabelError, match=family):
            model.sample(2, None)


# ---- the run config: everything validated at load -----------------------------------------------------------
def _run_yaml(tmp_path: Path, replace: tuple[str, str] | None = None, append: str = "") -> Path:
    text = (ROOT / "configs" / "quickstart.yaml").read_text(encoding="utf-8")
    if replace:
        assert replace[0] in text
        text = text.replace(*replace)
    path = tmp_path / "run.yaml"
    path.write_text(text + append)
    return path


@pytest.mark.parametrize(
    ("replace", "message"),
    [
        (("iterations: 120", "iteration: 120"), r"unknown key 'evaluation\.segmentation\.params\.iteration'; allowed"),
        (("  - family: gmm", "  - family: gmm\n    params: {n_components: 0}"), r"key 'models\.0\.params\.n_comp"),
        (
            ("  - family: gmm", "  - family: gmm\n    params: {degrade: {nope: 1}}"),
            r"'models\.0\.params\.degrade\.nope'",
        ),
        (("  - family: gmm", "  - family: cyclegan"), r"key 'models\.0\.family'.*cannot sample"),
        (("  - family: gmm", "  - family: nosuch"), r"key 'models\.0\.family'.*unknown generative family"),
        (("extractor: random_cnn", "extractor: random-cnn"), r"key 'evaluation\.fidelity\.extractor'"),
    ],
)
def test_run_config_problems_name_the_full_key(tmp_path: Path, replace: tuple[str, str], message: str) -> None:
    from medsynth.workflows.config import load_run_config

    path = _run_yaml(tmp_path, replace)
    with pytest.raises(ConfigError, match=message) as err:
        load_run_config(path)
    assert "\n" not in str(err.value) and str(err.value).startswith(str(path))


def test_translation_sections_are_validated(tmp_path: Path) -> None:
    from medsynth.workflows.config import load_run_config

    path = tmp_path / "t.yaml"
    path.write_text("flow: translate\nmodels:\n  - family: cyclegan\n    params: {source: lge, target: LGE}\n")
    with pytest.raises(ConfigError, match=r"key 'models\.0\.params\.target'"):
        load_run_config(path)
    path.write_text("flow: translate\nmodels:\n  - family: cyclegan\nevaluation:\n  translation:\n"
                    "    segmentation: {iterationz: 3}\n")  # fmt: skip
    with pytest.raises(ConfigError, match=r"unknown key 'evaluation\.translation\.segmentation\.iterationz'"):
        load_run_config(path)


def test_medsynth_run_fails_fast_on_a_nested_typo(tmp_path: Path) -> None:
    """Through the real console entry point: one line, exit 2, nothing run or written."""
    path = _run_yaml(tmp_path, ("iterations: 120", "iteration: 120"))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "medsynth.cli.main", "run", str(path), "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("medsynth: error:"), err
    assert "evaluation.segmentation.params.iteration" in err
    assert not (out / "quickstart").exists()


# ---- third-party families -----------------------------------------------------------------------------------
PLUGIN = '''
"""A third-party family: the mean training image plus seeded noise."""

from typing import Any, ClassVar

import numpy as np

from medsynth.config import StrictModel
from medsynth.models.base import GenerativeModel, Samples, Sampler


class MeanConfig(StrictModel):
    noise: float = 0.1


class MeanModel(GenerativeModel, Sampler):
    family: ClassVar[str] = "mean_image"
    Config: ClassVar[type[StrictModel]] = MeanConfig

    def fit(self, train, val=None, seed=0) -> dict[str, Any]:
        self.mean = train.images.mean(0)
        self.fitted = True
        return {"n": len(train)}

    def sample(self, n, labels=None, seed=0) -> Samples:
        g = np.random.default_rng(seed)
        x = self.mean[None] + self.config.noise * g.standard_normal((n, *self.mean.shape))
        return Samples(x.astype(np.float32))

    def get_state(self):
        return {"mean": self.mean}, {}

    def set_state(self, arrays, meta) -> None:
        self.mean = arrays["mean"]
        self.fitted = True
'''


@pytest.fixture
def plugin_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake installed distribution advertising ``mean_image`` in the ``medsynth.families`` group."""
    site = tmp_path / "site"
    (site / "medsynth_mean_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "medsynth_mean_plugin.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "medsynth_mean_plugin-0.1.dist-info"
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: medsynth-mean-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[medsynth.families]\nmean_image = medsynth_mean_plugin:MeanModel\n")
    monkeypatch.syspath_prepend(str(site))
    yield site
    from medsynth.models import registry

    registry._LOADED.pop("mean_image", None)
    sys.modules.pop("medsynth_mean_plugin", None)


def test_entry_point_family_is_registered_and_follows_the_contract(
    plugin_dist: Path, tiny: SliceSet, tmp_path: Path
) -> None:
    assert "mean_image" in available_families()
    cls = get_family("mean_image")
    assert cls.capabilities == {"sample"} and cls.__module__ == "medsynth_mean_plugin"
    check_contract("mean_image", tiny, tmp_path)
    check_bad_config("mean_image")


def test_entry_point_family_is_seen_by_a_fresh_process(plugin_dist: Path, tiny: SliceSet, tmp_path: Path) -> None:
    """A new interpreter (as a Dask worker is) finds the plug-in from the installed metadata alone and can load a
    model the parent saved."""
    model = create_model("mean_image", {"noise": 0.0})
    model.fit(tiny, seed=0)
    model.save(tmp_path / "m")
    code = (
        "import sys; from medsynth.models.registry import load_model; "
        f"m = load_model({str(tmp_path / 'm')!r}); print(m.family, float(m.sample(1, seed=0).images.mean()))"
    )
    env = {"PYTHONPATH": f"{plugin_dist}:{ROOT}", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    family, mean = proc.stdout.split()
    assert family == "mean_image" and float(mean) == pytest.approx(float(tiny.images.mean()), rel=1e-5)


def test_broken_entry_point_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    info = site / "broken_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[medsynth.families]\nbroken = no_such_module_xyz:Model\n")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(ConfigError, match="broken.*failed to load"):
        get_family("broken")
