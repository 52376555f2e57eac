"""Built-in cardiac phantom: determinism, labels, anatomy, contrasts, scanner styles, manifest, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medsynth.cli.main import main as cli_main
from medsynth.data.manifest import COLUMNS, load_manifest
from medsynth.labels import CANONICAL, LV, MVO, MYO, MYOCARDIAL_WALL, RV, SCAR
from medsynth.phantom import generate_dataset, phantom_subject
from medsynth.utils.hashing import sha256_file

SMALL = {"shape": (96, 96, 8), "spacing": (1.75, 1.75, 9.0)}


def _hash_tree(root: Path) -> dict[str, str]:
    # the .medsynth marker (fixed content, in every medsynth output folder) is not phantom data
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".medsynth"]
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in files}


def _load(root: Path, rel: str) -> np.ndarray:
    return np.asarray(nib.load(str(root / rel)).dataobj)


@pytest.fixture(scope="module")
def lge_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "lge"
    generate_dataset(out, subjects=4, contrast="lge", scanner="A", seed=5, **SMALL)
    return out


@pytest.fixture(scope="module")
def cine_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "cine"
    # the LGE share of infarcts, so cine and LGE subjects are the same (paired) hearts
    generate_dataset(out, subjects=4, contrast="cine", scanner="A", seed=5, scar_prob=0.75, **SMALL)
    return out


def test_same_seed_byte_identical_other_seed_differs(tmp_path: Path) -> None:
    a = _hash_tree(generate_dataset(tmp_path / "a", subjects=2, contrast="lge", seed=11, **SMALL).parent)
    b = _hash_tree(generate_dataset(tmp_path / "b", subjects=2, contrast="lge", seed=11, **SMALL).parent)
    c = _hash_tree(generate_dataset(tmp_path / "c", subjects=2, contrast="lge", seed=12, **SMALL).parent)
    assert a == b
    assert set(a) == set(b) and len(a) == 2 * 2 * 2 + 2  # images + labels + manifest + params
    # Another seed changes every image (file names differ too: the seed is part of the subject id).
    assert not set(a.values()) & set(c.values())


def test_manifest_valid_and_complete(lge_dir: Path) -> None:
    df, root = load_manifest(lge_dir / "manifest.csv")
    assert root == lge_dir.resolve()
    assert len(df) == 4 * 2
    for col in COLUMNS:
        if col != "split":
            assert (df[col] != "").all(), col
    assert set(df["phase"]) == {"ED", "ES"}
    assert set(df["dataset"]) == {"phantom"} and set(df["modality"]) == {"lge"}
    assert set(df["vendor"]) == {"phantom-A"} and set(df["label_map"]) == {"canonical"}
    assert set(df["pathology"]) == {"normal", "infarct"}  # scar_prob 0.75 of 4 → 3 infarct, 1 normal
    assert (df.groupby("subject_id")["pathology"].first() == "infarct").sum() == 3
    assert set(df["spacing"]) == {"1.75x1.75x9"} and set(df["shape"]) == {"96x96x8"}
    for _, row in df.iterrows():
        assert sha256_file(lge_dir / row["image"]) == row["sha256"]


def test_files_geometry_and_canonical_labels(lge_dir: Path) -> None:
    df, _ = load_manifest(lge_dir / "manifest.csv")
    for _, row in df.iterrows():
        img = nib.load(str(lge_dir / row["image"]))
        lab = nib.load(str(lge_dir / row["label"]))
        assert img.get_data_dtype() == np.float32 and lab.get_data_dtype() == np.uint8
        assert img.shape == lab.shape == (96, 96, 8)
        np.testing.assert_allclose(img.header.get_zooms(), (1.75, 1.75, 9.0))
        np.testing.assert_allclose(img.affine, lab.affine)
        arr = np.asarray(img.dataobj)
        assert np.isfinite(arr).all() and arr.min() >= 0 and 100 < arr.max() < 3000
        values = set(np.unique(np.asarray(lab.dataobj)).tolist())
        assert values <= set(CANONICAL)
        assert {0, LV, MYO, RV} <= values


def test_lv_volume_ed_greater_than_es_and_wall_thickens(lge_dir: Path, cine_dir: Path) -> None:
    for root in (lge_dir, cine_dir):
        df, _ = load_manifest(root / "manifest.csv")
        params = json.loads((root / "phantom_params.json").read_text(encoding="utf-8"))["subjects"]
        for sid, rows in df.groupby("subject_id"):
            vol = {r["phase"]: (_load(root, r["label"]) == LV).sum() for _, r in rows.iterrows()}
            assert vol["ED"] > 1.25 * vol["ES"], sid
            wall = {r["phase"]: np.isin(_load(root, r["label"]), MYOCARDIAL_WALL).sum() for _, r in rows.iterrows()}
            # Myocardial volume is (nearly) conserved: the wall thickens as the cavity shrinks.
            assert 0.85 < wall["ES"] / wall["ED"] < 1.2, sid
            thick = params[sid]["phases"]
            assert np.mean(list(thick["ES"]["wall_thickness_mm"].values())) > np.mean(
                list(thick["ED"]["wall_thickness_mm"].values())
            )


def test_apex_to_base() -> None:
    for index in range(2):
        label = phantom_subject(7, index, "cine")["ED"][1].array  # default 10 slices x 8 mm, base → apex
        lv_area = (label == LV).sum(axis=(0, 1))
        rv_area = (label == RV).sum(axis=(0, 1))
        wall = np.isin(label, MYOCARDIAL_WALL).sum(axis=(0, 1))
        assert lv_area[:2].mean() > 2 * lv_area[-3:].mean()  # cavity narrows towards the apex
        assert rv_area[0] > 0 and rv_area[-1] == 0  # RV crescent in basal/mid slices only
        assert (wall[rv_area == 0] > 0).any()  # apical slices: LV without RV


def test_lge_scar_inside_wall_brighter_and_absent_in_normals(lge_dir: Path, cine_dir: Path) -> None:
    df, _ = load_manifest(lge_dir / "manifest.csv")
    cine_df, _ = load_manifest(cine_dir / "manifest.csv")
    cine_rows = {(r["subject_id"], r["phase"]): r for _, r in cine_df.iterrows()}
    for _, row in df.iterrows():
        lab = _load(lge_dir, row["label"])
        img = _load(lge_dir, row["image"])
        scar = np.isin(lab, (SCAR, MVO))
        if row["pathology"] == "normal":
            assert not scar.any(), row["subject_id"]
            continue
        assert (lab == SCAR).sum() > 20, row["subject_id"]
        # Same seed and subject → same heart in cine, where scar is invisible and labelled myocardium:
        # every scar voxel lies in the cine LV wall, and the walls coincide exactly.
        cine_lab = _load(cine_dir, cine_rows[(row["subject_id"], row["phase"])]["label"])
        assert (cine_lab[scar] == MYO).all()
        np.testing.assert_array_equal(np.isin(lab, MYOCARDIAL_WALL), cine_lab == MYO)
        assert img[lab == SCAR].mean() > 2.0 * img[lab == MYO].mean()
        assert img[lab == SCAR].mean() > 0.5 * (img[lab == MYO].mean() + img[lab == LV].mean())


def test_cine_contrast_and_no_scar_labels(cine_dir: Path) -> None:
    df, _ = load_manifest(cine_dir / "manifest.csv")
    for _, row in df.iterrows():
        lab = _load(cine_dir, row["label"])
        img = _load(cine_dir, row["image"])
        assert not np.isin(lab, (SCAR, MVO)).any()
        assert img[lab == LV].mean() > 2.0 * img[lab == MYO].mean()
        assert img[lab == RV].mean() > 2.0 * img[lab == MYO].mean()


def test_params_ground_truth(lge_dir: Path) -> None:
    meta = json.loads((lge_dir / "phantom_params.json").read_text(encoding="utf-8"))
    df, _ = load_manifest(lge_dir / "manifest.csv")
    assert meta["seed"] == 5 and meta["contrast"] == "lge" and set(meta["subjects"]) == set(df["subject_id"])
    for sid, p in meta["subjects"].items():
        assert p["pathology"] == df[df["subject_id"] == sid]["pathology"].iloc[0]
        t = p["tissue"]
        assert t["lv_blood"]["mean"] > t["myocardium"]["mean"] > 0 and t["myocardium"]["sd"] > 0
        ed = p["phases"]["ED"]
        if p["pathology"] == "infarct":
            assert t["scar"]["mean"] > t["lv_blood"]["mean"]
            assert p["scar_to_remote"] == pytest.approx(t["scar"]["mean"] / t["myocardium"]["mean"], rel=1e-4)
            assert 0 < ed["scar_fraction"] < 1 and ed["scar_aha_segments"]
            assert p["anatomy"]["scar"]["territory"] in ("LAD", "RCA", "LCx")
            # Observed (after the scanner) ratio is lower than the object's (partial volume, noise floor).
            assert 1.5 < ed["observed_scar_to_remote"] < p["scar_to_remote"]
        else:
            assert ed["scar_fraction"] == 0 and p["anatomy"]["scar"] is None and p["scar_to_remote"] is None


def test_scanner_styles_differ_on_the_same_anatomy() -> None:
    kw = {"seed": 2, "index": 0, "contrast": "cine", "pathology": "normal", **SMALL}
    a = phantom_subject(scanner="A", **kw)
    b = phantom_subject(scanner="B", **kw)
    img_a, lab_a = a["ED"]
    img_b, lab_b = b["ED"]
    np.testing.assert_array_equal(lab_a.array, lab_b.array)  # paired: same heart
    assert a["params"]["tissue"] == b["params"]["tissue"]
    ratio = {
        k: v["ED"][0].array[v["ED"][1].array == LV].mean() / v["ED"][0].array[v["ED"][1].array == MYO].mean()
        for k, v in (("A", a), ("B", b))
    }
    assert ratio["A"] > 1.2 * ratio["B"]  # B's flatter contrast curve
    # B is blurrier and noisier: blood-pool interior differs more from its smoothed self? Use the local
    # roughness of the LV blood pool relative to its mean, and the edge sharpness across the endocardium.
    pool = lab_a.array == LV
    rough = {
        k: np.abs(np.diff(v.array, axis=0))[pool[1:] & pool[:-1]].mean() / v.array[pool].mean()
        for k, v in (("A", img_a), ("B", img_b))
    }
    assert rough["B"] > rough["A"]
    assert not np.allclose(img_a.array, img_b.array)


def test_phantom_subject_validates_arguments() -> None:
    with pytest.raises(ValueError, match="contrast"):
        phantom_subject(0, contrast="t2")
    with pytest.raises(ValueError, match="scanner"):
        phantom_subject(0, scanner="C")
    with pytest.raises(ValueError, match="shape"):
        phantom_subject(0, shape=(16, 16, 4))
    with pytest.raises(ValueError, match="pathology"):
        phantom_subject(0, pathology="sick")
    with pytest.raises(ValueError, match="index"):
        phantom_subject(0, index=-1)


def test_output_is_atomic(tmp_path: Path, monkeypatch) -> None:
    import medsynth.phantom.generate as gen

    out = tmp_path / "ds"
    generate_dataset(out, subjects=1, seed=0, **SMALL)
    before = _hash_tree(out)
    calls = {"n": 0}
    real = gen._write_nifti

    def failing(vol, path):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        real(vol, path)

    monkeypatch.setattr(gen, "_write_nifti", failing)
    with pytest.raises(OSError):
        generate_dataset(out, subjects=2, seed=1, **SMALL)
    assert _hash_tree(out) == before  # previous output intact, nothing half-written
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_cli_writes_dataset(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    rc = cli_main(
        [
            "phantom",
            "--out",
            str(out),
            "--subjects",
            "1",
            "--contrast",
            "lge",
            "--scanner",
            "B",
            "--seed",
            "3",
            "--shape",
            "64x64x6",
            "--spacing",
            "2x2x10",
        ]
    )
    assert rc == 0
    df, _ = load_manifest(out / "manifest.csv")
    assert len(df) == 2 and set(df["vendor"]) == {"phantom-B"} and set(df["shape"]) == {"64x64x6"}
    assert (out / "phantom_params.json").is_file()
    assert cli_main(["phantom", "--out", str(tmp_path / "bad"), "--subjects", "0"]) == 2
    assert "subjects" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_figure_against_real_data(test_data_root: Path, tmp_path: Path) -> None:
    from medsynth.phantom.figure import acdc_slice, emidec_slice, make_figure

    img, lab = acdc_slice(test_data_root, "patient061")
    assert img.shape == lab.shape and (lab == LV).any() and (lab == RV).any()
    img, lab = emidec_slice(test_data_root, "Case_P009")
    assert (lab == SCAR).any()
    out = make_figure(test_data_root, tmp_path / "fig.png")
    assert out.stat().st_size < 300_000


def test_both_ventricles_eject_physiological_stroke_volumes() -> None:
    """Adult ranges: LV and RV stroke volume ~ 60–100 ml (45–110 allowed: infarcts, small hearts), RVEF
    45–65 %; both from the label maps of the default 1.5 × 1.5 × 8 mm stack, cine and LGE the same heart."""
    for index in range(6):
        subj = phantom_subject(3, index, "cine")
        vol = {
            ph: {c: int((subj[ph][1].array == c).sum()) * 1.5 * 1.5 * 8.0 / 1000 for c in (LV, RV)}
            for ph in ("ED", "ES")
        }
        for c in (LV, RV):
            assert vol["ED"][c] > vol["ES"][c], (index, c, vol)
            assert 45.0 < vol["ED"][c] - vol["ES"][c] < 110.0, (index, c, vol)
        assert 0.45 < 1.0 - vol["ES"][RV] / vol["ED"][RV] < 0.65, (index, vol)
        p = subj["params"]
        assert p["stroke_volume_ml"] == pytest.approx(vol["ED"][LV] - vol["ES"][LV], abs=0.01)
        assert p["rv_stroke_volume_ml"] == pytest.approx(vol["ED"][RV] - vol["ES"][RV], abs=0.01)


def test_pathology_is_true_per_subject(tmp_path: Path) -> None:
    """A subject is "infarct" exactly when its heart has a scar; cine cohorts default to few infarcts (ACDC-like),
    so two default cine subjects are not both marked infarct."""
    m = generate_dataset(tmp_path / "cine", subjects=2, contrast="cine", seed=0, **SMALL)
    df, _ = load_manifest(m)
    params = json.loads((tmp_path / "cine" / "phantom_params.json").read_text(encoding="utf-8"))["subjects"]
    assert (df.groupby("subject_id")["pathology"].first() == "normal").all()
    for root, n in ((generate_dataset(tmp_path / "lge", subjects=6, contrast="lge", seed=1, **SMALL).parent, 6),):
        params = json.loads((root / "phantom_params.json").read_text(encoding="utf-8"))["subjects"]
        assert len(params) == n
        for p in params.values():
            has_scar = p["phases"]["ED"]["scar_volume_ml"] > 0
            assert (p["pathology"] == "infarct") == has_scar
            assert (p["anatomy"]["scar"] is not None) == has_scar


def test_surroundings_body_outline_chest_wall_liver() -> None:
    """The thorax: air outside an irregular body outline (not one ellipse arc), a chest wall of fat, muscle
    and ribs, and liver below the heart towards the apex."""
    from medsynth.phantom.anatomy import AIR, FAT, LIVER, MUSCLE, RIB, Grid, render, sample_anatomy

    grid = Grid((160, 160, 10), (2.0, 2.0, 8.0))
    x, y, _ = grid.coords()
    X, Y = np.meshgrid(x, y, indexing="ij")
    for seed in range(3):
        anat = sample_anatomy(np.random.default_rng(seed), "normal", 10)
        tissue = render(anat, grid, ("ED",))["ED"]
        codes = set(np.unique(tissue).tolist())
        assert {AIR, FAT, MUSCLE, RIB, LIVER} <= codes
        assert (tissue[:, :, -3:] == LIVER).sum() > (tissue[:, :, :3] == LIVER).sum()  # more liver apically
        # body outline of a slice: its boundary is not an ellipse (algebraic conic fit residual > 1 mm)
        body = ndimage.binary_fill_holes(tissue[:, :, 4] != AIR)
        edge = body & ~ndimage.binary_erosion(body)
        inner = edge[1:-1, 1:-1]
        px, py = X[1:-1, 1:-1][inner], Y[1:-1, 1:-1][inner]
        design = np.stack([px**2, px * py, py**2, px, py, np.ones_like(px)], axis=1)
        coef = np.linalg.svd(design, full_matrices=False)[2][-1]
        grad = np.hypot(2 * coef[0] * px + coef[1] * py + coef[3], coef[1] * px + 2 * coef[2] * py + coef[4])
        residual_mm = np.abs(design @ coef) / np.maximum(grad, 1e-9)  # first-order distance to the conic
        assert np.sqrt(np.mean(residual_mm**2)) > 1.0
        # outside air touches the image border
        outside = ~body
        assert outside[0].any() or outside[-1].any() or outside[:, 0].any() or outside[:, -1].any()
