"""Label-level scar for label-conditioned synthesis (``synthesis.labels.scar_fraction``): a healthy label map
gets a scar from the fitted shapes and a conditional family renders it as a new LGE image; and the report figure
of the same held-out label maps rendered by each conditional family."""

from __future__ import annotations

import numpy as np
import pytest
from lge_toys import make_slices, ring_labels

from medsynth.config import validate
from medsynth.errors import ConfigError
from medsynth.labels import LV, MVO, MYO, SCAR
from medsynth.models.registry import create_model
from medsynth.synthesis.scar import insert_label_scar, scar_shapes
from medsynth.workflows import ops
from medsynth.workflows.config import SynthesisConfig


def healthy_maps(n: int = 6, size: int = 48) -> np.ndarray:
    return np.stack([ring_labels(size, size, size / 2 + (i % 3) - 1, size / 2, 7, 11, scar=False) for i in range(n)])


def test_scar_shapes_from_scarred_maps_only() -> None:
    slices = make_slices(n_subjects=4)
    n_scarred = int(np.isin(slices.labels, (SCAR, MVO)).any(axis=(1, 2)).sum())
    assert n_scarred > 0
    assert scar_shapes(slices.labels).shape == (n_scarred, 4)
    assert scar_shapes(healthy_maps()).shape == (0, 4)


def test_insert_label_scar_changes_only_myocardium() -> None:
    shapes = scar_shapes(make_slices(n_subjects=4).labels)
    maps = healthy_maps()
    out, added = insert_label_scar(maps, shapes, 1.0, np.random.default_rng(0))
    assert added.all()  # every map is scar-eligible and fraction 1 draws each
    changed = out != maps
    assert changed.any() and np.all(maps[changed] == MYO)
    assert set(np.unique(out[changed])) <= {SCAR, MVO}
    assert (out == LV).sum() == (maps == LV).sum()  # the blood pool and everything off the wall are untouched
    again, _ = insert_label_scar(maps, shapes, 1.0, np.random.default_rng(0))
    np.testing.assert_array_equal(again, out)  # seeded
    other, _ = insert_label_scar(maps, shapes, 1.0, np.random.default_rng(1))
    assert not np.array_equal(other, out)


def test_insert_label_scar_fraction_and_existing_scar() -> None:
    slices = make_slices(n_subjects=4)
    shapes = scar_shapes(slices.labels)
    out, added = insert_label_scar(slices.labels, shapes, 1.0, np.random.default_rng(0))
    has_scar = np.isin(slices.labels, (SCAR, MVO)).any(axis=(1, 2))
    assert not added[has_scar].any()  # maps that already have scar are left as they are
    np.testing.assert_array_equal(out[has_scar], slices.labels[has_scar])
    zero, none = insert_label_scar(healthy_maps(), shapes, 0.0, np.random.default_rng(0))
    assert not none.any() and np.array_equal(zero, healthy_maps())
    many = healthy_maps(200)
    _, half = insert_label_scar(many, shapes, 0.5, np.random.default_rng(0))
    assert 0.35 < half.mean() < 0.65  # binomial(200, 0.5): 0.35-0.65 is beyond 4 SD
    with pytest.raises(ValueError, match="fraction"):
        insert_label_scar(many, shapes, 1.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="shapes"):
        insert_label_scar(many, np.zeros((0, 4)), 0.5, np.random.default_rng(0))


def test_conditional_family_renders_inserted_scar_as_lge() -> None:
    pool = make_slices(n_subjects=6)
    gmm = create_model("gmm", {"n_components": 2})
    gmm.fit(pool, seed=0)
    syn, has_labels = ops.synthesize(gmm, pool, 24, 0, scar_fraction=1.0)
    assert has_labels
    added = syn.meta["label_scar"].to_numpy(bool)
    assert added.any() and (~added).any()  # maps drawn from the scar-free subjects, and from the scarred ones
    assert np.isin(syn.labels[added], (SCAR, MVO)).any(axis=(1, 2)).all()
    assert (syn.meta.loc[added, "pathology"] == "infarct").all()
    img, lab = syn.images[added, 0], syn.labels[added]
    assert img[lab == SCAR].mean() > img[lab == MYO].mean() + 0.3  # rendered enhanced, as the scar labels say
    plain, _ = ops.synthesize(gmm, pool, 24, 0)
    assert "label_scar" not in plain.meta  # off by default, and the other draws are unchanged by it
    np.testing.assert_array_equal(plain.labels[~added], syn.labels[~added])


