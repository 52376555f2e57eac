"""Every kind of bad input through the real CLI entry point: exit 2, one error line naming the file or key,
no traceback, nothing left behind. And the output guard of every command that takes ``--out``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medsynth.cli.main import build_parser, main
from medsynth.data.manifest import read_manifest, write_manifest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dicom_series import write_series  # noqa: E402

AFF = np.diag([1.5, 1.5, 8.0, 1.0])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """A tiny phantom dataset and a gmm model fitted on it (shared, never modified: cases copy)."""
    root = tmp_path_factory.mktemp("base")
    assert main(["phantom", "--out", str(root / "data"), "--subjects", "2", "--shape", "48x48x3"]) == 0
    cfg = root / "gmm.yaml"
    cfg.write_text("n_components: 2\npreprocess:\n  size: 32\n")
    manifest = root / "data" / "manifest.csv"
    assert main(["fit", "gmm", "--manifest", str(manifest), "--out", str(root / "model"), "--config", str(cfg)]) == 0
    return {"root": root, "data": root / "data", "manifest": manifest, "model": root / "model", "cfg": cfg}


def _copy_data(base: dict, tmp: Path) -> tuple[Path, pd.DataFrame]:
    data = tmp / "data"
    shutil.copytree(base["data"], data)
    return data / "manifest.csv", read_manifest(data / "manifest.csv")


def _edit_manifest(base: dict, tmp: Path, **changes) -> tuple[list[str], str]:
    manifest, df = _copy_data(base, tmp)
    for col, value in changes.items():
        df.loc[0, col] = value
    write_manifest(df, manifest, data_root=manifest.parent)
    return ["inspect", str(manifest), "--out", str(tmp / "out")], str(manifest)


def _edit_image(base: dict, tmp: Path, fn: Callable[[Path, pd.DataFrame], None]) -> tuple[list[str], str]:
    manifest, df = _copy_data(base, tmp)
    df["sha256"] = ""  # the image is changed on purpose: test the reader, not the hash check
    write_manifest(df, manifest, data_root=manifest.parent)
    image = manifest.parent / df["image"].iloc[0]
    fn(image, df)
    return ["inspect", str(manifest), "--out", str(tmp / "out")], str(image)


def _nifti_with(image: Path, arr=None, affine=None, zooms=None, qform_only=False) -> None:
    img = nib.load(str(image))
    data = np.asarray(img.dataobj) if arr is None else arr(np.asarray(img.dataobj))
    new = nib.Nifti1Image(data.astype(np.float32), img.affine if affine is None else affine)
    if zooms is not None:
        new.header.set_zooms(zooms)
    if qform_only:
        new.set_sform(None, code=0)
        new.set_qform(img.affine, code=1)
        new.header.set_zooms(zooms)
    nib.save(new, str(image))


def _patch_header(image: Path, patches: dict[int, tuple[str, float]]) -> None:
    """Overwrite raw NIfTI-1 header fields (byte offset → struct format, value): nibabel itself refuses to
    write the degenerate geometries a broken exporter produces."""
    import gzip
    import struct

    raw = bytearray(gzip.decompress(image.read_bytes()) if image.name.endswith(".gz") else image.read_bytes())
    for offset, (fmt, value) in patches.items():
        raw[offset : offset + struct.calcsize(fmt)] = struct.pack("<" + fmt, value)
    image.write_bytes(gzip.compress(bytes(raw), mtime=0) if image.name.endswith(".gz") else bytes(raw))


def _zero_pixdim(image: Path, df) -> None:
    # pixdim[2] = 0 and no sform: the qform gives a zero-length voxel axis
    _patch_header(image, {84: ("f", 0.0), 252: ("h", 1), 254: ("h", 0)})


def _zero_sform_column(image: Path, df) -> None:
    # sform in use with its second column (srow_x[1], srow_y[1], srow_z[1]) zero, pixdim zero too
    _patch_header(image, {284: ("f", 0.0), 300: ("f", 0.0), 316: ("f", 0.0), 84: ("f", 0.0), 254: ("h", 1)})


def _fit(base: dict, tmp: Path, cfg_text: bytes | str) -> tuple[list[str], str]:
    cfg = tmp / "bad.yaml"
    cfg.write_bytes(cfg_text.encode() if isinstance(cfg_text, str) else cfg_text)
    return ["fit", "gmm", "--manifest", str(base["manifest"]), "--out", str(tmp / "out"), "--config", str(cfg)], str(
        cfg
    )


def _run_cfg(tmp: Path, text: str) -> tuple[list[str], str]:
    cfg = tmp / "run.yaml"
    cfg.write_text(text)
    return ["run", str(cfg), "--out", str(tmp / "out")], str(cfg)


def _model_copy(base: dict, tmp: Path, edit: Callable[[Path], None]) -> tuple[list[str], str]:
    model = tmp / "model"
    shutil.copytree(base["model"], model)
    named = edit(model)
    args = ["sample", "--model", str(model), "--labels", str(base["manifest"]), "--n", "2", "--out", str(tmp / "out")]
    return args, str(named)


def _unknown_family(model: Path) -> Path:
    rec = json.loads((model / "model.json").read_text(encoding="utf-8"))
    rec["family"] = "nosuchfamily"
    (model / "model.json").write_text(json.dumps(rec))
    return model / "model.json"


def _weights_missing(model: Path) -> Path:
    (model / "weights.safetensors").unlink()
    return model / "weights.safetensors"


def _weights_foreign(model: Path) -> Path:
    from safetensors.numpy import save_file

    save_file({"encoder.weight": np.zeros((2, 2), np.float32)}, str(model / "weights.safetensors"))
    return model / "weights.safetensors"


def _fit_report(content: bytes) -> Callable[[Path], Path]:
    def edit(model: Path) -> Path:
        (model / "fit_report.json").write_bytes(content)
        return model / "fit_report.json"

    return edit


def _dicom_case(base: dict, tmp: Path, damage: str) -> tuple[list[str], str]:
    data = tmp / "dicom"
    vol = np.random.default_rng(0).integers(1, 200, (6, 32, 32))
    files = write_series(data / "s1" / "series", vol, spacing=(1.5, 1.5, 8.0))
    lab = np.zeros((32, 32, 6), np.uint8)
    lab[10:20, 10:20] = 1
    from medsynth.data.readers import read_volume

    geo = read_volume(data / "s1" / "series")
    nib.save(nib.Nifti1Image(lab, geo.affine), str(data / "s1" / "label.nii.gz"))
    if damage == "truncated":
        named = files[2]
        named.write_bytes(named.read_bytes()[:150])
    elif damage == "none":
        named = files[0]
    else:  # uneven: remove a middle slice
        named = files[4]
        files[3].unlink()
    row = {
        "subject_id": "s1",
        "image": "s1/series",
        "label": "s1/label.nii.gz",
        "dataset": "dicomtest",
        "modality": "cine",
        "vendor": "unknown",
        "phase": "none",
        "pathology": "unknown",
        "label_map": "canonical",
        "spacing": "",
        "shape": "",
        "split": "",
        "sha256": "",
    }
    manifest = write_manifest(pd.DataFrame([row]), tmp / "dicom.csv", data_root=data)
    return ["inspect", str(manifest), "--out", str(tmp / "out")], str(named)


def _out_parent_is_file(base: dict, tmp: Path) -> tuple[list[str], str]:
    (tmp / "afile").write_text("x")
    return ["phantom", "--out", str(tmp / "afile" / "sub"), "--subjects", "2"], str(tmp / "afile")


def _out_unwritable(base: dict, tmp: Path) -> tuple[list[str], str]:
    if os.geteuid() == 0:  # root writes anywhere on a normal file system: use one that refuses everyone
        return ["phantom", "--out", "/sys/medsynth-test-out", "--subjects", "2"], "/sys"
    ro = tmp / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    return ["phantom", "--out", str(ro / "out"), "--subjects", "2"], str(ro)


def _out_user_folder(base: dict, tmp: Path) -> tuple[list[str], str]:
    user = tmp / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("precious")
    return ["phantom", "--out", str(user), "--subjects", "2"], str(user)


def _out_existing_file(base: dict, tmp: Path) -> tuple[list[str], str]:
    (tmp / "notes.txt").write_text("precious")
    return ["phantom", "--out", str(tmp / "notes.txt"), "--subjects", "2"], str(tmp / "notes.txt")


def _out_is_data(base: dict, tmp: Path) -> tuple[list[str], str]:
    manifest, _ = _copy_data(base, tmp)
    return ["fit", "gmm", "--manifest", str(manifest), "--out", str(manifest.parent)], str(manifest.parent)


def _manifest_non_utf8(base: dict, tmp: Path) -> tuple[list[str], str]:
    manifest, _ = _copy_data(base, tmp)
    manifest.write_bytes(manifest.read_bytes().replace(b"phantom", b"ph\xe4ntom", 1) + b"\xff\xfe")
    return ["inspect", str(manifest), "--out", str(tmp / "out")], str(manifest)


CASES: dict[str, Callable[[dict, Path], tuple[list[str], str]]] = {
    "yaml-syntax": lambda b, t: _fit(b, t, "n_components: 2\nbad: [1, 2\n"),
    "yaml-empty-run-config": lambda b, t: _run_cfg(t, "# nothing here\n"),
    "yaml-non-utf8": lambda b, t: _fit(b, t, b"n_components: 2\nname: \xff\xfe\n"),
    "yaml-unknown-key": lambda b, t: _fit(b, t, "n_components: 2\nbogus_key: 1\n"),
    "yaml-not-a-mapping": lambda b, t: _run_cfg(t, "- just\n- a list\n"),
    "run-unknown-family": lambda b, t: _run_cfg(t, "run_name: x\nmodels:\n  - family: nosuch\n"),
    "manifest-non-utf8": _manifest_non_utf8,
    "manifest-modality-xray": lambda b, t: _edit_manifest(b, t, modality="xray"),
    "manifest-split-bogus": lambda b, t: _edit_manifest(b, t, split="bogus"),
    "manifest-phase-MID": lambda b, t: _edit_manifest(b, t, phase="MID"),
    "manifest-empty-subject": lambda b, t: _edit_manifest(b, t, subject_id=""),
    "manifest-sha256-mismatch": lambda b, t: _edit_manifest(b, t, sha256="0" * 64),
    "manifest-sha256-malformed": lambda b, t: _edit_manifest(b, t, sha256="abc"),
    "manifest-missing-image": lambda b, t: _edit_manifest(b, t, image="nope/absent.nii.gz"),
    "manifest-path-escapes-root": lambda b, t: _edit_manifest(b, t, image="../../etc/passwd"),
    "image-all-zero": lambda b, t: _edit_image(b, t, lambda p, df: _nifti_with(p, arr=lambda a: a * 0)),
    "image-nan": lambda b, t: _edit_image(b, t, lambda p, df: _nifti_with(p, arr=lambda a: a * np.nan)),
    "nifti-zero-pixdim": lambda b, t: _edit_image(b, t, _zero_pixdim),
    "nifti-zero-sform-column": lambda b, t: _edit_image(b, t, _zero_sform_column),
    "nifti-truncated": lambda b, t: _edit_image(b, t, lambda p, df: p.write_bytes(p.read_bytes()[:200])),
    "nifti-garbage": lambda b, t: _edit_image(b, t, lambda p, df: p.write_bytes(b"not a nifti" * 30)),
    "dicom-truncated-slice": lambda b, t: _dicom_case(b, t, "truncated"),
    "dicom-missing-slice": lambda b, t: _dicom_case(b, t, "uneven"),
    "model-unknown-family": lambda b, t: _model_copy(b, t, _unknown_family),
    "model-weights-missing": lambda b, t: _model_copy(b, t, _weights_missing),
    "model-weights-foreign": lambda b, t: _model_copy(b, t, _weights_foreign),
    "fit-report-list": lambda b, t: _model_copy(b, t, _fit_report(b"[]")),
    "fit-report-non-utf8": lambda b, t: _model_copy(b, t, _fit_report(b'{"preprocess": "\xff"}')),
    "out-parent-is-file": _out_parent_is_file,
    "out-unwritable": _out_unwritable,
    "out-user-folder": _out_user_folder,
    "out-existing-file": _out_existing_file,
    "out-is-the-data": _out_is_data,
}


def _error_line(err: str) -> str:
    """The one ``medsynth: error:`` line, which must be the last line on stderr (log lines may precede it:
    the CLI logs at INFO), with no traceback anywhere."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("medsynth: error: ")]
    assert len(errors) == 1 and lines and lines[-1] == errors[0], err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    return errors[0]


