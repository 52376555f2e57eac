"""The operations layer: one definition of healthy / scar-eligible, the operations the CLI and the flows share,
and their provenance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medsynth.data.cohorts import MIN_MYO_PIXELS, healthy_subjects, scar_eligible, scar_removable
from medsynth.data.manifest import load_manifest
from medsynth.data.slices import SliceSet
from medsynth.errors import CapabilityError, ConfigError
from medsynth.labels import LV, MYO, SCAR
from medsynth.models.latent.toy import toy_slices
from medsynth.models.registry import create_model
from medsynth.workflows import ops


@pytest.fixture(scope="module")
def toy() -> SliceSet:
    return SliceSet.concat([toy_slices(3, 2, 32, scar=False, seed=0), toy_slices(3, 2, 32, scar=True, seed=1)])


@pytest.fixture(scope="module")
def gmm(toy: SliceSet):
    model = create_model("gmm", {"n_components": 2})
    model.fit(toy, seed=0)
    return model


def test_healthy_is_one_case_insensitive_definition(toy: SliceSet) -> None:
    meta = toy.meta.copy()
    subjects = sorted(set(meta["subject_id"]))
    # ACDC codes, other spellings, an unrecorded pathology; and a "normal" subject whose labels carry scar
    spelled = dict(zip(subjects, ["NOR", "Normal", "", "normal", "MINF", "healthy "], strict=True))
    meta["pathology"] = meta["subject_id"].map(spelled)
    mask = healthy_subjects(SliceSet(toy.images, toy.labels, meta))
    healthy = set(meta["subject_id"][mask])
    assert healthy == set(subjects[:3]), "scar labels or an infarct pathology make a subject not healthy"
    empty = toy.subset(np.zeros(len(toy), bool))
    assert healthy_subjects(empty).shape == (0,) and scar_eligible(empty.labels).shape == (0,)


def test_scar_eligible_and_removable() -> None:
    lab = np.zeros((4, 16, 16), np.uint8)
    lab[:, 4:12, 4:12] = MYO
    lab[:, 6:10, 6:10] = LV
    lab[1, 4, 4:8] = SCAR  # has scar: removable, not eligible
    lab[2][lab[2] == MYO] = 0  # no myocardium
    lab[2, 4, 4 : 4 + MIN_MYO_PIXELS - 1] = MYO
    lab[3][lab[3] == LV] = MYO  # no blood pool
    np.testing.assert_array_equal(scar_eligible(lab), [True, False, False, False])
    np.testing.assert_array_equal(scar_removable(lab), [False, True, False, False])


def test_synthesize_is_seeded_and_carries_provenance(gmm, toy: SliceSet) -> None:
    a, has_labels = ops.synthesize(gmm, toy, 5, seed=3, name="g", deformation={"rotate_deg": 10.0})
    b, _ = ops.synthesize(gmm, toy, 5, seed=3, name="g", deformation={"rotate_deg": 10.0})
    c, _ = ops.synthesize(gmm, toy, 5, seed=4, name="g", deformation={"rotate_deg": 10.0})
    assert has_labels and len(a) == 5
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)
    m = a.meta
    assert (m["family"] == "gmm").all() and (m["model_hash"] == gmm.model_hash).all() and (m["seed"] == "3").all()
    assert m["subject_id"].str.startswith("syn_g_").all() and (m["source"] == "synthetic").all()
    # every synthetic slice names its source slice and carries that slice's geometry record
    for _, row in m.iterrows():
        case, idx = row["source_case"].rsplit("#", 1)
        src = toy.meta[(toy.meta["case"] == case) & (toy.meta["slice_index"] == idx)]
        assert len(src) == 1 and src["record"].iloc[0] == row["record"]


def test_context_goes_through_the_declared_capability(gmm, toy: SliceSet) -> None:
    plain, _ = ops.synthesize(gmm, toy, 3, seed=1)
    kept, _ = ops.synthesize(gmm, toy, 3, seed=1, context=True)
    assert not np.array_equal(plain.images, kept.images)
    pca = create_model("pca", {"n_components": 2, "image_size": 16})
    pca.fit(toy, seed=0)
    images_only, has_labels = ops.synthesize(pca, toy, 2, seed=0, context=True)
    assert not has_labels and not images_only.labels.any() and (images_only.meta["source_case"] == "").all()


def test_operations_refuse_what_the_model_cannot_do(toy: SliceSet) -> None:
    cyclegan = create_model("cyclegan", {"domain_key": "pathology", "source": "normal", "target": "infarct"})
    with pytest.raises(CapabilityError, match="cyclegan.*sample"):
        ops.synthesize(cyclegan, toy, 2, seed=0)
    with pytest.raises(CapabilityError, match="cyclegan.*scar"):
        ops.scar_cases(cyclegan, toy, 2, seed=0)
    with pytest.raises(ConfigError, match="labels"):
        ops.synthesize(create_model("gmm"), None, 2, seed=0)


def test_scar_cases_and_pairs(gmm, toy: SliceSet) -> None:
    cases = ops.scar_cases(gmm, toy, 4, seed=0, name="g+scar")
    assert len(cases) == 4 and (cases.meta["pathology"] == "infarct").all() and (cases.labels == SCAR).any()
    pairs = ops.scar_pairs(gmm, toy, seed=0)
    assert pairs.meta.groupby("pair_id").size().eq(2).all()
    n_add, n_remove = int(scar_eligible(toy.labels).sum()), int(scar_removable(toy.labels).sum())
    assert len(pairs) == 2 * (n_add + n_remove)
    by = pairs.meta.set_index(["pair_id", "variant"])
    for pid in pairs.meta["pair_id"].unique()[:4]:
        i, j = by.index.get_loc((pid, "scar")), by.index.get_loc((pid, "scar_free"))
        differ = (pairs.images[i, 0] != pairs.images[j, 0]) | (pairs.labels[i] != pairs.labels[j])
        assert np.all(pairs.labels[j][differ] == MYO)


def test_cli_dataset_rows_are_the_operation_meta(gmm, toy: SliceSet, tmp_path: Path) -> None:
    """The CLI writes exactly the operation's provenance: every meta column except identity/geometry."""
    synthetic, has_labels = ops.synthesize(gmm, toy, 3, seed=2, name="g")
    manifest = ops.write_slice_dataset(tmp_path / "out", synthetic, has_labels, 1.5)
    df, root = load_manifest(manifest)
    assert len(df) == 3 and (root / df["image"].iloc[0]).is_file() and (root / df["label"].iloc[0]).is_file()
    for col in ("subject_id", "modality", "vendor", "pathology", "source", "family", "model_hash", "seed"):
        assert df[col].tolist() == synthetic.meta[col].astype(str).tolist(), col
    assert (df["config_hash"] == ops.config_hash(gmm)).all() and (df["label_map"] == "canonical").all()
    assert pd.Series(df["source_case"]).ne("").all()


