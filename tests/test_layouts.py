"""Dataset layouts → manifests: tiny fake trees for every layout, real ACDC and EMIDEC PNG when available."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medsynth.cli.main import main
from medsynth.data.layouts import LAYOUTS, build_manifest
from medsynth.data.manifest import COLUMNS, load_manifest, resolve_path
from medsynth.data.readers import read_pair
from medsynth.errors import ManifestError
from medsynth.labels import LV, RV, SCAR
from medsynth.utils.hashing import sha256_file

AFFINE = np.diag([1.5, 1.5, 8.0, 1.0])


def _nifti(path: Path, arr: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def _heart(shape=(12, 10, 3), lv=3, myo=2, rv=1, lv_size=3) -> np.ndarray:
    """A blocky LV / MYO / RV label volume in the given dataset's codes."""
    lab = np.zeros(shape, np.uint8)
    lab[2:8, 2:8] = myo
    c = 5 - lv_size // 2
    lab[c : c + lv_size, c : c + lv_size] = lv
    lab[8:11, 3:7] = rv
    return lab


def _image(shape=(12, 10, 3), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 10, size=shape).astype(np.float32)


def make_acdc(root: Path, n: int = 2) -> Path:
    groups = ["DCM", "NOR", "MINF"]
    for i in range(1, n + 1):
        pid = f"patient{i:03d}"
        d = root / pid
        d.mkdir(parents=True)
        ed, es = 1, 7 + i
        (d / "Info.cfg").write_text(
            f"ED: {ed}\nES: {es}\nGroup: {groups[i % 3]}\nHeight: 170.0\nNbFrame: 20\nWeight: 70.{i}\n"
        )
        for frame, size in ((ed, 4), (es, 2)):
            _nifti(d / f"{pid}_frame{frame:02d}.nii.gz", _image(seed=i * 10 + frame))
            _nifti(d / f"{pid}_frame{frame:02d}_gt.nii.gz", _heart(lv_size=size))
    return root


def make_mnms(root: Path) -> Path:
    rows = []
    for k, (code, vendor_name, vendor, path) in enumerate(
        [("A0S9V9", "Siemens", "A", "NOR"), ("B1C2D3", "Philips", "B", "HCM"), ("C9X8Y7", "GE", "C", "DCM")]
    ):
        d = root / "Training" / "Labeled" / code
        t = 6
        ed, es = 0, 3 + k % 2
        img = np.stack([_image(seed=k * 100 + f) for f in range(t)], axis=-1)
        gt = np.zeros((*img.shape[:3], t), np.uint8)
        gt[..., ed] = _heart(lv=1, myo=2, rv=3, lv_size=4)
        gt[..., es] = _heart(lv=1, myo=2, rv=3, lv_size=2)
        _nifti(d / f"{code}_sa.nii.gz", img)
        _nifti(d / f"{code}_sa_gt.nii.gz", gt)
        rows.append(
            {
                "External code": code,
                "VendorName": vendor_name,
                "Vendor": vendor,
                "Centre": 1 + k,
                "ED": ed,
                "ES": es,
                "Pathology": path,
            }
        )
    # An unlabelled case (M&Ms ships some): image only, skipped.
    _nifti(root / "Training" / "Unlabeled" / "Z0Z0Z0" / "Z0Z0Z0_sa.nii.gz", np.zeros((12, 10, 3, 6), np.float32))
    pd.DataFrame(rows).to_csv(root / "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv", index=True)
    return root


def make_emidec(root: Path) -> Path:
    for case, scar in (("Case_N001", False), ("Case_P002", True)):
        lab = _heart(lv=1, myo=2, rv=0)
        if scar:
            lab[2, 2:8] = 3
            lab[3, 4] = 4
        _nifti(root / case / "Images" / f"{case}.nii.gz", _image(seed=len(case)))
        _nifti(root / case / "Contours" / f"{case}.nii.gz", lab)
    return root


def make_png_slices(root: Path, cases=(("Case_N001", 2), ("Case_P002", 3))) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for case, n_slices in cases:
        for z in range(n_slices):
            lab = _heart(shape=(16, 16, 1), lv=1, myo=2, rv=0)[..., 0]
            if case.startswith("Case_P"):
                lab[2, 2:8] = 3
            img = (np.random.default_rng(z).random((16, 16)) * 200).astype(np.uint8)
            Image.fromarray(img).save(root / "images" / f"{case}_slice{z:03d}.png")
            Image.fromarray(lab).save(root / "masks" / f"{case}_slice{z:03d}.png")
    return root