def _snapshot(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_bad_input_is_one_line_exit_2_nothing_left(kind: str, base: dict, tmp_path: Path, capsys) -> None:
    args, named = CASES[kind](base, tmp_path)
    before = _snapshot(tmp_path)
    base_before = _snapshot(base["root"])
    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, (kind, err)
    line = _error_line(err)
    assert "(full traceback in" not in line, (kind, line)  # a MedsynthError, not an unforeseen exception
    assert named in line, (kind, named, line)
    assert _snapshot(tmp_path) == before, (kind, "something was written or changed")
    assert _snapshot(base["root"]) == base_before


def test_at_least_25_kinds() -> None:
    assert len(CASES) >= 25


def test_yaml_syntax_error_is_file_line_col(base: dict, tmp_path: Path, capsys) -> None:
    args, cfg = _fit(base, tmp_path, "n_components: 2\nbad: [1, 2\n")
    assert main(args) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"medsynth: error: {cfg}:3:1: ") or line.startswith(f"medsynth: error: {cfg}:2:"), line


# ------------------------------------------------------------------------------------------ --out guard


def _out_commands(base: dict, tmp: Path) -> dict[str, list[str]]:
    m, model = str(base["manifest"]), str(base["model"])
    split = tmp / "split.csv"
    if not split.exists():
        from medsynth.data.splits import assign_splits

        df = assign_splits(read_manifest(base["manifest"]), {"train": 0.5, "val": 0.0, "test": 0.5}, seed=0)
        write_manifest(df, split, data_root=base["data"])
    return {
        "phantom": ["phantom", "--subjects", "2", "--shape", "32x32x2"],
        "manifest": ["manifest", "--layout", "nnunet", "--root", str(base["data"])],
        "split": ["split", m],
        "inspect": ["inspect", m],
        "fit": ["fit", "gmm", "--manifest", m, "--config", str(base["cfg"])],
        "sample": ["sample", "--model", model, "--labels", m, "--n", "2"],
        "scar": ["scar", "--model", model, "--manifest", m],
        "translate": ["translate", "--model", model, "--manifest", m],
        "detect": ["detect", "--model", model, "--manifest", m],
        "evaluate fidelity": ["evaluate", "fidelity", "--real", m, "--synthetic", m],
        "evaluate segmentation": ["evaluate", "segmentation", "--real", str(split)],
        "evaluate scar": ["evaluate", "scar", "--manifest", m],
        "evaluate translation": ["evaluate", "translation", "--model", model, "--manifest", str(split)],
        "run": ["run", str(tmp / "run.yaml")],
    }


