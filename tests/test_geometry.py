"""True geometry of every NIfTI file medsynth writes (``medsynth.data.writer``): spacing, orientation, position."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medsynth.data.export import write_nnunet_dataset
from medsynth.data.manifest import load_manifest
from medsynth.data.preprocess import PreprocessConfig, load_slices, preprocess_pair
from medsynth.data.readers import read_pair
from medsynth.data.slices import META_COLUMNS, SliceSet
from medsynth.data.volume import Volume
from medsynth.data.writer import (
    canonical_shape_spacing,
    slice_affine,
    stack_groups,
    stack_to_nifti,
    write_pairs,
)
from medsynth.labels import LV, MYO, RV
from medsynth.workflows.outputs import real_cases, synthetic_cases, write_run_outputs

SIZE = 32
SPACING = (1.4, 1.25, 7.0)  # source voxel size (mm), anisotropic in-plane on purpose


def _rotation(deg_z: float, deg_x: float) -> np.ndarray:
    a, b = np.radians(deg_z), np.radians(deg_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def _oblique_volume(n_slices: int = 5, seed: int = 0) -> tuple[Volume, Volume]:
    """An oblique (rotated, shifted) RAS+ image-label pair (X, Y, Z) with a heart off the grid centre."""
    rng = np.random.default_rng(seed)
    shape = (50, 44, n_slices)
    affine = np.eye(4)
    affine[:3, :3] = _rotation(25.0, 15.0) * np.array(SPACING)
    affine[:3, 3] = [-31.0, 12.5, 40.0]
    image = rng.random(shape, dtype=np.float32) * 100
    label = np.zeros(shape, np.uint8)
    x, y = np.mgrid[: shape[0], : shape[1]]
    r = np.hypot(x - 30, y - 18)
    for z in range(n_slices):
        label[..., z][r < 7] = MYO
        label[..., z][r < 4] = LV
        label[..., z][(x > 14) & (x < 22) & (y > 20) & (y < 30)] = RV
    return Volume(image, affine, SPACING, Path("oblique.nii.gz")), Volume(label, affine, SPACING, Path("lab.nii.gz"))


def _records(spacing_mm: float | None, n_slices: int = 5) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    image, label = _oblique_volume(n_slices)
    return preprocess_pair(image, label, PreprocessConfig(size=SIZE, spacing_mm=spacing_mm, slices="all"))


def _asymmetric_pair(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An (H, W) image in [0, 1] that changes under any flip or transpose, and a label whose heart centroid is
    the window centre (so re-preprocessing crops the same window) but whose shape is not symmetric."""
    h, w = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    image = (2 * h * SIZE + w) / (2 * SIZE * SIZE + SIZE)
    image[3, 5] = 1.0
    image[0, 0] = 0.0
    label = np.zeros((SIZE, SIZE), np.uint8)
    label[12:20, 12:20] = MYO
    label[14:18, 14:18] = LV
    c = (SIZE - 1) / 2
    for dy, dx in [(-5.5, -7.5), (-4.5, 7.5), (4.5, -6.5), (5.5, 6.5)]:  # offsets sum to 0: centroid stays
        label[int(c + dy), int(c + dx)] = RV
    return image, label