def make_nnunet(root: Path, labels: dict | None = None) -> Path:
    cases = ["pat01_ED", "pat01_ES", "pat02_ED"]
    for i, case in enumerate(cases):
        _nifti(root / "imagesTr" / f"{case}_0000.nii.gz", _image(seed=i))
        _nifti(root / "labelsTr" / f"{case}.nii.gz", _heart(lv=1, myo=2, rv=3))
    meta = {
        "name": "Dataset501_Synth",
        "channel_names": {"0": "cine"},
        "labels": labels or {"background": 0, "lv": 1, "myo": 2, "rv": 3, "scar": 4, "mvo": 5},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _check_common(df: pd.DataFrame, root: Path) -> None:
    assert list(df.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert (df["split"] == "").all()
    for _, row in df.iterrows():
        image = resolve_path(root, row["image"])
        assert image.is_file() and resolve_path(root, row["label"]).is_file()
        assert row["sha256"] == sha256_file(image)
        assert row["shape"].count("x") == 2


def test_registry_lists_all_layouts():
    assert {"acdc", "mnms", "emidec", "png-slices", "nnunet"} <= set(LAYOUTS)
    with pytest.raises(ManifestError, match="unknown layout"):
        build_manifest("nope", Path("."))


def test_acdc_layout(tmp_path):
    root = make_acdc(tmp_path / "acdc", n=3)
    df = build_manifest("acdc", root)
    _check_common(df, root)
    assert len(df) == 6 and df["subject_id"].nunique() == 3
    assert sorted(df["phase"].unique()) == ["ED", "ES"]
    assert set(df["pathology"]) == {"dcm", "infarct", "normal"}
    assert (df["label_map"] == "acdc").all() and (df["modality"] == "cine").all()
    assert (df["vendor"] == "unknown").all() and (df["frame"] == "").all()
    es = df[(df.subject_id == "patient002") & (df.phase == "ES")].iloc[0]
    assert es["image"] == "patient002/patient002_frame09.nii.gz"
    assert es["spacing"] == "1.5x1.5x8" and es["shape"] == "12x10x3" and es["weight_kg"] == "70.2"


def test_mnms_layout_frames_become_rows(tmp_path):
    root = make_mnms(tmp_path / "mnms")
    df = build_manifest("mnms", root)
    _check_common(df, root)
    assert len(df) == 6 and df["subject_id"].nunique() == 3  # unlabelled case skipped
    row = df[(df.subject_id == "B1C2D3") & (df.phase == "ES")].iloc[0]
    assert row["frame"] == "4" and row["vendor"] == "Philips" and row["pathology"] == "hcm"
    assert row["shape"] == "12x10x3" and row["label_map"] == "mnms"
    for _, r in df.iterrows():  # every (image, frame) row reads back to a labelled pair, ED LV > ES LV
        _, lab = read_pair(root / r["image"], root / r["label"], r["label_map"], frame=int(r["frame"]))
        assert (lab.array == RV).any()
    lv = {
        r["phase"]: (
            read_pair(root / r["image"], root / r["label"], "mnms", frame=int(r["frame"]))[1].array == LV
        ).sum()
        for _, r in df[df.subject_id == "A0S9V9"].iterrows()
    }
    assert lv["ED"] > lv["ES"]


def test_mnms_without_info_csv_fails(tmp_path):
    root = make_mnms(tmp_path / "mnms")
    next(root.glob("*.csv")).unlink()
    with pytest.raises(ManifestError, match="information CSV"):
        build_manifest("mnms", root)


def test_emidec_layout(tmp_path):
    root = make_emidec(tmp_path / "emidec")
    df = build_manifest("emidec", root)
    _check_common(df, root)
    assert list(df["subject_id"]) == ["Case_N001", "Case_P002"]
    assert list(df["pathology"]) == ["normal", "infarct"]
    assert (df["modality"] == "lge").all() and (df["phase"] == "none").all()
    _, lab = read_pair(root / df.at[1, "image"], root / df.at[1, "label"], "emidec")
    assert (lab.array == SCAR).any()


def test_png_slices_layout_groups_subjects(tmp_path):
    root = make_png_slices(tmp_path / "png")
    df = build_manifest("png-slices", root)
    _check_common(df, root)
    assert len(df) == 5 and df["subject_id"].nunique() == 2
    assert list(df[df.subject_id == "Case_P002"]["slice_index"]) == ["0", "1", "2"]
    assert set(df[df.subject_id == "Case_N001"]["pathology"]) == {"normal"}
    assert set(df[df.subject_id == "Case_P002"]["pathology"]) == {"infarct"}
    assert (df["spacing"] == "").all() and (df["shape"] == "16x16x1").all() and (df["dataset"] == "emidec").all()


def test_png_slices_other_naming_and_label_map(tmp_path):
    root = make_png_slices(tmp_path / "png", cases=(("subjA", 2),))
    # Non-EMIDEC names: stem before _slice is the subject; label map override is recorded.
    df = build_manifest("png-slices", root, label_map="canonical", modality="cine", dataset="mine")
    assert set(df["subject_id"]) == {"subjA"} and (df["label_map"] == "canonical").all()
    assert (df["pathology"] == "unknown").all() and (df["dataset"] == "mine").all() and (df["modality"] == "cine").all()


def test_nnunet_layout(tmp_path):
    root = make_nnunet(tmp_path / "Dataset501_Synth")
    df = build_manifest("nnunet", root)
    _check_common(df, root)
    assert list(df["subject_id"]) == ["pat01", "pat01", "pat02"]
    assert list(df["phase"]) == ["ED", "ES", "ED"]
    assert (df["label_map"] == "canonical").all() and (df["modality"] == "cine").all()
    assert (df["dataset"] == "Dataset501_Synth").all()


def test_nnunet_foreign_labels_refused(tmp_path):
    root = make_nnunet(tmp_path / "ds", labels={"background": 0, "RV": 1, "MYO": 2, "LV": 3})
    with pytest.raises(ManifestError, match=r"dataset.json.*canonical"):
        build_manifest("nnunet", root)


def test_manifest_cli_roundtrip(tmp_path):
    root = make_acdc(tmp_path / "data" / "acdc", n=3)
    out = tmp_path / "manifests" / "acdc.csv"
    rc = main(["manifest", "--layout", "acdc", "--root", str(root), "--out", str(out), "--split", "--seed", "3"])
    assert rc == 0
    assert out.read_text(encoding="utf-8").startswith("#medsynth-manifest data_root=../data/acdc")
    df, data_root = load_manifest(out)  # resolves the root from the header and checks every file
    assert data_root == root.resolve() and len(df) == 6
    assert set(df["split"]) <= {"train", "val", "test"} and (df["split"] != "").all()
    again = tmp_path / "manifests" / "again.csv"
    assert main(["split", str(out), "--out", str(again), "--seed", "3"]) == 0
    df2, _ = load_manifest(again)
    assert list(df2["split"]) == list(df["split"])


# ---------------------------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_acdc_manifest(acdc_root, tmp_path):
    df = build_manifest("acdc", acdc_root, verify=False)
    assert len(df) == 60 and df["subject_id"].nunique() == 30
    assert (df.groupby("subject_id")["phase"].apply(sorted).map(tuple) == ("ED", "ES")).all()
    assert df.groupby("pathology")["subject_id"].nunique().to_dict() == {
        "arv": 6,
        "dcm": 6,
        "hcm": 6,
        "infarct": 6,
        "normal": 6,
    }
    assert df["spacing"].str.match(r"^[\d.]+x[\d.]+x[\d.]+$").all()


@pytest.mark.realdata
def test_real_emidec_png_manifest(emidec_png_root):
    df = build_manifest("png-slices", emidec_png_root)
    assert len(df) == 346 and df["subject_id"].nunique() == 50
    per = df.groupby("pathology")["subject_id"].nunique().to_dict()
    assert per == {"infarct": 33, "normal": 17}
    assert (df["shape"] == "256x256x1").all() and (df["label_map"] == "emidec").all()


def test_mnms_manifest_loads_back(tmp_path):
    root = make_mnms(tmp_path / "mnms")
    out = tmp_path / "mnms.csv"
    assert main(["manifest", "--layout", "mnms", "--root", str(root), "--out", str(out)]) == 0
    df, _ = load_manifest(out)
    assert len(df) == 6


# ---- symlinked patient folders, Sunnybrook (DICOM + contour files) ---------------------------------------


def test_acdc_finds_symlinked_patient_folders(tmp_path):
    real = make_acdc(tmp_path / "elsewhere", n=2)
    root = tmp_path / "acdc"
    root.mkdir()
    for p in sorted(real.iterdir()):
        (root / p.name).symlink_to(p, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)  # a cycle must not hang the scan
    df = build_manifest("acdc", root)
    assert sorted(df["subject_id"].unique()) == sorted(p.name for p in real.iterdir())
    assert len(df) == 4


def make_sunnybrook(root: Path) -> tuple[Path, np.ndarray]:
    """Two patients; each has a 4-slice DICOM series (IM-0001-0001..4) and contours on slices 2 and 3."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from dicom_series import write_contour, write_series

    vol = (50 + 10 * np.random.default_rng(0).random((4, 40, 48))).astype(np.int16)
    for patient in ("SC-HF-I-01", "SC-N-02"):
        write_series(root / patient / "DICOM", vol, spacing=(1.4, 1.4, 8.0))
        contours = root / patient / "contours-manual" / "IRCCI-expert"
        contours.mkdir(parents=True)
        for k in (2, 3):
            write_contour(contours / f"IM-0001-{k:04d}-icontour-manual.txt", (24.0, 20.0), 6.0)
            if k == 2:  # Sunnybrook has o-contours on some frames only
                write_contour(contours / f"IM-0001-{k:04d}-ocontour-manual.txt", (24.0, 20.0), 10.0)
    return root, vol


def test_sunnybrook_layout_rasterises_contours(tmp_path):
    from medsynth.labels import MYO

    root, vol = make_sunnybrook(tmp_path / "sunnybrook")
    df = build_manifest("sunnybrook", root)
    assert len(df) == 4 and sorted(df["subject_id"].unique()) == ["SC-HF-I-01", "SC-N-02"]
    assert set(df["label_map"]) == {"canonical"} and set(df["dataset"]) == {"sunnybrook"}
    row = df[(df["subject_id"] == "SC-HF-I-01") & (df["slice_index"] == "2")].iloc[0]
    image, label = read_pair(root / row["image"], root / row["label"], "canonical")
    assert image.shape == label.shape == (48, 40, 1)
    lab = label.array[..., 0]
    n_lv, n_myo = int((lab == LV).sum()), int((lab == MYO).sum())
    # polygon areas: pi r^2 for r = 6 (LV) and the ring up to r = 10 (myocardium), within the rasterisation
    assert abs(n_lv - np.pi * 36) < 0.25 * np.pi * 36, n_lv
    assert abs(n_myo - np.pi * (100 - 36)) < 0.25 * np.pi * 64, n_myo
    # the blood pool is centred where the contour says (x = column 24, y = row 20) on the image's grid
    xs, ys = np.nonzero(lab == LV)
    img = image.array[..., 0]
    assert img.shape == lab.shape
    centre = (xs.mean(), ys.mean())
    flipped = (47 - 24, 39 - 20)  # LPS -> RAS flips both in-plane axes
    assert min(np.hypot(centre[0] - c[0], centre[1] - c[1]) for c in [(24, 20), flipped]) < 1.0, centre
    only_lv = df[(df["subject_id"] == "SC-HF-I-01") & (df["slice_index"] == "3")].iloc[0]
    _, lab3 = read_pair(root / only_lv["image"], root / only_lv["label"], "canonical")
    assert set(np.unique(lab3.array)) == {0, LV}  # no o-contour: blood pool only


def test_sunnybrook_contour_without_image_is_named(tmp_path):
    root, _ = make_sunnybrook(tmp_path / "sb")
    stray = root / "SC-N-02" / "contours-manual" / "IRCCI-expert" / "IM-0001-0009-icontour-manual.txt"
    stray.write_text("1 1\n5 1\n5 5\n")
    with pytest.raises(ManifestError, match="IM-0001-0009"):
        build_manifest("sunnybrook", root)
    assert len(build_manifest("sunnybrook", root, lenient=True)) == 4


def test_sunnybrook_manifest_through_cli_and_inspect(tmp_path, capsys):
    root, _ = make_sunnybrook(tmp_path / "sb")
    out = tmp_path / "sb.csv"
    assert main(["manifest", "--layout", "sunnybrook", "--root", str(root), "--out", str(out)]) == 0
    df, data_root = load_manifest(out)
    assert len(df) == 4 and data_root == root.resolve()
    assert main(["inspect", str(out), "--out", str(tmp_path / "insp")]) == 0
    summary = pd.read_csv(tmp_path / "insp" / "summary.csv")
    assert (summary["lv"] > 0).all()
