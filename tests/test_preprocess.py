"""Preprocessing to 2-D slices: geometry, crop, normalisation, inverse mapping, manifests, cache, real data."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medsynth.config import validate
from medsynth.data import preprocess as pp
from medsynth.data.manifest import COLUMNS, write_manifest
from medsynth.data.preprocess import (
    PreprocessConfig,
    denormalise,
    load_slices,
    preprocess_pair,
    slice_to_volume_space,
    slices_from_manifest,
)
from medsynth.data.slices import META_COLUMNS
from medsynth.data.volume import Volume
from medsynth.errors import ConfigError, InputFileError, LabelError, ManifestError
from medsynth.labels import LV, MYO, RV

# ----------------------------------------------------------------------------------------------- helpers


def heart_volume(
    shape=(120, 100, 6),
    spacing=(1.0, 1.0, 8.0),
    centre=(70.0, 40.0),
    r_lv=10.0,
    r_myo=16.0,
    rv_shift=(24.0, 0.0),
    slices=range(1, 5),
    seed=0,
) -> tuple[Volume, Volume]:
    """Image and canonical label: a ring (MYO) around a disc (LV) and a disc RV at +X, on chosen slices.

    Radii and centres are in source voxels; spacing None gives a PNG-like spacing-less volume."""
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    r = np.hypot(x - centre[0], y - centre[1])
    r_rv = np.hypot(x - centre[0] - rv_shift[0], y - centre[1] - rv_shift[1])
    lab = np.zeros(shape, np.uint8)
    for z in slices:
        s = lab[:, :, z]
        s[r_rv < 8] = RV
        s[r < r_myo] = MYO
        s[r < r_lv] = LV
    rng = np.random.default_rng(seed)
    img = (rng.normal(100.0, 5.0, shape) + 200.0 * (lab == LV) + 50.0 * (lab == RV)).astype(np.float32)
    affine = np.diag([*(spacing or (1.0, 1.0, 1.0)), 1.0])
    sp = tuple(float(s) for s in spacing) if spacing else None
    return Volume(img, affine, sp), Volume(lab, affine.copy(), sp)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


def write_pair(root: Path, name: str, image: Volume, label: Volume) -> tuple[str, str]:
    """Save an image–label pair as NIfTI (ACDC label codes: 1 RV, 2 MYO, 3 LV); return relative paths."""
    to_acdc = np.array([0, 3, 2, 1, 0, 0], np.uint8)
    nib.save(nib.Nifti1Image(image.array, image.affine), root / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(to_acdc[label.array], label.affine), root / f"{name}_gt.nii.gz")
    return f"{name}.nii.gz", f"{name}_gt.nii.gz"


def manifest_row(subject: str, image: str, label: str, label_map: str = "acdc", **extra) -> dict:
    row = {c: "" for c in COLUMNS}
    row.update(subject_id=subject, image=image, label=label, dataset="synthetic", modality="cine")
    row.update(vendor="", phase="ED", pathology="NOR", label_map=label_map, split="train")
    row.update(extra)
    return row


@pytest.fixture()
def synthetic_manifest(tmp_path: Path) -> tuple[Path, Path]:
    """Three subjects as NIfTI pairs with a manifest (data root = tmp_path/data)."""
    root = tmp_path / "data"
    root.mkdir()
    rows = []
    for i in range(3):
        img, lab = heart_volume(centre=(60.0 + 5 * i, 45.0), seed=i)
        rows.append(manifest_row(f"s{i}", *write_pair(root, f"s{i}", img, lab)))
    path = tmp_path / "manifest.csv"
    write_manifest(pd.DataFrame(rows), path, data_root=root)
    return path, root


# ------------------------------------------------------------------------------------------------ config


def test_config_rejects_unknown_and_bad_values():
    with pytest.raises(ConfigError, match="unknown key 'spacing'"):
        validate(PreprocessConfig, {"spacing": 1.5})
    with pytest.raises(ConfigError, match="percentiles"):
        validate(PreprocessConfig, {"percentiles": [99, 1]})
    with pytest.raises(ConfigError, match="spacing_mm"):
        validate(PreprocessConfig, {"spacing_mm": 0})
    cfg = validate(PreprocessConfig, {"spacing_mm": None, "slices": "all"})
    assert cfg.spacing_mm is None and cfg.size == 128


# --------------------------------------------------------------------------------------------- geometry


def test_output_shapes_types_and_labelled_slices():
    img, lab = heart_volume(slices=range(1, 5))
    x, y, recs = preprocess_pair(img, lab, PreprocessConfig(size=64, spacing_mm=1.0))
    assert x.shape == (4, 1, 64, 64) and x.dtype == np.float32
    assert y.shape == (4, 64, 64) and y.dtype == np.uint8
    assert [r["slice_index"] for r in recs] == [1, 2, 3, 4]
    json.dumps(recs)  # JSON-serialisable
    x_all, _, recs_all = preprocess_pair(img, lab, PreprocessConfig(size=64, spacing_mm=1.0, slices="all"))
    assert x_all.shape[0] == 6 and [r["slice_index"] for r in recs_all] == list(range(6))


def test_resampling_changes_grid_by_spacing_ratio():
    """A 1 mm grid resampled to 2 mm halves lengths: the LV disc area drops 4x, zoom is recorded."""
    img, lab = heart_volume(spacing=(1.0, 1.0, 8.0), r_lv=12.0, r_myo=18.0)
    _, y1, _ = preprocess_pair(img, lab, PreprocessConfig(size=96, spacing_mm=1.0))
    _, y2, recs = preprocess_pair(img, lab, PreprocessConfig(size=96, spacing_mm=2.0))
    a1, a2 = (y1[0] == LV).sum(), (y2[0] == LV).sum()
    assert a1 == pytest.approx(np.pi * 12.0**2, rel=0.05)
    assert a2 == pytest.approx(a1 / 4.0, rel=0.08)
    assert recs[0]["zoom"] == pytest.approx([0.5, 0.5])
    assert recs[0]["target_spacing"] == [2.0, 2.0] and recs[0]["source_spacing"] == [1.0, 1.0, 8.0]


def test_anisotropic_pixels_become_isotropic():
    """A disc of radius 12 mm drawn on a 1.0 x 2.0 mm grid is an ellipse in voxels, a circle after resampling."""
    shape = (100, 60, 3)
    x, y = np.meshgrid(np.arange(shape[0]) * 1.0, np.arange(shape[1]) * 2.0, indexing="ij")
    lab = np.zeros(shape, np.uint8)
    lab[..., 1][np.hypot(x - 50, y - 60) < 12] = LV
    vol = Volume(np.ones(shape, np.float32), np.diag([1.0, 2.0, 5.0, 1.0]), (1.0, 2.0, 5.0))
    _, out, _ = preprocess_pair(vol, Volume(lab, vol.affine, vol.spacing), PreprocessConfig(size=64, spacing_mm=1.0))
    rows, cols = np.nonzero(out[0] == LV)
    extent_h, extent_w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert abs(extent_h - extent_w) <= 2
    assert extent_h == pytest.approx(24, abs=2)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 8.0), (1.3, 1.3, 8.0), None])
def test_crop_is_centred_on_heart_centroid(spacing):
    img, lab = heart_volume(shape=(150, 130, 5), spacing=spacing, centre=(95.0, 40.0), slices=range(5))
    size = 64
    _, y, _ = preprocess_pair(img, lab, PreprocessConfig(size=size, spacing_mm=1.5))
    c = centroid(np.isin(y, (LV, MYO, RV)).any(axis=0))
    scale = 1.0 if spacing is None else 1.5 / spacing[0]
    # the window origin is rounded to whole source pixels: at most half a source pixel off, in output pixels
    assert np.all(np.abs(c - (size - 1) / 2) <= 0.5 / scale + 0.6)


def test_padding_outside_field_of_view():
    img, lab = heart_volume(shape=(60, 60, 3), spacing=(1.0, 1.0, 8.0), centre=(20.0, 30.0), slices=[1])
    x, y, recs = preprocess_pair(img, lab, PreprocessConfig(size=96, spacing_mm=1.0))
    pad = recs[0]["padding"]
    assert sum(pad.values()) > 0
    # rows above h_before (and the other margins) lie outside the source: image 0 (p_low level), label bg
    hb, ha, wb, wa = pad["h_before"], pad["h_after"], pad["w_before"], pad["w_after"]
    margin = np.ones((96, 96), bool)
    margin[hb : 96 - ha, wb : 96 - wa] = False
    assert margin.any()
    assert np.all(x[0, 0][margin] == 0) and np.all(y[0][margin] == 0)
    assert (y[0] == LV).sum() == (lab.array[:, :, 1] == LV).sum()  # nothing of the heart is lost


def test_world_orientation_radiological_and_png_as_stored():
    # RV at +X (patient right): in a radiological view it appears left of the LV (smaller column index)
    img, lab = heart_volume(spacing=(1.0, 1.0, 8.0), rv_shift=(24.0, 0.0))
    _, y, recs = preprocess_pair(img, lab, PreprocessConfig(size=96, spacing_mm=1.0))
    assert centroid(y[0] == RV)[1] < centroid(y[0] == LV)[1]
    assert recs[0]["in_plane"] == "H=-Y,W=-X"
    # spacing-less (PNG, X = column, Y = row): the output is a window of array.T, exactly as stored
    img, lab = heart_volume(shape=(90, 80, 1), spacing=None, centre=(45.0, 35.0), slices=[0])
    x, y, recs = preprocess_pair(img, lab, PreprocessConfig(size=48))
    r0, c0 = int(recs[0]["offset"][1]), int(recs[0]["offset"][0])
    stored = lab.array[:, :, 0].T
    assert np.array_equal(y[0], stored[r0 : r0 + 48, c0 : c0 + 48])
    assert recs[0]["in_plane"] == "H=+Y,W=+X" and recs[0]["zoom"] == [1.0, 1.0]


def test_spacing_none_keeps_pixels_for_volumes_with_spacing():
    img, lab = heart_volume(spacing=(1.7, 1.7, 8.0), r_lv=10.0)
    _, y, recs = preprocess_pair(img, lab, PreprocessConfig(size=64, spacing_mm=None))
    assert recs[0]["zoom"] == [1.0, 1.0] and recs[0]["target_spacing"] is None
    assert (y[0] == LV).sum() == (lab.array[:, :, 1] == LV).sum()


# ---------------------------------------------------------------------------------------- normalisation


def test_normalisation_maps_percentiles_to_0_and_1_and_clips_below_only():
    rng = np.random.default_rng(3)
    shape = (64, 64, 2)
    arr = rng.uniform(0.0, 1000.0, shape).astype(np.float32)
    arr[0, :4, 0] = -5000.0  # far below p1 → clipped at lower_clip
    lab = np.zeros(shape, np.uint8)
    lab[22:42, 22:42, :] = LV  # centroid 31.5 = window centre (64 - 1) / 2: offset 0
    img = Volume(arr, np.eye(4), None)
    cfg = PreprocessConfig(size=64, lower_clip=-0.5)
    x, _, recs = preprocess_pair(img, Volume(lab, np.eye(4), None), cfg)
    p1, p99 = np.percentile(arr, [1, 99])
    assert recs[0]["p_low"] == pytest.approx(p1) and recs[0]["p_high"] == pytest.approx(p99)
    # spacing-less + centred heart: output pixels are the source pixels, so values are exactly the scaling
    expected = np.maximum((arr[:, :, 0].T - p1) / (p99 - p1), -0.5)
    assert np.allclose(x[0, 0], expected, atol=1e-5)
    assert x.min() == pytest.approx(-0.5)  # clipped below
    assert x.max() > 1.0  # not clipped above
    assert np.mean(x[:, 0] <= 0) == pytest.approx(0.01, abs=0.005)
    assert np.mean(x[:, 0] >= 1) == pytest.approx(0.01, abs=0.005)
    assert np.allclose(denormalise(x[0, 0], recs[0])[x[0, 0] > -0.5], arr[:, :, 0].T[x[0, 0] > -0.5], atol=0.05)


def test_constant_image_does_not_divide_by_zero(caplog):
    img, lab = heart_volume()
    img.array[:] = 7.0
    with caplog.at_level(logging.WARNING):
        x, _, _ = preprocess_pair(img, lab, PreprocessConfig(size=32))
    assert np.isfinite(x).all() and "constant" in caplog.text


# -------------------------------------------------------------------------------------- inverse mapping


@pytest.mark.parametrize(("spacing", "target"), [((1.37, 1.37, 10.0), 1.5), ((1.8, 1.8, 8.0), 1.5), (None, 1.5)])
def test_inverse_mapping_round_trip_on_labels(spacing, target):
    img, lab = heart_volume(shape=(140, 120, 5), spacing=spacing, centre=(75.0, 50.0), slices=range(1, 4))
    x, y, recs = preprocess_pair(img, lab, PreprocessConfig(size=80, spacing_mm=target))
    for k, rec in enumerate(recs):
        z = rec["slice_index"]
        back = slice_to_volume_space(y[k], json.dumps(rec), order=0)
        assert back.shape == lab.shape[:2] and back.dtype == np.uint8
        src = lab.array[:, :, z]
        for code in (LV, MYO, RV):
            assert dice(back == code, src == code) > 0.93
        if spacing is None:  # keep pixels: exact inverse, image too
            assert np.array_equal(back, src)
            img_back = slice_to_volume_space(x[k, 0], rec, order=1)
            inside = np.zeros(src.shape, bool)
            ox, oy = (int(v) for v in rec["offset"])
            inside[max(ox, 0) : ox + 80, max(oy, 0) : oy + 80] = True
            assert np.allclose(denormalise(img_back, rec)[inside], img.array[:, :, z][inside], atol=1e-3)


def test_inverse_mapping_zero_outside_crop():
    img, lab = heart_volume(shape=(200, 200, 3), spacing=(1.0, 1.0, 8.0), centre=(100.0, 100.0), slices=[1])
    _, y, recs = preprocess_pair(img, lab, PreprocessConfig(size=32, spacing_mm=1.0))
    back = slice_to_volume_space(np.ones_like(y[0]), recs[0], order=0)
    assert back.sum() == 32 * 32  # only the crop window maps back
    with pytest.raises(ValueError, match="slice_2d"):
        slice_to_volume_space(np.ones((2, 32, 32)), recs[0])


def test_no_lv_slices_is_a_label_error():
    img, lab = heart_volume()
    lab.array[lab.array != RV] = 0
    with pytest.raises(LabelError, match="no slice contains"):
        preprocess_pair(img, lab, PreprocessConfig(size=32))


# ----------------------------------------------------------------------------------- manifests / cache


def test_slices_from_manifest_meta_and_records(synthetic_manifest):
    path, root = synthetic_manifest
    slices = load_slices(path, cfg=PreprocessConfig(size=48, spacing_mm=1.5))
    assert len(slices) == 12 and slices.images.shape == (12, 1, 48, 48)
    assert list(slices.meta.columns) == list(META_COLUMNS)
    assert set(slices.meta["case"]) == {"s0.nii.gz", "s1.nii.gz", "s2.nii.gz"}
    assert set(slices.meta["split"]) == {"train"}
    rec = json.loads(slices.meta["record"][0])
    assert rec["case"] == "s0.nii.gz" and rec["source_shape"] == [120, 100, 6]
    # ACDC codes were harmonised to canonical ones
    assert set(np.unique(slices.labels)) == {0, LV, MYO, RV}


def test_frame_column_selects_time_point(tmp_path):
    img, lab = heart_volume(shape=(80, 80, 4), centre=(40.0, 40.0), slices=range(4))
    img4 = np.stack([img.array, img.array * 2.0 + 1000.0], axis=-1)
    lab4 = np.stack([lab.array, lab.array], axis=-1)
    to_acdc = np.array([0, 3, 2, 1, 0, 0], np.uint8)
    nib.save(nib.Nifti1Image(img4, img.affine), tmp_path / "c.nii.gz")
    nib.save(nib.Nifti1Image(to_acdc[lab4], img.affine), tmp_path / "c_gt.nii.gz")
    rows = [manifest_row("c", "c.nii.gz", "c_gt.nii.gz", frame=str(f), phase=p) for f, p in ((0, "ED"), (1, "ES"))]
    df = pd.DataFrame(rows)
    s = slices_from_manifest(df, tmp_path, PreprocessConfig(size=32, spacing_mm=1.0))
    p_high = [json.loads(r)["p_high"] for r in s.meta["record"]]
    assert len(s) == 8 and p_high[0] < 1000 < p_high[-1]


def test_bad_rows_strict_raises_lenient_skips(synthetic_manifest, caplog):
    path, root = synthetic_manifest
    (root / "s1.nii.gz").write_bytes(b"\x1f\x8b not really a nifti")  # corrupt image
    df = pd.read_csv(path, skiprows=1, dtype=str, keep_default_na=False)
    with pytest.raises(InputFileError, match="s1.nii.gz"):
        slices_from_manifest(df, root, PreprocessConfig(size=32))
    with caplog.at_level(logging.WARNING):
        s = slices_from_manifest(df, root, PreprocessConfig(size=32), lenient=True)
    assert set(s.meta["subject_id"]) == {"s0", "s2"} and "row 2 skipped" in caplog.text
    df_map = df.copy()
    df_map.loc[0, "label_map"] = "nonsense"
    with pytest.raises(ManifestError, match="row 1: unknown label_map 'nonsense'"):
        slices_from_manifest(df_map, root, PreprocessConfig(size=32))
    df_bad = df.iloc[[1]]
    empty = slices_from_manifest(df_bad, root, PreprocessConfig(size=32), lenient=True)
    assert len(empty) == 0 and empty.images.shape == (0, 1, 32, 32)


def test_load_slices_cache_hit_and_key(synthetic_manifest, tmp_path, monkeypatch):
    path, _ = synthetic_manifest
    cache = tmp_path / "cache"
    cfg = PreprocessConfig(size=32)
    first = load_slices(path, cfg=cfg, cache_dir=cache)
    files = list(cache.glob("slices-*.npz"))
    assert len(files) == 1

    def boom(*args, **kwargs):
        raise AssertionError("cache miss: volumes were read again")

    monkeypatch.setattr(pp, "slices_from_manifest", boom)
    second = load_slices(path, cfg=cfg, cache_dir=cache)
    assert np.array_equal(first.images, second.images) and np.array_equal(first.labels, second.labels)
    assert first.meta.equals(second.meta)
    with pytest.raises(AssertionError, match="cache miss"):  # another config is another key
        load_slices(path, cfg=PreprocessConfig(size=48), cache_dir=cache)


def test_phantom_dataset_preprocesses(tmp_path):
    phantom = pytest.importorskip("medsynth.phantom")
    if not hasattr(phantom, "generate_dataset"):
        pytest.skip("medsynth.phantom.generate_dataset not available yet")
    manifest = phantom.generate_dataset(tmp_path / "ph", subjects=2, contrast="cine", scanner="A", seed=0)
    s = load_slices(manifest)
    assert len(s) > 0 and s.images.shape[1:] == (1, 128, 128)
    for _case, group in s.meta.groupby("case"):
        lab = s.labels[group.index]
        assert (lab == LV).any() and (lab == MYO).any()
    assert np.isfinite(s.images).all()


# -------------------------------------------------------------------------------------------- real data


def acdc_manifest(acdc_root: Path, out: Path) -> Path:
    rows = []
    for pdir in sorted(acdc_root.glob("patient*")):
        info = dict(
            line.split(":", 1) for line in (pdir / "Info.cfg").read_text(encoding="utf-8").splitlines() if ":" in line
        )
        for key in ("ED", "ES"):
            img = f"{pdir.name}/{pdir.name}_frame{int(info[key]):02d}.nii.gz"
            row = manifest_row(pdir.name, img, img.replace(".nii.gz", "_gt.nii.gz"), "acdc")
            row.update(dataset="acdc", phase=key, pathology=info["Group"].strip(), split="")
            rows.append(row)
    return write_manifest(pd.DataFrame(rows), out, data_root=acdc_root)


def emidec_manifest(png_root: Path, out: Path) -> Path:
    rows = []
    for f in sorted((png_root / "images").glob("*.png")):
        m = re.match(r"(Case_([NP])\d+)_slice(\d+)", f.stem)
        row = manifest_row(m[1], f"images/{f.name}", f"masks/{f.name}", "emidec", slice_index=str(int(m[3])))
        row.update(dataset="emidec", modality="lge", phase="none", split="")
        row.update(pathology="normal" if m[2] == "N" else "infarct")
        rows.append(row)
    return write_manifest(pd.DataFrame(rows), out, data_root=png_root)


@pytest.mark.realdata
def test_acdc_all_volumes_preprocess(acdc_root, tmp_path):
    slices = load_slices(acdc_manifest(acdc_root, tmp_path / "acdc.csv"))
    assert slices.images.shape[1:] == (1, 128, 128) and np.isfinite(slices.images).all()
    cases = slices.meta.groupby("case").indices
    assert len(cases) == 60 and slices.meta["subject_id"].nunique() == 30
    for case, idx in cases.items():
        lab = slices.labels[idx]
        assert (lab == LV).any() and (lab == MYO).any(), case
        assert len(idx) >= 5, case
    # the crop keeps the heart: the 1.5 mm grid is coarser than ACDC's, so the window covers 192 mm
    rec = json.loads(slices.meta["record"][0])
    assert rec["target_spacing"] == [1.5, 1.5] and 1.3 < rec["source_spacing"][0] < 1.9
    # labels map back onto the source grid
    from medsynth.data.readers import read_label

    first = slices.meta["case"][0]
    src = read_label(acdc_root / first.replace(".nii.gz", "_gt.nii.gz"), "acdc").array
    for k in cases[first][:3]:
        r = json.loads(slices.meta["record"][k])
        back = slice_to_volume_space(slices.labels[k], r, order=0)
        for code in (LV, MYO):
            assert dice(back == code, src[:, :, r["slice_index"]] == code) > 0.9


@pytest.mark.realdata
def test_emidec_png_crop_keeps_pixels_around_heart(emidec_png_root, tmp_path):
    from PIL import Image

    slices = load_slices(emidec_manifest(emidec_png_root, tmp_path / "emidec.csv"))
    assert len(slices) == 346 and slices.images.shape[1:] == (1, 128, 128)
    for k in range(0, len(slices), 23):
        rec = json.loads(slices.meta["record"][k])
        assert rec["source_shape"] == [256, 256, 1] and rec["zoom"] == [1.0, 1.0]
        mask = np.array(Image.open(emidec_png_root / rec["case"].replace("images/", "masks/")))
        ox, oy = (int(v) for v in rec["offset"])
        assert 0 <= oy <= 128 and 0 <= ox <= 128
        crop = mask[oy : oy + 128, ox : ox + 128]
        lut = np.array([0, LV, MYO, 4, 5], np.uint8)  # EMIDEC → canonical
        assert np.array_equal(slices.labels[k], lut[crop])  # pixels kept, nothing of the heart lost
        assert (crop > 0).sum() == (mask > 0).sum()
    # the slices of one subject's stack form one case, normalised with one intensity scale
    assert slices.meta["case"].nunique() == 50
    for _, group in slices.meta.groupby("case"):
        ranges = {(json.loads(r)["p_low"], json.loads(r)["p_high"]) for r in group["record"]}
        assert len(ranges) == 1
        assert sorted(group["slice_index"].astype(int)) == list(range(len(group)))
