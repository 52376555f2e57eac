"""Unit tests of the pipeline plumbing: stages, run config, label deformation, nnU-Net export."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsynth.data.export import Case, label_renumbering, write_nnunet_dataset
from medsynth.errors import ConfigError
from medsynth.transforms import LabelDeformation, RandomLabelDeformation
from medsynth.workflows.stage import is_done, run_stage


def _disc_label(size: int = 48) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2 - 3)
    lab = np.zeros((size, size), np.uint8)
    lab[r < 14] = 2
    lab[r < 9] = 1
    return lab


def test_stage_runs_once_and_rebuilds_when_artefacts_vanish(tmp_path: Path) -> None:
    calls = []

    def build(tmp: Path) -> dict:
        calls.append(1)
        (tmp / "x.txt").write_text("hello")
        return {"path": "x.txt"}

    first = run_stage(tmp_path, "demo", {"a": 1}, build)
    second = run_stage(tmp_path, "demo", {"a": 1}, build)
    assert not first["cached"] and second["cached"] and len(calls) == 1
    assert second["dir"] == first["dir"] and is_done(second)
    other = run_stage(tmp_path, "demo", {"a": 2}, build)
    assert other["dir"] != first["dir"] and len(calls) == 2
    import shutil

    shutil.rmtree(first["dir"])
    assert not is_done(first)
    again = run_stage(tmp_path, "demo", {"a": 1}, build)
    assert not again["cached"] and len(calls) == 3


def test_failed_stage_leaves_nothing(tmp_path: Path) -> None:
    def build(tmp: Path) -> dict:
        (tmp / "partial.bin").write_bytes(b"123")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run_stage(tmp_path, "demo", {"a": 1}, build)
    leftovers = [p for p in (tmp_path / "demo").iterdir()] if (tmp_path / "demo").exists() else []
    assert leftovers == []


def test_label_deformation_is_replayable_and_keeps_classes() -> None:
    lab = _disc_label()
    t = RandomLabelDeformation(rotate_deg=20, scale=0.1, translate_px=3)
    out1, p1 = t(lab, np.random.default_rng(3))
    out2, p2 = t(lab, np.random.default_rng(3))
    assert p1 == p2 and np.array_equal(out1, out2)
    assert np.array_equal(LabelDeformation(**p1.to_dict())(lab), out1)
    assert set(np.unique(out1)) <= set(np.unique(lab))
    assert not np.array_equal(out1, lab)
    assert np.array_equal(LabelDeformation()(lab), lab)
    with pytest.raises(ValueError, match="scale"):
        LabelDeformation(scale=0)


def test_label_renumbering_is_consecutive() -> None:
    assert label_renumbering([0, 1, 2, 4, 5]) == {0: 0, 1: 1, 2: 2, 4: 3, 5: 4}
    assert label_renumbering([3, 1]) == {0: 0, 1: 1, 3: 2}


def test_nnunet_export(tmp_path: Path) -> None:
    lab = _disc_label()
    lab[20:24, 30:34] = 4  # scar, no RV: codes must be renumbered to stay consecutive
    cases = [
        Case(
            "a", np.random.default_rng(0).random((48, 48, 3), dtype=np.float32), np.stack([lab] * 3, -1), (1.5, 1.5, 8)
        ),
        Case("b", np.random.default_rng(1).random((48, 48, 1), dtype=np.float32), lab[..., None], (1.5, 1.5, 1)),
    ]
    ds = write_nnunet_dataset(tmp_path, cases, channel_name="LGE", dataset_name="t")
    for key in ("channel_names", "labels", "numTraining", "file_ending"):
        assert key in ds
    assert ds["numTraining"] == 2
    assert sorted(ds["labels"].values()) == list(range(len(ds["labels"])))
    on_disk = json.loads((tmp_path / "dataset.json").read_text(encoding="utf-8"))
    assert on_disk == ds
    for c in cases:
        img = nib.load(tmp_path / "imagesTr" / f"{c.case_id}_0000.nii.gz")
        seg = nib.load(tmp_path / "labelsTr" / f"{c.case_id}.nii.gz")
        assert img.shape == seg.shape == c.image.shape
        assert np.allclose(img.affine, seg.affine)
        assert set(np.unique(np.asarray(seg.dataobj))) <= set(ds["labels"].values())
    datalist = json.loads((tmp_path / "datalist.json").read_text(encoding="utf-8"))
    assert len(datalist["training"]) == 2


def test_run_config_rejects_unknown_keys(tmp_path: Path) -> None:
    from medsynth.workflows.config import load_run_config

    good = Path(__file__).parents[1] / "configs" / "quickstart.yaml"
    cfg = load_run_config(good)
    assert cfg.data.source == "phantom"
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text(encoding="utf-8").replace("synthesis:\n  n:", "synthesis:\n  nn: 3\n  n:"))
    with pytest.raises(ConfigError, match=r"synthesis\.nn.*allowed keys: context, labels, n"):
        load_run_config(bad)
    bad.write_text(good.read_text(encoding="utf-8").replace("family: gmm", "family: gmm\n    params: {no_such_key: 1}"))
    with pytest.raises(ConfigError, match="no_such_key"):
        load_run_config(bad)
    bad.write_text(good.read_text(encoding="utf-8").replace("family: gmm", "family: nosuchfamily"))
    with pytest.raises(ConfigError, match="nosuchfamily"):
        load_run_config(bad)


# every shipped config (a hand-kept list had missed half of them)
@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")))
def test_shipped_configs_validate(name: str) -> None:
    from medsynth.workflows.config import load_run_config

    load_run_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml")


def test_image_follows_its_label_under_the_same_deformation() -> None:
    lab = _disc_label()
    img = np.where(lab == 1, 1.0, np.where(lab == 2, 0.3, 0.1)).astype(np.float32)
    params = RandomLabelDeformation(rotate_deg=25, scale=0.15, translate_px=4).sample(np.random.default_rng(7))
    lab_d, img_d = params(lab), params(img, order=1)
    assert img_d.dtype == np.float32 and img_d.shape == img.shape
    # interior of the deformed LV sits on bright deformed image pixels; the deformed background on dark ones
    from scipy import ndimage

    inner = ndimage.binary_erosion(lab_d == 1, iterations=2)
    assert inner.any() and img_d[inner].min() > 0.95
    assert img_d[ndimage.binary_erosion(lab_d == 0, iterations=2)].max() < 0.15


@pytest.mark.parametrize(
    ("name", "sub", "subjects"),
    [("acdc", "acdc/training", 30), ("emidec_png", "emidec_png", 50), ("acdc_emidec", ".", 80)],
)
def test_committed_manifests_match_the_data(test_data_root: Path, name: str, sub: str, subjects: int) -> None:
    """The manifests in data_manifests/ validate against the real data, file hashes included, with leak-free splits."""
    from medsynth.data.manifest import load_manifest
    from medsynth.utils.hashing import sha256_file

    path = Path(__file__).parents[1] / "data_manifests" / f"{name}.csv"
    df, root = load_manifest(path, data_root=test_data_root / sub)
    assert df["subject_id"].nunique() == subjects
    assert set(df["split"]) == {"train", "val", "test"}
    for _, row in df.iloc[:: max(1, len(df) // 10)].iterrows():
        assert sha256_file(root / row["image"]) == row["sha256"]


def test_fit_cache_follows_a_changed_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spec that leaves a key to its default must not reuse a model fitted under an earlier default (the stale
    hit seen when pix2pix's ``surroundings`` default changed): the fit stage keys on the resolved config."""
    from pydantic import Field

    from medsynth.models import registry
    from medsynth.models.latent.pca import PCAConfig, PCAModel
    from medsynth.workflows.stages import fit_model
    from tests.slice_sets import phantom_slices

    slices = phantom_slices(tmp_path / "ph", subjects=2)
    rec_dir = tmp_path / "slices"
    rec_dir.mkdir()
    for split in ("train", "val"):
        slices.save(rec_dir / f"{split}.npz")
    record = {"key": "toy", "dir": str(rec_dir), "train": "train.npz", "val": "val.npz"}

    def family(default: int) -> type[PCAModel]:
        config = type("ToyConfig", (PCAConfig,), {"__annotations__": {"n_components": int},
                                                   "n_components": Field(default, ge=1)})  # fmt: skip
        return type("ToyPCA", (PCAModel,), {"family": "toy_pca", "Config": config})

    spec = {"family": "toy_pca", "name": None, "fit_on": "train", "params": {"image_size": 16}}
    monkeypatch.setitem(registry._LOADED, "toy_pca", family(2))
    first = fit_model(str(tmp_path / "work"), record, spec, seed=0)
    assert not first["cached"]
    assert fit_model(str(tmp_path / "work"), record, spec, seed=0)["cached"]  # same default: reused
    # a record written before stage records carried "resolved": judged by the config saved in its model.json
    done = Path(first["dir"]) / "done.json"
    done.write_text(json.dumps({k: v for k, v in json.loads(done.read_text()).items() if k != "resolved"}))
    assert fit_model(str(tmp_path / "work"), record, spec, seed=0)["cached"]
    monkeypatch.setitem(registry._LOADED, "toy_pca", family(3))
    changed = fit_model(str(tmp_path / "work"), record, spec, seed=0)
    assert not changed["cached"] and changed["dir"] != first["dir"]
    assert fit_model(str(tmp_path / "work"), record, spec, seed=0)["dir"] == changed["dir"]  # and reused there
    monkeypatch.setitem(registry._LOADED, "toy_pca", family(2))  # back to the first default: the first fit
    assert fit_model(str(tmp_path / "work"), record, spec, seed=0)["dir"] == first["dir"]
