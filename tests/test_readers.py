"""Readers: geometry kept (RAS+ canonical order, affine, spacing), frames, PNG, SimpleITK, real ACDC / EMIDEC."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medsynth.data.readers import read_header, read_label, read_pair, read_volume
from medsynth.errors import InputFileError, LabelError
from medsynth.labels import LV, MYO, RV, SCAR


def _save_nifti(path: Path, arr: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def _las_affine(spacing=(1.5, 2.0, 8.0)) -> np.ndarray:
    """A non-canonical (L, A, S) affine with anisotropic spacing and an offset origin."""
    aff = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])
    aff[:3, 3] = [50.0, -20.0, 7.0]
    return aff


def test_nifti_reoriented_to_ras_keeps_world_geometry(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(5, 6, 4)).astype(np.float64)
    aff = _las_affine()
    path = _save_nifti(tmp_path / "img.nii.gz", arr, aff)
    vol = read_volume(path)
    assert vol.array.dtype == np.float32
    assert vol.shape == (5, 6, 4)
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    assert vol.spacing == pytest.approx((1.5, 2.0, 8.0))
    # The same voxel must sit at the same world position before and after reorientation.
    i, j, k = 1, 2, 3
    world = aff @ [i, j, k, 1]
    ci, cj, ck = (np.linalg.inv(vol.affine) @ world)[:3].round().astype(int)
    assert vol.array[ci, cj, ck] == pytest.approx(arr[i, j, k], rel=1e-6)
    assert read_header(path) == (vol.shape, pytest.approx(vol.spacing))


def test_oblique_axis_swapped_nifti_header_matches_data(tmp_path):
    # Voxel axes permuted relative to world (first voxel axis runs along S): the canonical shape is permuted.
    aff = np.array([[0, 0, 2.0, 0], [0, 1.5, 0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1]])
    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    path = _save_nifti(tmp_path / "perm.nii", arr, aff)
    vol = read_volume(path)
    assert vol.shape == (6, 5, 4)
    assert vol.spacing == pytest.approx((2.0, 1.5, 3.0))
    assert read_header(path) == (vol.shape, pytest.approx(vol.spacing))


def test_affine_rescaled_to_pixdim_when_sform_is_unit_scaled(tmp_path):
    # ACDC ships sform = diag(-1, -1, 1) with pixdim 1.56 x 1.56 x 10 mm.
    img = nib.Nifti1Image(np.zeros((4, 4, 3), np.int16), np.diag([-1.0, -1.0, 1.0, 1.0]))
    img.header.set_zooms((1.5625, 1.5625, 10.0))
    img.set_sform(np.diag([-1.0, -1.0, 1.0, 1.0]), code=2)
    img.set_qform(None, code=0)
    path = tmp_path / "unit.nii.gz"
    nib.save(img, str(path))
    vol = read_volume(path)
    assert vol.spacing == pytest.approx((1.5625, 1.5625, 10.0))
    assert np.abs(np.linalg.det(vol.affine[:3, :3])) == pytest.approx(1.5625**2 * 10)


def test_4d_needs_frame_and_reads_the_right_one(tmp_path):
    arr = np.stack([np.full((3, 4, 2), t, np.float32) for t in range(5)], axis=-1)
    path = _save_nifti(tmp_path / "cine_sa.nii.gz", arr, np.diag([1.2, 1.2, 9.0, 1.0]))
    with pytest.raises(InputFileError, match=re.escape(str(path)) + ".*frame"):
        read_volume(path)
    vol = read_volume(path, frame=3)
    assert vol.shape == (3, 4, 2)
    assert np.all(vol.array == 3)
    with pytest.raises(InputFileError, match="out of range"):
        read_volume(path, frame=5)
    assert read_header(path, frame=0)[0] == (3, 4, 2)


def test_label_harmonised_and_pair_validated(tmp_path):
    aff = _las_affine()
    img = np.ones((6, 6, 2), np.float32)
    lab = np.zeros((6, 6, 2), np.uint8)
    lab[1:3, 1:3, :] = 3  # ACDC LV
    lab[3:5, 3:5, :] = 1  # ACDC RV
    lab[0, :, :] = 2  # ACDC MYO
    ip = _save_nifti(tmp_path / "im.nii.gz", img, aff)
    lp = _save_nifti(tmp_path / "gt.nii.gz", lab, aff)
    image, label = read_pair(ip, lp, "acdc")
    assert label.array.dtype == np.uint8
    # Reorientation flips X (L -> R), so compare label counts, then positions through world coordinates.
    assert (label.array == LV).sum() == 8 and (label.array == RV).sum() == 8 and (label.array == MYO).sum() == 12
    np.testing.assert_allclose(image.affine, label.affine)
    world = aff @ [1, 1, 0, 1]
    ci, cj, ck = (np.linalg.inv(label.affine) @ world)[:3].round().astype(int)
    assert label.array[ci, cj, ck] == LV
    with pytest.raises(LabelError, match=re.escape(str(lp))):
        read_label(lp, "myops")  # ACDC codes 1-3 are unknown to MyoPS


def test_png_8bit_16bit_and_layout(tmp_path):
    a8 = np.arange(12, dtype=np.uint8).reshape(3, 4)  # 3 rows, 4 columns
    Image.fromarray(a8).save(tmp_path / "a8.png")
    v = read_volume(tmp_path / "a8.png")
    assert v.shape == (4, 3, 1) and v.spacing is None and v.array.dtype == np.float32
    assert v.array[2, 1, 0] == a8[1, 2]  # X = column, Y = row
    np.testing.assert_array_equal(v.affine, np.eye(4))
    assert read_header(tmp_path / "a8.png") == ((4, 3, 1), None)
    a16 = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000).astype(np.uint16)
    Image.fromarray(a16).save(tmp_path / "a16.png")
    v16 = read_volume(tmp_path / "a16.png")
    assert v16.array.max() == a16.max() and v16.array[3, 2, 0] == a16[2, 3]


def test_png_gray_stored_as_rgb_accepted_colour_refused(tmp_path):
    gray = np.arange(16, dtype=np.uint8).reshape(4, 4)
    Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / "g.png")
    assert np.array_equal(read_volume(tmp_path / "g.png").array[..., 0], gray.T)
    colour = np.stack([gray, gray, 255 - gray], -1)
    Image.fromarray(colour).save(tmp_path / "c.png")
    with pytest.raises(InputFileError, match=re.escape(str(tmp_path / "c.png")) + ".*colour"):
        read_volume(tmp_path / "c.png")


def test_png_label_pair(tmp_path):
    img = np.full((8, 8), 100, np.uint8)
    msk = np.zeros((8, 8), np.uint8)
    msk[2:4, 2:4] = 3  # EMIDEC infarct
    msk[5, 5] = 1
    Image.fromarray(img).save(tmp_path / "i.png")
    Image.fromarray(msk).save(tmp_path / "m.png")
    image, label = read_pair(tmp_path / "i.png", tmp_path / "m.png", "emidec")
    assert (label.array == SCAR).sum() == 4 and image.shape == label.shape == (8, 8, 1)


def test_sitk_formats_agree_with_nifti(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 100, size=(4, 5, 6)).astype(np.int16)  # SimpleITK order (Z, Y, X)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((0.9, 1.1, 7.0))
    image.SetOrigin((10.0, -5.0, 3.0))
    theta = 0.3
    direction = [np.cos(theta), -np.sin(theta), 0, np.sin(theta), np.cos(theta), 0, 0, 0, 1]
    image.SetDirection(direction)
    sitk.WriteImage(image, str(tmp_path / "x.mha"))
    sitk.WriteImage(image, str(tmp_path / "x.nii.gz"))  # SimpleITK converts LPS -> RAS for NIfTI itself
    a = read_volume(tmp_path / "x.mha")
    b = read_volume(tmp_path / "x.nii.gz")
    assert a.shape == b.shape
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
    np.testing.assert_array_equal(a.array, b.array)
    assert a.spacing == pytest.approx(b.spacing, rel=1e-5)


def test_dicom_series_directory(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    rng = np.random.default_rng(2)
    vol = rng.integers(0, 1000, size=(3, 6, 5)).astype(np.int16)  # (Z, Y, X)
    series = tmp_path / "series"
    series.mkdir()
    spacing, origin = (0.8, 0.8, 6.0), np.array([-40.0, 20.0, 5.0])
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(vol.shape[0]):
        sl = sitk.GetImageFromArray(vol[z])
        pos = origin + np.array([0, 0, spacing[2] * z])
        for tag, value in [
            ("0008|0060", "MR"),
            ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
            ("0020|000e", "1.2.826.0.1.3680043.2.1125.1.1"),
            ("0020|0013", str(z + 1)),
            ("0020|0032", "\\".join(f"{p:.3f}" for p in pos)),
            ("0020|0037", "1\\0\\0\\0\\1\\0"),
            ("0028|0030", f"{spacing[1]}\\{spacing[0]}"),
            ("0018|0050", str(spacing[2])),
            ("0008|0018", f"1.2.826.0.1.3680043.2.1125.1.1.{z + 1}"),
        ]:
            sl.SetMetaData(tag, value)
        sl.SetSpacing(spacing[:2])
        writer.SetFileName(str(series / f"{z:03d}.dcm"))
        writer.Execute(sl)
    v = read_volume(series)
    assert v.shape == (5, 6, 3)
    assert v.spacing == pytest.approx(spacing, rel=1e-3)
    assert nib.aff2axcodes(v.affine) == ("R", "A", "S")
    # DICOM voxel (x=1, y=2, z=1) sits at LPS origin + (0.8, 1.6, 6.0); in RAS the first two flip sign.
    lps = origin + [0.8 * 1, 0.8 * 2, 6.0 * 1]
    ras = np.array([-lps[0], -lps[1], lps[2], 1.0])
    ci, cj, ck = (np.linalg.inv(v.affine) @ ras)[:3].round().astype(int)
    assert v.array[ci, cj, ck] == vol[1, 2, 1]


def test_unsupported_and_missing(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(InputFileError, match="unsupported"):
        read_volume(tmp_path / "x.txt")
    with pytest.raises(InputFileError, match="not found"):
        read_volume(tmp_path / "nope.nii.gz")


# ---------------------------------------------------------------------------------------------- real data


def _acdc_frames(patient: Path) -> dict[str, int]:
    cfg = dict(
        line.split(":", 1) for line in (patient / "Info.cfg").read_text(encoding="utf-8").splitlines() if ":" in line
    )
    return {"ED": int(cfg["ED"]), "ES": int(cfg["ES"])}


@pytest.mark.realdata
def test_acdc_all_patients_load_and_harmonise(acdc_root):
    patients = sorted(p for p in acdc_root.iterdir() if p.is_dir() and p.name.startswith("patient"))
    assert len(patients) == 30
    for patient in patients:
        lv_ml = {}
        for phase, frame in _acdc_frames(patient).items():
            stem = patient / f"{patient.name}_frame{frame:02d}"
            image, label = read_pair(f"{stem}.nii.gz", f"{stem}_gt.nii.gz", "acdc")
            assert image.spacing is not None and nib.aff2axcodes(image.affine) == ("R", "A", "S")
            assert 1.0 < image.spacing[0] < 2.5 and 4.0 <= image.spacing[2] <= 10.0
            assert (label.array == RV).any(), f"{stem}: no RV"
            assert (label.array == MYO).any(), f"{stem}: no MYO"
            lv_ml[phase] = float((label.array == LV).sum() * np.prod(label.spacing) / 1000.0)
        assert lv_ml["ED"] > lv_ml["ES"] > 0, f"{patient.name}: LV ED {lv_ml['ED']:.1f} mL <= ES {lv_ml['ES']:.1f} mL"


@pytest.mark.realdata
def test_emidec_png_scar_in_infarct_cases_only(emidec_png_root):
    images = sorted((emidec_png_root / "images").glob("Case_*.png"))
    assert len(images) == 346
    scar_per_case: dict[str, int] = {}
    for path in images:
        case = path.name.split("_slice")[0]
        image, label = read_pair(path, emidec_png_root / "masks" / path.name, "emidec")
        assert image.shape == (256, 256, 1) and image.spacing is None
        scar_per_case[case] = scar_per_case.get(case, 0) + int((label.array == SCAR).sum())
    infarct = {c: n for c, n in scar_per_case.items() if c.startswith("Case_P")}
    normal = {c: n for c, n in scar_per_case.items() if c.startswith("Case_N")}
    assert len(infarct) == 33 and len(normal) == 17
    assert all(n > 0 for n in infarct.values()), [c for c, n in infarct.items() if n == 0]
    assert all(n == 0 for n in normal.values()), [c for c, n in normal.items() if n > 0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reorientation_matches_nibabel_closest_canonical(tmp_path, seed):
    rng = np.random.default_rng(seed)
    # Random oblique rotation, axis permutation and flips, anisotropic spacing.
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    perm = np.eye(3)[rng.permutation(3)] * rng.choice([-1, 1], size=3)
    aff = np.eye(4)
    aff[:3, :3] = (perm @ q * 0.2 + perm) @ np.diag([1.1, 1.7, 6.0])
    aff[:3, 3] = rng.normal(size=3) * 30
    arr = rng.normal(size=(5, 6, 7)).astype(np.float32)
    img = nib.Nifti1Image(arr, aff)
    nib.save(img, str(tmp_path / "o.nii.gz"))
    ref = nib.as_closest_canonical(nib.load(str(tmp_path / "o.nii.gz")))
    vol = read_volume(tmp_path / "o.nii.gz")
    np.testing.assert_array_equal(vol.array, ref.get_fdata(dtype=np.float32))
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-5)
    assert read_header(tmp_path / "o.nii.gz") == (vol.shape, pytest.approx(vol.spacing))


def test_int64_labels_from_any_format(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    lab = np.zeros((2, 4, 5), np.int64)
    lab[1, 1:3, 1:4] = 3
    image = sitk.GetImageFromArray(lab)
    image.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))  # non-canonical: forces a reorientation
    sitk.WriteImage(image, str(tmp_path / "l.mha"))
    out = read_label(tmp_path / "l.mha", "acdc")
    assert out.array.dtype == np.uint8 and (out.array == LV).sum() == 6
    nib.save(nib.Nifti1Image(lab.T.copy(), np.diag([-1.0, 1, 1, 1]), dtype=np.int64), str(tmp_path / "l.nii.gz"))
    assert (read_label(tmp_path / "l.nii.gz", "acdc").array == LV).sum() == 6
