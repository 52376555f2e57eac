"""Bad input → one clear error naming the file (strict) or a skip with a warning (lenient); nothing half-written."""

from __future__ import annotations

import gzip
import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medsynth.cli.main import main
from medsynth.data.layouts import build_manifest
from medsynth.data.manifest import COLUMNS, load_manifest, write_manifest
from medsynth.data.readers import read_label, read_pair, read_volume
from medsynth.errors import GeometryError, InputFileError, LabelError, ManifestError

AFF = np.diag([1.4, 1.4, 8.0, 1.0])


def _nifti(path: Path, arr: np.ndarray, affine: np.ndarray = AFF) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def _label(shape=(8, 8, 2)) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[2:6, 2:6] = 2
    lab[3:5, 3:5] = 3
    return lab


def _names(path: Path):
    return re.escape(str(path))


def _one_line(err: BaseException) -> bool:
    return "\n" not in str(err)


def test_corrupt_file(tmp_path):
    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(b"this is not a nifti file at all" * 20)
    with pytest.raises(InputFileError, match=_names(bad)) as info:
        read_volume(bad)
    assert _one_line(info.value)
    png = tmp_path / "corrupt.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(InputFileError, match=_names(png)):
        read_volume(png)


def test_truncated_nii_gz(tmp_path):
    good = _nifti(tmp_path / "good.nii.gz", np.random.default_rng(0).normal(size=(32, 32, 8)).astype(np.float32))
    data = good.read_bytes()
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputFileError, match=_names(bad)) as info:
        read_volume(bad)
    assert _one_line(info.value)
    # Uncompressed, cut short: the header promises more voxels than the file holds.
    raw = tmp_path / "truncated.nii"
    raw.write_bytes(gzip.decompress(data)[:1000])
    with pytest.raises(InputFileError, match=_names(raw)):
        read_volume(raw)


def test_missing_file(tmp_path):
    with pytest.raises(InputFileError, match=_names(tmp_path / "absent.nii.gz") + ".*not found"):
        read_pair(tmp_path / "absent.nii.gz", tmp_path / "absent_gt.nii.gz", "acdc")


def test_shape_mismatch(tmp_path):
    img = _nifti(tmp_path / "img.nii.gz", np.ones((8, 8, 2), np.float32))
    lab = _nifti(tmp_path / "lab.nii.gz", _label((8, 8, 3)))
    with pytest.raises(GeometryError, match=_names(img) + ".*" + _names(lab) + ".*shape"):
        read_pair(img, lab, "acdc")


def test_affine_mismatch(tmp_path):
    img = _nifti(tmp_path / "img.nii.gz", np.ones((8, 8, 2), np.float32))
    shifted = AFF.copy()
    shifted[0, 3] += 0.5  # half a millimetre: well above the 1e-3 mm tolerance
    lab = _nifti(tmp_path / "lab.nii.gz", _label(), shifted)
    with pytest.raises(GeometryError, match=_names(img) + ".*" + _names(lab) + ".*affine"):
        read_pair(img, lab, "acdc")
    # Within tolerance is accepted.
    tiny = AFF.copy()
    tiny[0, 3] += 1e-5
    ok = _nifti(tmp_path / "ok.nii.gz", _label(), tiny)
    read_pair(img, ok, "acdc")


def test_non_integer_labels(tmp_path):
    lab = _label().astype(np.float32)
    lab[4, 4, 0] = 1.5
    path = _nifti(tmp_path / "lab.nii.gz", lab)
    with pytest.raises(LabelError, match=_names(path) + ".*non-integer"):
        read_label(path, "acdc")


def test_unknown_labels(tmp_path):
    lab = _label()
    lab[0, 0, 0] = 7
    path = _nifti(tmp_path / "lab.nii.gz", lab)
    with pytest.raises(LabelError, match=_names(path) + r".*unknown label values \[7\]"):
        read_label(path, "acdc")


def test_nan_inf_voxels(tmp_path):
    arr = np.ones((8, 8, 2), np.float32)
    arr[1, 2, 1] = np.nan
    arr[3, 3, 0] = np.inf
    img = _nifti(tmp_path / "img.nii.gz", arr)
    lab = _nifti(tmp_path / "lab.nii.gz", _label())
    with pytest.raises(InputFileError, match=_names(img) + ".*2 NaN/Inf"):
        read_pair(img, lab, "acdc")
    nan_label = _label().astype(np.float32)
    nan_label[0, 0, 0] = np.nan
    lab2 = _nifti(tmp_path / "lab_nan.nii.gz", nan_label)
    with pytest.raises(LabelError, match=_names(lab2) + ".*NaN"):
        read_label(lab2, "acdc")


def test_empty_label(tmp_path):
    img = _nifti(tmp_path / "img.nii.gz", np.ones((8, 8, 2), np.float32))
    lab = _nifti(tmp_path / "lab.nii.gz", np.zeros((8, 8, 2), np.uint8))
    with pytest.raises(LabelError, match=_names(lab) + ".*empty"):
        read_pair(img, lab, "acdc")