def test_scar_fraction_needs_scar_in_the_training_maps() -> None:
    pool = make_slices(n_subjects=6)
    healthy = pool.subset(~np.isin(pool.labels, (SCAR, MVO)).any(axis=(1, 2)))
    gmm = create_model("gmm", {"n_components": 2})
    gmm.fit(healthy, seed=0)
    with pytest.raises(ConfigError, match="scar_fraction"):
        ops.synthesize(gmm, healthy, 4, 0, scar_fraction=0.5)


def test_scar_fraction_config_validated() -> None:
    assert validate(SynthesisConfig, {"labels": {"scar_fraction": 0.3}}).labels.scar_fraction == 0.3
    with pytest.raises(ConfigError, match="scar_fraction"):
        validate(SynthesisConfig, {"labels": {"scar_fraction": 1.5}})


def test_same_label_maps_rendered_by_each_conditional_family(tmp_path) -> None:
    from medsynth.workflows.evaluate import comparison_slices, render_same_labels

    pool = make_slices(n_subjects=6)
    shown = comparison_slices(pool, n=4)
    scarred = np.isin(shown.labels, (SCAR, MVO)).any(axis=(1, 2))
    assert len(shown) == 4 and scarred.any() and (~scarred).any()  # LGE split: scar and scar-free maps
    records = []
    for name, family, cfg in (("gmm", "gmm", {"n_components": 2}), ("pca", "pca", {})):
        model = create_model(family, cfg)
        model.fit(pool, seed=0)
        model.save(tmp_path / name)
        records.append({"dir": str(tmp_path), "path": name, "name": name})
    rendered = render_same_labels(shown, records, seed=0)
    assert [name for name, _ in rendered] == ["gmm"]  # pca samples without labels: not in the figure
    out = rendered[0][1]
    np.testing.assert_array_equal(out.labels, shown.labels)
    assert out.images.shape == shown.images.shape
    assert out.images[:, 0][shown.labels == LV].mean() > out.images[:, 0][shown.labels == MYO].mean()


def test_cli_sample_scar_fraction(tmp_path, capsys) -> None:
    import nibabel as nib
    import pandas as pd

    from medsynth.cli.main import main
    from medsynth.phantom import generate_dataset

    manifest = generate_dataset(tmp_path / "lge", subjects=3, contrast="lge", seed=0, shape=(64, 64, 4))
    cfg = tmp_path / "gmm.yaml"
    cfg.write_text("n_components: 2\n", encoding="utf-8")
    model = tmp_path / "model"
    assert main(["fit", "gmm", "--manifest", str(manifest), "--out", str(model), "--config", str(cfg)]) == 0
    out = tmp_path / "s"
    args = ["sample", "--model", str(model), "--labels", str(manifest), "--n", "8", "--out", str(out)]
    assert main([*args, "--scar-fraction", "1"]) == 0
    written = pd.read_csv(out / "manifest.csv")
    added = written["label_scar"].astype(str).str.lower() == "true"
    assert added.any() and (written.loc[added, "pathology"] == "infarct").all()
    for rel in written.loc[added, "label"]:
        assert np.isin(np.asarray(nib.load(out / rel).dataobj), (SCAR, MVO)).any()
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert main(["sample", "--model", str(model), "--labels", str(manifest), "--n", "2", "--out", str(bad),
                 "--scar-fraction", "1.5"]) == 2  # fmt: skip
    assert "--scar-fraction" in capsys.readouterr().err and not bad.exists()


@pytest.mark.realdata
def test_label_scar_on_emidec_maps(emidec_png_root, tmp_path) -> None:
    """Real EMIDEC label maps: shapes from the scarred cases, scar inserted only into healthy myocardium of the
    scar-free maps, about the configured share of them."""
    from medsynth.data.cohorts import scar_eligible
    from medsynth.data.layouts import build_manifest
    from medsynth.data.loading import load_manifest_slices
    from medsynth.data.manifest import write_manifest

    df = build_manifest("png-slices", emidec_png_root)
    keep = sorted(set(df["subject_id"]))[::5]  # 10 of 50 cases, both cohorts
    path = write_manifest(df[df["subject_id"].isin(keep)], tmp_path / "m.csv", data_root=emidec_png_root)
    slices = load_manifest_slices(path, emidec_png_root, {"spacing_mm": None, "size": 128})
    shapes = scar_shapes(slices.labels)
    assert len(shapes) > 0
    eligible = scar_eligible(slices.labels)
    out, added = insert_label_scar(slices.labels, shapes, 0.5, np.random.default_rng(0))
    assert not added[~eligible].any() and added[eligible].any()
    assert 0.2 < added[eligible].mean() < 0.8
    changed = out != slices.labels
    assert np.all(slices.labels[changed] == MYO) and set(np.unique(out[changed])) <= {SCAR, MVO}
    assert np.isin(out[added], (SCAR, MVO)).any(axis=(1, 2)).all()