def _commands_with_out() -> set[str]:
    parser = build_parser()
    found = set()
    for action in parser._subparsers._group_actions:
        for name, sub in action.choices.items():
            if name == "evaluate":
                for a in sub._subparsers._group_actions:
                    for ename, esub in a.choices.items():
                        if any(x.dest == "out" for x in esub._actions):
                            found.add(f"evaluate {ename}")
            elif any(x.dest == "out" for x in sub._actions):
                found.add(name)
    return found


def test_every_out_command_is_covered_and_has_overwrite(base: dict, tmp_path: Path) -> None:
    commands = _commands_with_out()
    assert commands <= set(_out_commands(base, tmp_path)), commands - set(_out_commands(base, tmp_path))
    parser = build_parser()
    for cmd in commands:
        sub = parser
        for word in cmd.split():
            group = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction))
            sub = group.choices[word]
        assert any(a.dest == "overwrite" for a in sub._actions), cmd


#: Commands cheap enough to run for real in the --overwrite check (the others train networks).
RUN_FOR_REAL = {"phantom", "manifest", "split", "inspect", "fit", "sample", "scar", "detect", "translate"}


@pytest.mark.parametrize("cmd", sorted(_commands_with_out()))
def test_out_guard(cmd: str, base: dict, tmp_path: Path, capsys) -> None:
    """Refuses a folder (or file) medsynth did not write and an output inside the input data; an earlier
    medsynth output is replaced only with --overwrite (checked before the command does any work)."""
    args = _out_commands(base, tmp_path)[cmd]
    (tmp_path / "run.yaml").write_text("run_name: r\ndata:\n  phantom:\n    subjects: 2\n")
    single_file = cmd in ("manifest", "split")
    capsys.readouterr()
    # 1. someone else's folder / file, even with --overwrite
    if single_file:
        foreign = tmp_path / "foreign.csv"
        foreign.write_text("name,grade\nann,A\n")
        precious = foreign
    else:
        foreign = tmp_path / "foreign"
        precious = foreign / "r" / "keep.txt" if cmd == "run" else foreign / "keep.txt"
        precious.parent.mkdir(parents=True)
        precious.write_text("precious")
    before = precious.read_text(encoding="utf-8")
    assert main([*args, "--out", str(foreign), "--overwrite"]) == 2
    err = _error_line(capsys.readouterr().err)
    assert "medsynth did not write" in err, err
    assert precious.read_text(encoding="utf-8") == before
    # 2. inside the input data (a dataset folder medsynth did not write)
    if not single_file and cmd not in ("phantom", "run"):
        data = tmp_path / "userdata"
        shutil.copytree(base["data"], data)
        (data / ".medsynth").unlink()  # a user's own dataset: no marker
        inner = [str(data / "manifest.csv") if a == str(base["manifest"]) else a for a in args]
        inner = [str(data / "split.csv") if a == str(tmp_path / "split.csv") else a for a in inner]
        if str(tmp_path / "split.csv") in args:
            write_manifest(read_manifest(tmp_path / "split.csv"), data / "split.csv", data_root=data)
        assert main([*inner, "--out", str(data / "results")]) == 2
        err = _error_line(capsys.readouterr().err)
        assert "inside the input data folder" in err, err
        assert not (data / "results").exists()
    # 3. medsynth's own earlier output: refused without --overwrite, replaced with it
    ours = tmp_path / ("ours.csv" if single_file else "ours")
    if single_file:
        write_manifest(read_manifest(base["manifest"]), ours)
    else:
        from medsynth.utils.atomic import atomic_dir

        with atomic_dir(ours / "r" if cmd == "run" else ours) as tmp:
            (tmp / "old.txt").write_text("earlier output")
    snapshot = _snapshot(ours.parent)
    assert main([*args, "--out", str(ours)]) == 2
    err = _error_line(capsys.readouterr().err)
    assert "--overwrite" in err, err
    assert _snapshot(ours.parent) == snapshot
    if cmd in RUN_FOR_REAL:
        old_content = (
            ours.read_text(encoding="utf-8") if single_file else (ours / "old.txt").read_text(encoding="utf-8")
        )
        rc = main([*args, "--out", str(ours), "--overwrite"])
        err = capsys.readouterr().err.strip()
        if rc == 0:
            assert ours.is_file() if single_file else (ours.is_dir() and not (ours / "old.txt").exists())
        else:  # the command itself fails (e.g. gmm cannot translate): the guard let it through, output kept
            assert rc == 2 and "overwrite" not in err and "medsynth did not write" not in err, err
            assert (
                ours.read_text(encoding="utf-8") if single_file else (ours / "old.txt").read_text(encoding="utf-8")
            ) == old_content