def test_scar_evaluation_names_the_row_by_family_and_thresholds_only_calibrated_maps(gmm, toy: SliceSet) -> None:
    from medsynth.evaluation.scar import BASELINES, REFERENCE_QUANTILE, evaluate_scar, predict_scar
    from medsynth.labels import MVO, MYOCARDIAL_WALL

    ppca = create_model("ppca", {"n_components": 3, "image_size": 16})
    ppca.fit(toy, seed=0)
    thresholds: dict[str, float] = {}
    masks = predict_scar(toy, ppca, thresholds=thresholds)
    assert set(masks) == {*BASELINES, "ppca"}
    maps = ppca.score(toy).pixel_maps
    wall = np.isin(toy.labels, MYOCARDIAL_WALL)
    clean = ~np.isin(toy.labels, (SCAR, MVO)).any(axis=(1, 2))
    expected = float(np.quantile(maps[wall & clean[:, None, None]], REFERENCE_QUANTILE))
    assert thresholds["ppca"] == pytest.approx(expected) and thresholds["ppca"] != 0.5
    np.testing.assert_array_equal(masks["ppca"], (maps > expected) & wall)
    predict_scar(toy, gmm, thresholds=thresholds)
    assert thresholds["gmm"] == 0.5  # the GMM's maps are posteriors: calibrated
    assert list(evaluate_scar(toy, ppca, name="mine")["method"]) == [*BASELINES, "mine"]
