"""Family-agnostic fit/sample/scar library functions and their CLI commands, on the phantom."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medsynth.cli.main import main
from medsynth.data.manifest import OPTIONAL_COLUMNS, load_manifest
from medsynth.data.preprocess import PreprocessConfig, load_slices
from medsynth.errors import ConfigError
from medsynth.labels import MVO, MYO, SCAR
from medsynth.models.registry import load_model
from medsynth.workflows.commands import fit_family, sample_dataset, scar_dataset

PRE = {"size": 64}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from medsynth.phantom.generate import generate_dataset

    out = tmp_path_factory.mktemp("phantom") / "lge"
    return generate_dataset(out, subjects=4, contrast="lge", seed=0, shape=(64, 64, 4), scar_prob=0.5)


@pytest.fixture(scope="module")
def model_dir(phantom: Path, tmp_path_factory) -> Path:
    return fit_family("gmm", phantom, tmp_path_factory.mktemp("m") / "gmm", {"n_components": 2}, preprocess=PRE)


def test_fit_family_writes_model_and_report(model_dir: Path) -> None:
    report = json.loads((model_dir / "fit_report.json").read_text(encoding="utf-8"))
    assert report["family"] == "gmm" and report["preprocess"]["size"] == 64
    assert report["model_hash"] == load_model(model_dir).model_hash
    assert "scar_model" in report["report"]


def test_fit_family_rejects_unknown_family_and_key(phantom: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown generative family"):
        fit_family("nope", phantom, tmp_path / "x")
    with pytest.raises(ConfigError, match="n_componentz"):
        fit_family("gmm", phantom, tmp_path / "x", {"n_componentz": 2})
    assert not (tmp_path / "x").exists()


def test_sample_dataset_round_trip_and_provenance(model_dir: Path, phantom: Path, tmp_path: Path) -> None:
    manifest = sample_dataset(model_dir, tmp_path / "syn", n=5, seed=3, labels_manifest=phantom)
    df, root = load_manifest(manifest)
    assert len(df) == 5
    for col in ("source", "family", "model_hash", "seed", "source_case", "config_hash"):
        assert col in OPTIONAL_COLUMNS and df[col].ne("").all(), col
    assert set(df["source"]) == {"synthetic"} and set(df["family"]) == {"gmm"} and set(df["seed"]) == {"3"}
    vol = nib.load(str(root / df["image"].iloc[0]))
    assert vol.shape == (64, 64, 1)
    # Reading the written pairs back through the project's preprocessing returns the sampled label maps in the
    # same orientation; only a translation may differ (the crop is re-centred on this slice's heart).
    back = load_slices(manifest, cfg=PreprocessConfig(**PRE))
    source = load_slices(phantom, cfg=PreprocessConfig(**PRE))
    cases = [c.rsplit("#", 1) for c in df["source_case"]]
    for i, (case, idx) in enumerate(cases):
        j = np.flatnonzero((source.meta["case"] == case) & (source.meta["slice_index"] == idx))[0]
        a, b = back.labels[i], source.labels[j]
        best = max((np.roll(b, (dy, dx), (0, 1)) == a).mean() for dy in range(-12, 13) for dx in range(-12, 13))
        assert best == 1.0
    again = sample_dataset(model_dir, tmp_path / "syn2", n=5, seed=3, labels_manifest=phantom)
    df2, root2 = load_manifest(again)
    a = nib.load(str(root / df["image"].iloc[2])).get_fdata()
    b = nib.load(str(root2 / df2["image"].iloc[2])).get_fdata()
    np.testing.assert_array_equal(a, b)


def test_scar_dataset_pairs(model_dir: Path, phantom: Path, tmp_path: Path) -> None:
    manifest = scar_dataset(model_dir, phantom, tmp_path / "scar", seed=1)
    df, root = load_manifest(manifest)
    assert set(df["variant"]) == {"scar", "scar_free"} and df.groupby("pair_id").size().eq(2).all()
    for _, pair in list(df.groupby("pair_id"))[:6]:
        rows = pair.set_index("variant")
        img = {v: nib.load(str(root / rows.loc[v, "image"])).get_fdata() for v in ("scar", "scar_free")}
        lab = {v: np.asarray(nib.load(str(root / rows.loc[v, "label"])).dataobj) for v in ("scar", "scar_free")}
        assert not np.isin(lab["scar_free"], (SCAR, MVO)).any()
        differ = (img["scar"] != img["scar_free"]) | (lab["scar"] != lab["scar_free"])
        assert np.all(np.isin(lab["scar"][differ], (MYO, SCAR, MVO))) and np.all(lab["scar_free"][differ] == MYO)


def test_cli_commands(phantom: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    cfg = tmp_path / "gmm.yaml"
    cfg.write_text("n_components: 2\npreprocess:\n  size: 64\n")
    assert main(["fit", "gmm", "--manifest", str(phantom), "--out", str(out / "m"), "--config", str(cfg)]) == 0
    sample = ["sample", "--model", str(out / "m"), "--labels", str(phantom), "--n", "3", "--out", str(out / "s")]
    assert main(sample) == 0
    assert len(pd.read_csv(out / "s" / "manifest.csv")) == 3
    assert main(["scar", "--model", str(out / "m"), "--manifest", str(phantom), "--out", str(out / "sc")]) == 0
    assert main(["evaluate", "scar", "--manifest", str(phantom), "--out", str(out / "ev")]) == 0
    table = pd.read_csv(out / "ev" / "scar_metrics.csv")
    assert list(table["method"]) == ["nsd2", "nsd3", "nsd5", "fwhm", "gmm"]
    capsys.readouterr()
    bad = tmp_path / "bad.yaml"
    bad.write_text("n_components: 2\nbogus_key: 1\n")
    assert main(["fit", "gmm", "--manifest", str(phantom), "--out", str(out / "bad"), "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bogus_key" in err and err.startswith("medsynth: error:")
    assert main(["fit", "nofamily", "--manifest", str(phantom), "--out", str(out / "bad")]) == 2
    assert not (out / "bad").exists()


def test_unconditional_family_samples_are_image_only_rows(phantom: Path, tmp_path: Path) -> None:
    """An unconditional family (PCA) writes image-only rows (empty label) that manifests and loaders accept."""
    out = fit_family("pca", phantom, tmp_path / "pca", config={"n_components": 3, "image_size": 32})
    manifest = sample_dataset(out, tmp_path / "samples", n=3, seed=0, labels_manifest=phantom)
    df, root = load_manifest(manifest)
    assert (df["label"] == "").all() and (df["source_case"] == "").all() and (df["family"] == "pca").all()
    slices = load_slices(manifest, cfg=PreprocessConfig(size=32, spacing_mm=None))
    assert len(slices) == 3 and not slices.labels.any() and np.isfinite(slices.images).all()