def _manifest_rows(root: Path, n: int = 2) -> pd.DataFrame:
    rows = []
    for i in range(n):
        _nifti(root / f"s{i}" / "img.nii.gz", np.ones((8, 8, 2), np.float32))
        _nifti(root / f"s{i}" / "lab.nii.gz", _label())
        row = dict.fromkeys(COLUMNS, "")
        row.update(subject_id=f"s{i}", image=f"s{i}/img.nii.gz", label=f"s{i}/lab.nii.gz", label_map="acdc")
        rows.append(row)
    return pd.DataFrame(rows)


def test_manifest_row_with_missing_file(tmp_path, caplog):
    root = tmp_path / "data"
    df = _manifest_rows(root)
    (root / "s1" / "lab.nii.gz").unlink()
    path = write_manifest(df, tmp_path / "m.csv", data_root=root)
    with pytest.raises(ManifestError, match=_names(path) + ".*row 2.*" + re.escape("lab.nii.gz") + ".*missing"):
        load_manifest(path)
    with caplog.at_level(logging.WARNING):
        rows, _ = load_manifest(path, lenient=True)
    assert list(rows["subject_id"]) == ["s0"] and "skipped" in caplog.text


def test_duplicate_rows(tmp_path):
    root = tmp_path / "data"
    df = _manifest_rows(root)
    path = write_manifest(pd.concat([df, df.iloc[[0]]], ignore_index=True), tmp_path / "m.csv", data_root=root)
    with pytest.raises(ManifestError, match=_names(path) + ".*duplicate.*s0/img.nii.gz"):
        load_manifest(path)


def test_path_outside_data_root(tmp_path):
    root = tmp_path / "data"
    df = _manifest_rows(root)
    _nifti(tmp_path / "elsewhere.nii.gz", np.ones((8, 8, 2), np.float32))
    df.loc[1, "image"] = "../elsewhere.nii.gz"
    path = write_manifest(df, tmp_path / "m.csv", data_root=root)
    with pytest.raises(ManifestError, match=_names(path) + ".*elsewhere.nii.gz.*outside the data root"):
        load_manifest(path)
    df.loc[1, "image"] = str(tmp_path / "elsewhere.nii.gz")  # absolute paths are refused too
    write_manifest(df, path, data_root=root)
    with pytest.raises(ManifestError, match="relative to the data root"):
        load_manifest(path)


# -------------------------------------------------------------------------------------------------- CLI


def _broken_png_tree(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    lab = np.zeros((8, 8), np.uint8)
    lab[2:6, 2:6] = 2
    lab[3:5, 3:5] = 1
    for case in ("Case_N001_slice000", "Case_N001_slice001", "Case_P002_slice000"):
        Image.fromarray(np.full((8, 8), 90, np.uint8)).save(root / "images" / f"{case}.png")
        Image.fromarray(lab).save(root / "masks" / f"{case}.png")
    (root / "masks" / "Case_P002_slice000.png").write_bytes(b"truncated")  # corrupt mask
    return root


def test_cli_manifest_on_broken_tree_exits_2_one_line_no_output(tmp_path, capsys):
    root = _broken_png_tree(tmp_path / "png")
    out = tmp_path / "out" / "m.csv"
    rc = main(["manifest", "--layout", "png-slices", "--root", str(root), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("medsynth: error:")
    assert "Case_P002_slice000.png" in err[0] and "Traceback" not in err[0]
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())  # no temporary leftovers


def test_cli_manifest_missing_mask_and_bad_layout_root(tmp_path, capsys):
    root = _broken_png_tree(tmp_path / "png")
    (root / "masks" / "Case_P002_slice000.png").unlink()
    out = tmp_path / "m.csv"
    assert main(["manifest", "--layout", "png-slices", "--root", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "medsynth: error:" in err and "Case_P002_slice000.png" in err and "not found" in err
    assert not out.exists()
    assert main(["manifest", "--layout", "acdc", "--root", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "nowhere" in capsys.readouterr().err and not out.exists()


def test_cli_manifest_lenient_skips_with_warning(tmp_path, capsys, caplog):
    root = _broken_png_tree(tmp_path / "png")
    out = tmp_path / "m.csv"
    with caplog.at_level(logging.WARNING):
        rc = main(["manifest", "--layout", "png-slices", "--root", str(root), "--out", str(out), "--lenient"])
    assert rc == 0
    assert "Case_P002_slice000.png" in caplog.text and "skipped" in caplog.text
    df, _ = load_manifest(out)
    assert list(df["subject_id"]) == ["Case_N001", "Case_N001"]


def test_build_manifest_bad_label_values_named(tmp_path):
    root = _broken_png_tree(tmp_path / "png")
    bad = np.zeros((8, 8), np.uint8)
    bad[1, 1] = 9  # not an EMIDEC code
    Image.fromarray(bad).save(root / "masks" / "Case_P002_slice000.png")
    with pytest.raises(LabelError, match=re.escape("Case_P002_slice000.png") + r".*unknown label values \[9\]"):
        build_manifest("png-slices", root)
