"""``medsynth inspect``: label volumes per pair, the montage, bad input, atomic output, real data."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medsynth.cli.main import main
from medsynth.data.inspect import MONTAGE_FILE, SUMMARY_COLUMNS, SUMMARY_FILE, inspect, label_volumes
from medsynth.data.manifest import COLUMNS, write_manifest
from medsynth.errors import InputFileError
from medsynth.labels import LV, MYO, RV, SCAR

TO_ACDC = np.array([0, 3, 2, 1, 0, 0], np.uint8)  # canonical → ACDC codes (1 RV, 2 MYO, 3 LV)


def row(subject: str, image: str, label: str, label_map: str, phase: str = "ED", **extra) -> dict:
    r = {c: "" for c in COLUMNS}
    r.update(subject_id=subject, image=image, label=label, label_map=label_map, phase=phase, dataset="syn")
    r.update(modality="cine", pathology="NOR")
    r.update(extra)
    return r


def box_label(shape, boxes: dict[int, tuple[slice, slice, slice]]) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    for code, box in boxes.items():
        lab[box] = code
    return lab


@pytest.fixture()
def nifti_manifest(tmp_path: Path) -> tuple[Path, Path, dict]:
    """Two subjects × ED/ES as NIfTI boxes with known voxel counts at spacing 1.25 × 1.25 × 8 mm."""
    root = tmp_path / "data"
    root.mkdir()
    spacing = (1.25, 1.25, 8.0)
    affine = np.diag([*spacing, 1.0])
    rows, expected = [], {}
    rng = np.random.default_rng(0)
    for s in range(2):
        for phase, lv_len in (("ED", 20), ("ES", 12)):
            lab = box_label(
                (64, 64, 5),
                {
                    MYO: (slice(16, 44), slice(16, 44), slice(1, 4)),
                    LV: (slice(22, 22 + lv_len), slice(22, 38), slice(1, 4)),
                    RV: (slice(46, 56), slice(20, 30), slice(1, 3)),
                },
            )
            img = rng.normal(100, 10, lab.shape).astype(np.float32) + 100 * (lab == LV)
            name = f"s{s}_{phase}"
            nib.save(nib.Nifti1Image(img, affine), root / f"{name}.nii.gz")
            nib.save(nib.Nifti1Image(TO_ACDC[lab], affine), root / f"{name}_gt.nii.gz")
            rows.append(row(f"s{s}", f"{name}.nii.gz", f"{name}_gt.nii.gz", "acdc", phase=phase))
            vox_ml = np.prod(spacing) / 1000
            expected[name] = {k: float((lab == c).sum() * vox_ml) for k, c in (("lv", LV), ("myo", MYO), ("rv", RV))}
    path = tmp_path / "m.csv"
    write_manifest(pd.DataFrame(rows), path, data_root=root)
    return path, root, expected


def test_label_volumes_ml_and_pixels():
    lab = np.zeros((10, 10, 4), np.uint8)
    lab[:5, :4, :2] = LV  # 40 voxels
    lab[0, 9, 0] = SCAR
    vols, unit = label_volumes(lab, (2.0, 2.0, 5.0))  # 20 mm³ per voxel
    assert unit == "ml" and vols["lv"] == pytest.approx(0.8) and vols["scar"] == pytest.approx(0.02)
    assert vols["myo"] == 0 and set(vols) == {"lv", "myo", "rv", "scar", "mvo"}
    vols, unit = label_volumes(lab, None)
    assert unit == "pixels" and vols["lv"] == 40 and vols["scar"] == 1


def test_inspect_writes_summary_and_montage(nifti_manifest, tmp_path):
    path, _, expected = nifti_manifest
    out = tmp_path / "report"
    inspect(path, out)
    summary = pd.read_csv(out / SUMMARY_FILE)
    assert tuple(summary.columns) == SUMMARY_COLUMNS
    assert len(summary) == 4 and set(summary["unit"]) == {"ml"}
    for _, r in summary.iterrows():
        name = Path(r["image"]).name.replace(".nii.gz", "")
        for key, ml in expected[name].items():
            assert r[key] == pytest.approx(ml, rel=1e-4)
    assert (summary["scar"] == 0).all()
    lv = summary.pivot(index="subject_id", columns="phase", values="lv")
    assert (lv["ED"] > lv["ES"]).all()
    montage = np.array(Image.open(out / MONTAGE_FILE))
    assert montage.ndim == 3 and montage.shape[0] > 100 and montage.shape[1] > 100
    # coloured overlays are present (not a gray picture)
    rgb = montage[..., :3].astype(int)
    assert (np.abs(rgb[..., 0] - rgb[..., 1]) > 60).sum() > 100


def test_png_rows_count_pixels_and_cli(tmp_path):
    root = tmp_path / "png"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for k in range(3):
        mask = np.zeros((64, 80), np.uint8)
        mask[20:40, 30:50] = 2  # EMIDEC myocardium: 400 px
        mask[25:35, 35:45] = 1  # LV cavity: 100 px
        if k == 1:
            mask[20:22, 30:40] = 3  # scar: 20 px
        img = (50 + 100 * (mask == 1) + 30 * (mask == 3)).astype(np.uint8)
        name = f"Case_P001_slice{k:03d}.png"
        Image.fromarray(img).save(root / "images" / name)
        Image.fromarray(mask).save(root / "masks" / name)
        rows.append(row("Case_P001", f"images/{name}", f"masks/{name}", "emidec", phase="none", slice_index=str(k)))
    manifest = tmp_path / "png.csv"
    write_manifest(pd.DataFrame(rows), manifest, data_root=root)
    out = tmp_path / "out"
    assert main(["inspect", str(manifest), "--out", str(out)]) == 0
    summary = pd.read_csv(out / SUMMARY_FILE)
    assert set(summary["unit"]) == {"pixels"}
    assert summary["lv"].tolist() == [100, 100, 100]
    assert summary["myo"].tolist() == [300, 280, 300] and summary["scar"].tolist() == [0, 20, 0]
    assert (out / MONTAGE_FILE).is_file()


def test_bad_row_strict_error_leaves_nothing_lenient_skips(nifti_manifest, tmp_path, capsys, caplog):
    path, root, _ = nifti_manifest
    (root / "s1_ES_gt.nii.gz").write_bytes(b"truncated")
    out = tmp_path / "strict"
    with pytest.raises(InputFileError, match="s1_ES_gt.nii.gz"):
        inspect(path, out)
    assert not out.exists() and not list(tmp_path.glob(".strict*"))  # nothing half-written
    assert main(["inspect", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medsynth: error: ") and "s1_ES_gt.nii.gz" in err and "Traceback" not in err
    with caplog.at_level(logging.WARNING):
        assert main(["inspect", str(path), "--out", str(out), "--lenient"]) == 0
    summary = pd.read_csv(out / SUMMARY_FILE)
    assert len(summary) == 3 and "s1_ES" not in " ".join(summary["image"])
    assert "skipped" in caplog.text


def test_rerun_replaces_output_atomically(nifti_manifest, tmp_path):
    path, _, _ = nifti_manifest
    out = tmp_path / "r"
    inspect(path, out)
    (out / "stale.txt").write_text("old")
    inspect(path, out, max_panels=2)
    assert not (out / "stale.txt").exists() and (out / SUMMARY_FILE).is_file()


# -------------------------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_acdc_summary_ed_greater_than_es(acdc_root, tmp_path):
    rows = []
    for pdir in sorted(acdc_root.glob("patient*")):
        info = dict(
            line.split(":", 1) for line in (pdir / "Info.cfg").read_text(encoding="utf-8").splitlines() if ":" in line
        )
        for key in ("ED", "ES"):
            img = f"{pdir.name}/{pdir.name}_frame{int(info[key]):02d}.nii.gz"
            rows.append(row(pdir.name, img, img.replace(".nii.gz", "_gt.nii.gz"), "acdc", phase=key, dataset="acdc"))
    manifest = write_manifest(pd.DataFrame(rows), tmp_path / "acdc.csv", data_root=acdc_root)
    out = tmp_path / "acdc_report"
    assert main(["inspect", str(manifest), "--out", str(out)]) == 0
    s = pd.read_csv(out / SUMMARY_FILE)
    assert len(s) == 60 and set(s["unit"]) == {"ml"}
    lv = s.pivot(index="subject_id", columns="phase", values="lv")
    assert len(lv) == 30 and (lv["ED"] > lv["ES"]).all()
    # plausible magnitudes; the smallest ACDC LV here is patient083 (RV group, 160 cm / 58 kg): 49 ml at ED
    assert lv["ED"].between(40, 500).all() and lv["ES"].between(5, 450).all() and lv["ED"].median() > 100
    assert (s["rv"] > 0).all() and s["myo"].between(25, 400).all()
    assert (s[["scar", "mvo"]] == 0).all().all()
    assert Image.open(out / MONTAGE_FILE).size[0] > 500


@pytest.mark.realdata
def test_emidec_summary_scar_only_in_infarct_cases(emidec_png_root, tmp_path):
    rows = []
    for f in sorted((emidec_png_root / "images").glob("*.png")):
        m = re.match(r"(Case_([NP])\d+)_slice(\d+)", f.stem)
        pathology = "normal" if m[2] == "N" else "infarct"
        rows.append(row(m[1], f"images/{f.name}", f"masks/{f.name}", "emidec", phase="none", pathology=pathology))
    manifest = write_manifest(pd.DataFrame(rows), tmp_path / "emidec.csv", data_root=emidec_png_root)
    out = tmp_path / "emidec_report"
    inspect(manifest, out)
    s = pd.read_csv(out / SUMMARY_FILE)
    assert len(s) == 346 and set(s["unit"]) == {"pixels"}
    scar = s.groupby("subject_id")["scar"].sum()
    infarct = scar.index.str.startswith("Case_P")
    assert infarct.sum() == 33 and (scar[infarct] > 0).all() and (scar[~infarct] == 0).all()