def _read_back(image_path: Path, label_path: Path, spacing_mm: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Read a written pair through the project's readers and preprocessing (percentiles 0/100: [0, 1] stays)."""
    image, label = read_pair(image_path, label_path, "canonical")
    cfg = PreprocessConfig(size=SIZE, spacing_mm=spacing_mm, slices="all", percentiles=(0.0, 100.0))
    x, y, _ = preprocess_pair(image, label, cfg)
    return x[:, 0], y


# --------------------------------------------------------------------------------------------- the affine


@pytest.mark.parametrize("spacing_mm", [None, 1.5])
def test_affine_maps_crop_pixels_to_their_source_world_points(spacing_mm, tmp_path: Path) -> None:
    image, label = _oblique_volume()
    _, labels, records = preprocess_pair(image, label, PreprocessConfig(size=SIZE, spacing_mm=spacing_mm, slices="all"))
    nib.save(stack_to_nifti(labels, records, np.uint8), tmp_path / "stack.nii.gz")
    written = nib.load(tmp_path / "stack.nii.gz")
    data = np.asarray(written.dataobj)
    assert data.shape == (SIZE, SIZE, len(records))
    src = np.asarray(records[0]["source_affine"])
    hh, ww = np.mgrid[:SIZE, :SIZE]
    for k, rec in enumerate(records):
        world = written.affine @ np.stack([hh.ravel(), ww.ravel(), np.full(hh.size, k), np.ones(hh.size)])
        # the record's own map: the source voxel each crop pixel was resampled from
        xy = np.asarray(rec["matrix"]) @ np.stack([hh.ravel(), ww.ravel()]) + np.asarray(rec["offset"])[:, None]
        voxel = np.stack([xy[0], xy[1], np.full(hh.size, rec["slice_index"]), np.ones(hh.size)])
        np.testing.assert_allclose(world, src @ voxel, atol=1e-4)
        single = slice_affine(json.dumps(rec))[0] @ np.stack([hh.ravel(), ww.ravel(), 0 * hh.ravel(), np.ones(hh.size)])
        np.testing.assert_allclose(single, src @ voxel, atol=1e-4)
        if spacing_mm is None:  # pixels kept: every in-view crop pixel holds its source voxel's label
            ijk = np.rint(np.linalg.solve(image.affine, world)[:3]).astype(int)
            inside = np.all((ijk >= 0) & (ijk < np.array(label.shape)[:, None]), axis=0)
            got = data[..., k].ravel()[inside]
            assert np.array_equal(got, label.array[ijk[0, inside], ijk[1, inside], ijk[2, inside]])
            assert inside.mean() > 0.5


def test_spacing_direction_origin_read_back_by_nibabel_and_simpleitk(tmp_path: Path) -> None:
    import SimpleITK as sitk  # noqa: N813

    images, labels, records = _records(1.5)
    affine, spacing = slice_affine(records[2])
    assert spacing == pytest.approx((1.5, 1.5, SPACING[2]))
    rows = write_pairs(tmp_path, images[2:3], labels[2:3], ["s"], [json.dumps(records[2])])
    path = tmp_path / rows[0]["image"]
    img = nib.load(path)
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    np.testing.assert_allclose(img.header.get_qform(), affine, atol=1e-5)
    assert img.header.get_zooms()[:3] == pytest.approx((1.5, 1.5, SPACING[2]))
    itk = sitk.ReadImage(str(path))
    lps = np.diag([-1.0, -1.0, 1.0])
    direction = np.array(itk.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(itk.GetSpacing(), (1.5, 1.5, SPACING[2]), atol=1e-5)
    np.testing.assert_allclose(lps @ direction * np.array(itk.GetSpacing()), affine[:3, :3], atol=1e-5)
    np.testing.assert_allclose(lps @ np.array(itk.GetOrigin()), affine[:3, 3], atol=1e-4)
    # the manifest columns are canonical (X, Y, Z), as the manifest builder / read_header report them
    shape, sp = canonical_shape_spacing((SIZE, SIZE, 1), affine)
    assert rows[0]["shape"] == "x".join(map(str, shape)) and rows[0]["spacing"] == "1.5x1.5x7"
    assert sorted(sp) == pytest.approx(sorted((1.5, 1.5, SPACING[2])))


def test_no_record_falls_back_to_the_default_geometry(tmp_path: Path) -> None:
    for empty in (None, "", "{}", {}):
        affine, spacing = slice_affine(empty, default_spacing_mm=2.0)
        assert spacing == (2.0, 2.0, 2.0) and np.allclose(affine[:3, 3], 0)
    image, label = _asymmetric_pair()
    write_pairs(tmp_path, image[None, None], label[None], ["u"], [None], default_spacing_mm=2.0)
    x, y = _read_back(tmp_path / "images/u.nii.gz", tmp_path / "labels/u.nii.gz", 2.0)
    np.testing.assert_allclose(x[0], image, atol=1e-5)
    assert np.array_equal(y[0], label)
    with pytest.raises(ValueError, match="default_spacing_mm"):
        slice_affine(None, default_spacing_mm=0)


# ---------------------------------------------------------------------------------- orientation, every path


def _slice_set(images: np.ndarray, labels: np.ndarray, records: list, case: str = "vol", source: str = "") -> SliceSet:
    n = len(images)
    meta = pd.DataFrame(
        {
            "subject_id": [f"{case}_{i}" if source else case for i in range(n)],
            "case": [f"{case}_{i}" if source else case for i in range(n)],
            "slice_index": [str(r["slice_index"]) if r else "0" for r in records],
            "dataset": "t",
            "modality": "cine",
            "vendor": "",
            "phase": "ED",
            "pathology": "",
            "split": "train",
            "record": [json.dumps(r) if r else "" for r in records],
        },
        columns=list(META_COLUMNS),
    )
    if source:
        meta["source"] = source
        meta["family"] = "gmm"
        meta["source_case"] = case
    return SliceSet(images[:, None].astype(np.float32), labels.astype(np.uint8), meta)


def _run_outputs(tmp_path: Path, train: SliceSet, synth: SliceSet | None, spacing_mm: float = 1.5) -> Path:
    train.save(tmp_path / "train.npz")
    synth_records = []
    if synth is not None:
        synth.save(tmp_path / "synth.npz")
        synth_records = [{"path": str(tmp_path / "synth.npz"), "has_labels": True, "name": "gmm"}]
    config = {"run_name": "r", "preprocess": {"spacing_mm": spacing_mm}}
    res = write_run_outputs(
        str(tmp_path / "out"), "r", config, "h", {"train": str(tmp_path / "train.npz")}, synth_records, {}, "", []
    )
    return Path(res["path"])


@pytest.mark.parametrize("spacing_mm", [None, 1.5])
def test_a_written_slice_reads_back_in_the_orientation_it_went_in(spacing_mm, tmp_path: Path) -> None:
    _, _, records = _records(spacing_mm, n_slices=3)
    image, label = _asymmetric_pair()
    images = np.stack([image, image[::-1].copy(), image.T.copy()])  # three different slices
    labels = np.stack([label] * 3)
    # path 1: single-slice pairs (medsynth sample / scar / translate)
    write_pairs(tmp_path / "pairs", images[:, None], labels, ["a", "b", "c"], records)
    for i, name in enumerate("abc"):
        pair = tmp_path / "pairs"
        x, y = _read_back(pair / f"images/{name}.nii.gz", pair / f"labels/{name}.nii.gz", spacing_mm)
        np.testing.assert_allclose(x[0], images[i], atol=1e-4)
        assert np.array_equal(y[0], labels[i])
    # path 2: the augment flow's dataset/ (a real stack + synthetic slices), read back through its manifest
    train = _slice_set(images, labels, records)
    synth = _slice_set(images[::-1].copy(), labels, records, case="syn", source="synthetic")
    run = _run_outputs(tmp_path, train, synth)
    df, root = load_manifest(run / "manifest.csv")
    assert list(df["source"]) == ["real", "synthetic", "synthetic", "synthetic"]
    cfg = PreprocessConfig(size=SIZE, spacing_mm=spacing_mm, slices="all", percentiles=(0.0, 100.0))
    back = load_slices(run / "manifest.csv", cfg=cfg)
    real = back.subset((back.meta["case"] == df["image"].iloc[0]).to_numpy())
    order = np.argsort(real.meta["slice_index"].astype(int).to_numpy())
    np.testing.assert_allclose(real.images[order, 0], images, atol=1e-4)
    assert np.array_equal(real.labels[order], labels)
    syn = back.subset((back.meta["case"] != df["image"].iloc[0]).to_numpy())
    np.testing.assert_allclose(syn.images[:, 0], images[::-1], atol=1e-4)


# ------------------------------------------------------------------------------------- datasets and stacks


def test_synthetic_slice_takes_the_geometry_of_its_label_slice(tmp_path: Path) -> None:
    images, labels, records = _records(1.5)
    train = _slice_set(images[:, 0], labels, records)
    pick = [3, 0]  # synthetic slice i was made from label slice pick[i]
    synth = _slice_set(images[pick, 0], labels[pick], [records[i] for i in pick], case="syn", source="synthetic")
    run = _run_outputs(tmp_path, train, synth)
    df, root = load_manifest(run / "manifest.csv")
    real = nib.load(root / df["image"].iloc[0])
    for i, src in enumerate(pick):
        syn = nib.load(root / df["image"].iloc[1 + i])
        np.testing.assert_allclose(syn.affine[:3, :2], real.affine[:3, :2], atol=1e-5)
        np.testing.assert_allclose(syn.affine[:3, 3], (real.affine @ [0, 0, src, 1])[:3], atol=1e-4)
        np.testing.assert_allclose(np.asarray(syn.dataobj)[..., 0], np.asarray(real.dataobj)[..., src], atol=1e-6)
    # the manifest tells the true spacing (the bug: 1x1x1 everywhere)
    for _, row in df.iterrows():
        assert sorted(float(s) for s in row["spacing"].split("x")) == pytest.approx([1.5, 1.5, SPACING[2]])
    ds = json.loads((run / "dataset" / "dataset.json").read_text(encoding="utf-8"))
    assert ds["medsynth"]["configurations"] == ["2d"] and "2-D only" in ds["description"]


def test_stacks_with_gaps_or_different_crops_are_split_not_padded(tmp_path: Path) -> None:
    images, labels, records = _records(1.5, n_slices=6)
    keep = [0, 1, 2, 4, 5]  # slice 3 dropped (e.g. no LV in it)
    recs = [records[i] for i in keep]
    assert stack_groups(recs) == [[0, 1, 2], [3, 4]]
    assert stack_groups(list(reversed(recs))) == [[4, 3, 2], [1, 0]]
    with pytest.raises(ValueError, match="one stack"):
        stack_to_nifti(labels[keep], recs)
    shifted = dict(records[1], offset=[records[1]["offset"][0] + 1, records[1]["offset"][1]])
    assert stack_groups([records[0], shifted, records[2]]) == [[0], [1], [2]]
    cases = real_cases(_slice_set(images[keep, 0], labels[keep], recs), 1.5)
    assert [c.case_id for c, _ in cases] == ["real_0000_00", "real_0000_01"]
    second = cases[1][0]
    assert second.image.shape == (SIZE, SIZE, 2)
    np.testing.assert_allclose(second.affine, slice_affine(records[4])[0])
    ((no_record, _),) = synthetic_cases(_slice_set(images[:1, 0], labels[:1], [None], source="synthetic"), 2.0)
    assert no_record.spacing == (2.0, 2.0, 2.0)


def test_png_slices_keep_their_stored_orientation(tmp_path: Path) -> None:
    """Spacing-less PNG sources ("H=+Y,W=+X") go through the same writer and read back unchanged."""
    from PIL import Image

    image, label = _asymmetric_pair()
    big_img = np.zeros((48, 40), np.uint8)
    big_lab = np.zeros((48, 40), np.uint8)
    big_img[5:37, 3:35] = np.round(image * 255).astype(np.uint8)
    big_lab[5:37, 3:35] = label
    Image.fromarray(big_img).save(tmp_path / "img.png")
    Image.fromarray(big_lab).save(tmp_path / "lab.png")
    vol_img, vol_lab = read_pair(tmp_path / "img.png", tmp_path / "lab.png", "canonical")
    x, y, records = preprocess_pair(vol_img, vol_lab, PreprocessConfig(size=SIZE, slices="all", percentiles=(0, 100)))
    assert records[0]["in_plane"] == "H=+Y,W=+X" and np.array_equal(y[0], label)  # PNG: the stored image
    write_pairs(tmp_path / "w", x, y, ["p"], records, default_spacing_mm=1.5)
    assert slice_affine(records[0], 1.5)[1] == (1.5, 1.5, 1.5)
    xb, yb = _read_back(tmp_path / "w/images/p.nii.gz", tmp_path / "w/labels/p.nii.gz", 1.5)
    np.testing.assert_allclose(xb[0], x[0, 0], atol=1e-5)
    assert np.array_equal(yb[0], label)


def test_nnunet_export_writes_the_case_affine(tmp_path: Path) -> None:
    images, labels, records = _records(1.5, n_slices=3)
    ((case, _),) = real_cases(_slice_set(images[:, 0], labels, records), 1.5)
    write_nnunet_dataset(tmp_path, [case], channel_name="MR", dataset_name="t")
    for sub in ("imagesTr/real_0000_0000.nii.gz", "labelsTr/real_0000.nii.gz"):
        np.testing.assert_allclose(nib.load(tmp_path / sub).affine, slice_affine(records[0])[0], atol=1e-5)
    bad = type(case)("x", case.image, case.label, (1.0, 1.0, 1.0), case.affine)
    with pytest.raises(ValueError, match="disagrees"):
        write_nnunet_dataset(tmp_path / "bad", [bad], channel_name="MR", dataset_name="t")


# ----------------------------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_acdc_real_cases_sit_on_their_source_scan(acdc_root: Path, tmp_path: Path) -> None:
    """Each real case written into ``dataset/`` by the augment flow's writer: its LV centroid in world mm (read
    with nibabel) is within one source voxel of the source scan's LV centroid (read with SimpleITK)."""
    import SimpleITK as sitk  # noqa: N813

    from medsynth.data.layouts import build_manifest
    from medsynth.data.manifest import write_manifest

    sitk.ProcessObject_SetGlobalWarningDisplay(False)  # ACDC's unit-scaled sform: ITK warns, uses pixdim
    df = build_manifest("acdc", acdc_root, verify=False)
    write_manifest(df, tmp_path / "acdc.csv", acdc_root)
    slices = load_slices(tmp_path / "acdc.csv", data_root=acdc_root, cfg=PreprocessConfig())
    slices.meta["split"] = "train"
    run = _run_outputs(tmp_path, slices, None)
    out, root = load_manifest(run / "manifest.csv")
    codes = json.loads((run / "dataset" / "dataset.json").read_text(encoding="utf-8"))["labels"]
    lv_code = codes["lv"]
    sources = dict(zip(df["image"], df["label"], strict=True))
    assert len(out) == len(df) == 60
    worst = 0.0
    for _, row in out.iterrows():
        written = nib.load(root / row["label"])
        ijk = np.argwhere(np.asarray(written.dataobj) == lv_code).mean(0)
        got = (written.affine @ [*ijk, 1.0])[:3]
        src = sitk.ReadImage(str(acdc_root / sources[row["source_case"]]))
        zyx = np.argwhere(sitk.GetArrayFromImage(src) == 3).mean(0)  # ACDC code 3 = LV cavity
        want = np.array(src.TransformContinuousIndexToPhysicalPoint(zyx[::-1].tolist())) * [-1, -1, 1]  # LPS→RAS
        direction = np.array(src.GetDirection()).reshape(3, 3) * np.array(src.GetSpacing())
        in_voxels = np.abs(np.linalg.solve(np.diag([-1, -1, 1]) @ direction, got - want))
        worst = max(worst, float(in_voxels.max()))
        assert np.all(in_voxels < 1.0), (row["source_case"], in_voxels)
    print(f"ACDC: {len(out)} cases, worst LV-centroid offset {worst:.3f} source voxels")