# ------------------------------------------------------------------------------------ positive cases


def test_dicom_series_folder_in_a_manifest(tmp_path: Path, capsys) -> None:
    """A DICOM series folder is a valid manifest image (it was rejected as 'image file … is missing')."""
    from medsynth.data.manifest import load_manifest
    from medsynth.data.preprocess import PreprocessConfig, load_slices

    args, _ = _dicom_case({}, tmp_path, "none")
    manifest = Path(args[1])
    df, root = load_manifest(manifest)
    assert df["image"].tolist() == ["s1/series"]
    slices = load_slices(manifest, cfg=PreprocessConfig(size=32))
    assert len(slices) > 0
    assert main(args) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "summary.csv").is_file()


def test_inspect_reads_sample_manifest_of_an_image_only_family(base: dict, tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "ppca.yaml"
    cfg.write_text("n_components: 2\nimage_size: 32\npreprocess:\n  size: 32\n")
    model = tmp_path / "ppca"
    assert main(["fit", "ppca", "--manifest", str(base["manifest"]), "--out", str(model), "--config", str(cfg)]) == 0
    assert main(["sample", "--model", str(model), "--n", "3", "--out", str(tmp_path / "s")]) == 0
    rows = read_manifest(tmp_path / "s" / "manifest.csv")
    assert (rows["label"] == "").all()  # image-only
    assert main(["inspect", str(tmp_path / "s" / "manifest.csv"), "--out", str(tmp_path / "i")]) == 0, (
        capsys.readouterr().err
    )
    assert len(pd.read_csv(tmp_path / "i" / "summary.csv")) == 3


# ------------------------------------------------------------------------------- on real files (copies)


def _copy_acdc(acdc_root: Path, tmp: Path, n: int = 2) -> Path:
    root = tmp / "acdc"
    for patient in sorted(p for p in acdc_root.iterdir() if p.name.startswith("patient"))[:n]:
        shutil.copytree(patient, root / patient.name)
    return root


def _copy_emidec(emidec_root: Path, tmp: Path, case: str = "Case_P") -> Path:
    root = tmp / "emidec"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    names = sorted(p.name for p in (emidec_root / "images").glob(f"{case}*.png"))[:3]
    for name in names:
        shutil.copy(emidec_root / "images" / name, root / "images" / name)
        shutil.copy(emidec_root / "masks" / name, root / "masks" / name)
    return root


def _assert_one_line(rc: int, err: str, named: str) -> str:
    assert rc == 2, err
    line = _error_line(err)
    assert named in line, (named, line)
    return line


@pytest.mark.realdata
def test_realdata_acdc_bad_inputs(acdc_root: Path, tmp_path: Path, capsys) -> None:
    root = _copy_acdc(acdc_root, tmp_path)
    manifest = tmp_path / "acdc.csv"
    assert main(["manifest", "--layout", "acdc", "--root", str(root), "--out", str(manifest)]) == 0
    df = read_manifest(manifest)
    out = str(tmp_path / "out")
    # a wrong sha256 in the manifest
    bad = df.copy()
    bad.loc[1, "sha256"] = "f" * 64
    write_manifest(bad, tmp_path / "sha.csv", data_root=root)
    capsys.readouterr()
    _assert_one_line(main(["inspect", str(tmp_path / "sha.csv"), "--out", out]), capsys.readouterr().err, "sha256")
    # the real image with a zero pixdim and no sform; then all-zero; then truncated
    image = root / df["image"].iloc[0]
    original = image.read_bytes()
    plain = df.copy()
    plain["sha256"] = ""
    write_manifest(plain, tmp_path / "plain.csv", data_root=root)
    for damage in ("pixdim", "zero", "truncated"):
        image.write_bytes(original)
        if damage == "pixdim":
            _patch_header(image, {84: ("f", 0.0), 252: ("h", 1), 254: ("h", 0)})
        elif damage == "zero":
            _nifti_with(image, arr=lambda a: a * 0)
        else:
            image.write_bytes(original[: len(original) // 3])
        rc = main(["inspect", str(tmp_path / "plain.csv"), "--out", out])
        _assert_one_line(rc, capsys.readouterr().err, str(image))
        assert not (tmp_path / "out").exists()
    # fitting into the copied ACDC folder is refused before anything is written
    image.write_bytes(original)
    before = _snapshot(root)
    rc = main(["fit", "gmm", "--manifest", str(tmp_path / "plain.csv"), "--out", str(root)])
    _assert_one_line(rc, capsys.readouterr().err, str(root))
    assert _snapshot(root) == before


@pytest.mark.realdata
def test_realdata_emidec_png_bad_inputs(emidec_png_root: Path, tmp_path: Path, capsys) -> None:
    from PIL import Image

    root = _copy_emidec(emidec_png_root, tmp_path)
    manifest = tmp_path / "emidec.csv"
    assert main(["manifest", "--layout", "png-slices", "--root", str(root), "--out", str(manifest)]) == 0
    df = read_manifest(manifest)
    out = str(tmp_path / "out")
    capsys.readouterr()
    for col, value in (("split", "bogus"), ("modality", "xray"), ("phase", "MID"), ("subject_id", "")):
        bad = df.copy()
        bad.loc[0, col] = value
        write_manifest(bad, tmp_path / "bad.csv", data_root=root)
        _assert_one_line(main(["inspect", str(tmp_path / "bad.csv"), "--out", out]), capsys.readouterr().err, col)
    plain = df.copy()
    plain["sha256"] = ""
    write_manifest(plain, tmp_path / "plain.csv", data_root=root)
    image = root / df["image"].iloc[1]
    original = image.read_bytes()
    size = Image.open(image).size
    Image.new("L", size, 0).save(image)  # an all-zero export
    _assert_one_line(main(["inspect", str(tmp_path / "plain.csv"), "--out", out]), capsys.readouterr().err, str(image))
    image.write_bytes(original[: len(original) // 2])
    _assert_one_line(main(["inspect", str(tmp_path / "plain.csv"), "--out", out]), capsys.readouterr().err, str(image))
    manifest.write_bytes(manifest.read_bytes() + b"\xff\xfe\n")
    _assert_one_line(main(["inspect", str(manifest), "--out", out]), capsys.readouterr().err, str(manifest))
    assert not (tmp_path / "out").exists()


def test_weights_get_the_mode_of_every_other_file(base: dict) -> None:
    """safetensors writes 0600; every file medsynth writes gets 0666 less the umask (identical runs, modes too)."""
    from medsynth.utils.atomic import FILE_MODE

    modes = {p.name: p.stat().st_mode & 0o777 for p in base["model"].iterdir() if p.is_file()}
    assert "weights.safetensors" in modes and set(modes.values()) == {FILE_MODE}, modes
