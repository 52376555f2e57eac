"""Dataset layouts → manifest rows (schema: ``data_manifests/README.md``, :mod:`medsynth.data.manifest`).

A *layout* knows where a dataset keeps its images, labels and metadata and turns a folder into one manifest
row per image–label pair. Built-in layouts (:data:`LAYOUTS`):

- ``acdc``: ``patientNNN/patientNNN_frameXX.nii.gz`` + ``_gt.nii.gz`` + ``Info.cfg`` (ED, ES, Group, Height,
  Weight); one row per ED and ES frame; cine; label map ``acdc``; vendor ``unknown`` (not in the files).
- ``mnms``: ``<code>/<code>_sa.nii.gz`` (4-D, time last) + ``<code>_sa_gt.nii.gz`` + the dataset information CSV
  (columns ``External code``, ``ED``, ``ES`` (0-based frame indices), ``VendorName`` / ``Vendor``, optionally
  ``Pathology``) anywhere under the root; ED and ES become rows with a ``frame`` column; label map ``mnms``.
  Images without a ``_sa_gt`` file are unlabelled cases (M&Ms ships some) and are skipped with an info log.
- ``emidec``: ``Case_X/Images/Case_X.nii.gz`` + ``Case_X/Contours/Case_X.nii.gz``; LGE; ``Case_N*`` normal,
  ``Case_P*`` infarct; label map ``emidec``.
- ``png-slices``: ``images/`` + ``masks/`` with matching file names. ``<subject>_sliceKKK.png`` groups slices
  into a subject with ``slice_index`` KKK; EMIDEC names ``Case_<N|P>NNN`` set pathology normal / infarct and
  the dataset ``emidec``. Label map ``emidec`` and modality ``lge`` unless overridden.
- ``sunnybrook``: Sunnybrook Cardiac Data, per patient folder DICOM slices ``IM-0001-NNNN.dcm`` and contour
  files ``IM-0001-NNNN-icontour-manual.txt`` / ``-ocontour-manual.txt`` (``x y`` pixel points per line); one
  row per contoured slice, the contours rasterised at load to LV blood pool and myocardium (``canonical``).
- ``nnunet``: ``dataset.json`` + ``imagesTr/{case}_0000{ending}`` + ``labelsTr/{case}{ending}``. The labels in
  ``dataset.json`` must be medsynth's canonical names and codes (label map ``canonical``); anything else is
  refused because the codes could not be harmonised safely. A case name ending in ``_ED`` / ``_ES`` sets phase.

Every row is checked as it is built: with ``verify=True`` (default) the pair is read through
:func:`medsynth.data.readers.read_pair` (corrupt files, NaN voxels, geometry, label values, empty labels);
with ``verify=False`` only headers are read (shape and spacing) and the image and label shapes compared.
A bad row raises (strict) or is skipped with a warning (``lenient=True``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from medsynth.data.manifest import COLUMNS, MODALITIES
from medsynth.data.readers import read_header, read_pair
from medsynth.data.volume import shape_to_str, spacing_to_str
from medsynth.errors import GeometryError, InputFileError, ManifestError, MedsynthError
from medsynth.labels import CANONICAL, LABEL_MAPS
from medsynth.utils.hashing import sha256_file

log = logging.getLogger(__name__)

#: Dataset pathology codes → manifest pathology vocabulary (lower case; ``unknown`` when not given).
PATHOLOGY_NAMES: dict[str, str] = {
    "NOR": "normal",
    "N": "normal",
    "MINF": "infarct",
    "P": "infarct",
    "DCM": "dcm",
    "HCM": "hcm",
    "RV": "arv",  # ACDC "abnormal right ventricle"
    "ARV": "arv",
    "ARR": "arr",
    "HHD": "hhd",
    "LV": "lvnc",  # M&Ms "LV" = LV non-compaction
    "AHS": "ahs",
    "CIA": "cia",
    "OTHER": "other",
}
EMIDEC_CASE = re.compile(r"^Case_(?P<group>[NP])\d+$")
SLICE_NAME = re.compile(r"^(?P<subject>.+?)_slice(?P<index>\d+)$")


def pathology_name(code: str | None) -> str:
    """Normalise a dataset's pathology code (``NOR``, ``MINF``, …) to the manifest vocabulary."""
    if code is None or str(code).strip() == "" or str(code).strip().lower() == "nan":
        return "unknown"
    code = str(code).strip()
    return PATHOLOGY_NAMES.get(code.upper(), code.lower())


@dataclass
class Candidate:
    """One image–label pair a layout found, before it is read and checked."""

    subject_id: str
    image: Path
    label: Path
    dataset: str
    modality: str
    vendor: str = "unknown"
    phase: str = "none"
    pathology: str = "unknown"
    label_map: str = "canonical"
    frame: int | None = None
    extra: dict[str, str] | None = None


class LayoutEntryError(MedsynthError):
    """A problem with one entry of a layout (skipped in lenient mode)."""


# ---------------------------------------------------------------------------------------------- layouts


def find_files(root: Path, name: str) -> list[Path]:
    """Files called ``name`` under ``root``, following symlinked folders (a patient folder may be a link into
    another disk) but visiting each real folder once (no loops)."""
    seen: set[str] = set()
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        if name in filenames:
            found.append(Path(dirpath) / name)
    return sorted(found)


def _acdc(root: Path, options: dict) -> Iterator[Candidate | LayoutEntryError]:
    cfgs = find_files(root, "Info.cfg")
    if not cfgs:
        raise ManifestError(f"{root}: no ACDC patient folders (patientNNN/Info.cfg) found")
    for cfg in cfgs:
        patient = cfg.parent
        try:
            info = dict(
                (k.strip(), v.strip())
                for k, v in (ln.split(":", 1) for ln in cfg.read_text(encoding="utf-8").splitlines() if ":" in ln)
            )
            frames = {"ED": int(info["ED"]), "ES": int(info["ES"])}
        except (KeyError, ValueError, OSError, UnicodeDecodeError) as err:
            yield LayoutEntryError(f"{cfg}: cannot read ED/ES from Info.cfg ({type(err).__name__}: {err})")
            continue
        extra = {"height_cm": info.get("Height", ""), "weight_kg": info.get("Weight", "")}
        for phase, frame in frames.items():
            stem = patient / f"{patient.name}_frame{frame:02d}"
            yield Candidate(
                subject_id=patient.name,
                image=stem.with_name(stem.name + ".nii.gz"),
                label=stem.with_name(stem.name + "_gt.nii.gz"),
                dataset=options.get("dataset") or "acdc",
                modality=options.get("modality") or "cine",
                vendor="unknown",
                phase=phase,
                pathology=pathology_name(info.get("Group")),
                label_map=options.get("label_map") or "acdc",
                extra=extra,
            )


def _mnms_info(root: Path) -> pd.DataFrame:
    for csv in sorted(root.rglob("*.csv")):
        try:
            df = pd.read_csv(csv, dtype=str, keep_default_na=False)
        except Exception:  # not every CSV under the root is ours to parse
            continue
        df.columns = [str(c).strip() for c in df.columns]
        if {"External code", "ED", "ES"} <= set(df.columns):
            log.info("M&Ms information CSV: %s", csv)
            return df.set_index("External code", drop=False)
    raise ManifestError(f"{root}: no M&Ms information CSV (columns 'External code', 'ED', 'ES') found under the root")


def _mnms(root: Path, options: dict) -> Iterator[Candidate | LayoutEntryError]:
    images = sorted(p for p in root.rglob("*_sa.nii.gz"))
    if not images:
        raise ManifestError(f"{root}: no M&Ms images (<code>/<code>_sa.nii.gz) found")
    info = _mnms_info(root)
    for image in images:
        code = image.name[: -len("_sa.nii.gz")]
        label = image.with_name(f"{code}_sa_gt.nii.gz")
        if not label.is_file():
            log.info("%s: no %s; unlabelled case skipped", image, label.name)
            continue
        if code not in info.index:
            yield LayoutEntryError(f"{image}: code {code!r} not in the M&Ms information CSV")
            continue
        row = info.loc[code]
        if isinstance(row, pd.DataFrame):
            row = row.iloc[0]
        try:
            frames = {"ED": int(float(row["ED"])), "ES": int(float(row["ES"]))}
        except ValueError:
            yield LayoutEntryError(f"{image}: ED/ES {row['ED']!r}/{row['ES']!r} in the information CSV: not integers")
            continue
        vendor = str(row.get("VendorName", "") or row.get("Vendor", "") or "unknown").strip() or "unknown"
        extra = {"centre": str(row.get("Centre", "")), "vendor_code": str(row.get("Vendor", ""))}
        for phase, frame in frames.items():
            yield Candidate(
                subject_id=code,
                image=image,
                label=label,
                dataset=options.get("dataset") or "mnms",
                modality=options.get("modality") or "cine",
                vendor=vendor,
                phase=phase,
                pathology=pathology_name(row.get("Pathology")),
                label_map=options.get("label_map") or "mnms",
                frame=frame,
                extra=extra,
            )


def _emidec(root: Path, options: dict) -> Iterator[Candidate | LayoutEntryError]:
    images = sorted(p for p in root.rglob("Case_*.nii.gz") if p.parent.name == "Images")
    if not images:
        raise ManifestError(f"{root}: no EMIDEC cases (Case_X/Images/Case_X.nii.gz) found")
    for image in images:
        case = image.name[: -len(".nii.gz")]
        m = EMIDEC_CASE.match(case)
        yield Candidate(
            subject_id=case,
            image=image,
            label=image.parent.parent / "Contours" / image.name,
            dataset=options.get("dataset") or "emidec",
            modality=options.get("modality") or "lge",
            pathology=pathology_name(m.group("group")) if m else "unknown",
            label_map=options.get("label_map") or "emidec",
        )


def _png_slices(root: Path, options: dict) -> Iterator[Candidate | LayoutEntryError]:
    images_dir, masks_dir = root / "images", root / "masks"
    if not images_dir.is_dir() or not masks_dir.is_dir():
        raise ManifestError(f"{root}: png-slices layout needs images/ and masks/ folders")
    images = sorted(images_dir.glob("*.png"))
    if not images:
        raise ManifestError(f"{images_dir}: no .png files found")
    image_names = {p.name for p in images}
    for orphan in sorted(p for p in masks_dir.glob("*.png") if p.name not in image_names):
        yield LayoutEntryError(f"{orphan}: mask without an image in {images_dir}")
    for image in images:
        stem = image.stem
        m = SLICE_NAME.match(stem)
        subject, index = (m.group("subject"), int(m.group("index"))) if m else (stem, 0)
        em = EMIDEC_CASE.match(subject)
        yield Candidate(
            subject_id=subject,
            image=image,
            label=masks_dir / image.name,
            dataset=options.get("dataset") or ("emidec" if em else root.name),
            modality=options.get("modality")
            or ("lge" if em or options.get("label_map") in (None, "emidec") else "other"),
            pathology=pathology_name(em.group("group")) if em else "unknown",
            label_map=options.get("label_map") or "emidec",
            extra={"slice_index": str(index)},
        )


def _nnunet_label_map(dataset_json: Path, labels: dict) -> str:
    """``canonical`` when dataset.json's labels are medsynth's names and codes, else refuse."""
    mapping: dict[str, int] = {}
    for key, value in labels.items():
        # nnU-Net v2: {"background": 0, ...}; v1: {"0": "background", ...}. Region labels (lists) are refused.
        if isinstance(value, int) and not isinstance(value, bool):
            mapping[str(key).lower()] = value
        elif isinstance(value, str) and str(key).isdigit():
            mapping[value.lower()] = int(key)
        else:
            raise ManifestError(f"{dataset_json}: labels entry {key!r}: {value!r} is not a single integer label")
    expected = {name: code for code, name in CANONICAL.items()}
    wrong = {n: c for n, c in mapping.items() if expected.get(n) != c}
    if wrong:
        raise ManifestError(
            f"{dataset_json}: labels {wrong} do not match medsynth's canonical labels {expected}; relabel the "
            "dataset or register a label map"
        )
    return "canonical"


def _nnunet(root: Path, options: dict) -> Iterator[Candidate | LayoutEntryError]:
    dataset_json = root / "dataset.json"
    if not dataset_json.is_file():
        raise ManifestError(f"{root}: nnunet layout needs dataset.json")
    try:
        meta = json.loads(dataset_json.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{dataset_json}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or "labels" not in meta:
        raise ManifestError(f"{dataset_json}: missing 'labels'")
    label_map = options.get("label_map") or _nnunet_label_map(dataset_json, meta["labels"])
    ending = str(meta.get("file_ending", ".nii.gz"))
    channels = meta.get("channel_names") or meta.get("modality") or {}
    channel0 = str(channels.get("0", "")).strip().lower() if isinstance(channels, dict) else ""
    modality = options.get("modality") or (channel0 if channel0 in MODALITIES else "other")
    images = sorted((root / "imagesTr").glob(f"*_0000{ending}"))
    if not images:
        raise ManifestError(f"{root / 'imagesTr'}: no *_0000{ending} images found")
    n_expected = meta.get("numTraining")
    if isinstance(n_expected, int) and n_expected != len(images):
        yield LayoutEntryError(f"{dataset_json}: numTraining is {n_expected} but imagesTr holds {len(images)} cases")
    for image in images:
        case = image.name[: -len(f"_0000{ending}")]
        phase = "none"
        for p in ("ED", "ES"):
            if case.upper().endswith(f"_{p}"):
                phase = p
        subject = case[:-3] if phase != "none" else case
        yield Candidate(
            subject_id=subject,
            image=image,
            label=root / "labelsTr" / f"{case}{ending}",
            dataset=options.get("dataset") or str(meta.get("name") or root.name),
            modality=modality,
            phase=phase,
            label_map=label_map,
        )


SUNNYBROOK_CONTOUR = re.compile(r"^(?P<stem>IM-\d{4}-(?P<index>\d{4}))-icontour-manual\.txt$", re.IGNORECASE)


def _sunnybrook(root: Path, options: dict) -> Iterator[Candidate | LayoutEntryError]:
    """Sunnybrook Cardiac Data: per patient folder, cine short-axis DICOM slices ``IM-0001-NNNN.dcm`` and the
    expert contours ``IM-0001-NNNN-icontour-manual.txt`` (+ ``-ocontour-manual.txt``), one ``x y`` pixel
    point per line, anywhere under it. Each contoured slice is one row: the DICOM slice as image, its
    i-contour file as label (rasterised at load: LV blood pool, and myocardium up to the o-contour)."""
    from medsynth.data.readers import contour_image

    contours = sorted(p for p in root.rglob("*-icontour-manual.txt") if SUNNYBROOK_CONTOUR.match(p.name))
    if not contours:
        raise ManifestError(f"{root}: no Sunnybrook contour files (IM-0001-NNNN-icontour-manual.txt) found")
    for contour in contours:
        rel = contour.relative_to(root)
        subject = rel.parts[0] if len(rel.parts) > 1 else root.name
        m = SUNNYBROOK_CONTOUR.match(contour.name)
        try:
            image = contour_image(contour)
        except InputFileError as err:
            yield LayoutEntryError(str(err))
            continue
        yield Candidate(
            subject_id=subject,
            image=image,
            label=contour,
            dataset=options.get("dataset") or "sunnybrook",
            modality=options.get("modality") or "cine",
            pathology="unknown",
            label_map=options.get("label_map") or "canonical",
            extra={"slice_index": str(int(m.group("index")))},
        )


#: Layout name → generator of candidates (or per-entry problems).
LAYOUTS: dict[str, Callable[[Path, dict], Iterator[Candidate | LayoutEntryError]]] = {
    "acdc": _acdc,
    "mnms": _mnms,
    "emidec": _emidec,
    "png-slices": _png_slices,
    "nnunet": _nnunet,
    "sunnybrook": _sunnybrook,
}


# ----------------------------------------------------------------------------------------------- driver


def _rel(path: Path, root: Path) -> str:
    # lexically, not through symlinks: a patient folder may be a link to another disk
    return Path(os.path.abspath(path)).relative_to(os.path.abspath(root)).as_posix()


def _row(c: Candidate, root: Path, verify: bool) -> dict[str, str]:
    if not c.image.is_file() and not c.image.is_dir():
        raise InputFileError(f"{c.image}: image file not found")
    if not c.label.is_file():
        raise InputFileError(f"{c.label}: label file not found (for image {c.image.name})")
    if verify:
        image, _ = read_pair(c.image, c.label, c.label_map, frame=c.frame)
        shape, spacing = image.shape, image.spacing
    else:
        shape, spacing = read_header(c.image, frame=c.frame)
        label_shape, _ = read_header(c.label, frame=c.frame)
        if tuple(shape) != tuple(label_shape):
            raise GeometryError(
                f"{c.image} and {c.label}: image shape {shape} does not match label shape {label_shape}"
            )
    row = {
        "subject_id": c.subject_id,
        "image": _rel(c.image, root),
        "label": _rel(c.label, root),
        "dataset": c.dataset,
        "modality": c.modality,
        "vendor": c.vendor,
        "phase": c.phase,
        "pathology": c.pathology,
        "label_map": c.label_map,
        "spacing": spacing_to_str(spacing),
        "shape": shape_to_str(shape),
        "split": "",
        "sha256": sha256_file(c.image) if c.image.is_file() else "",
        "frame": "" if c.frame is None else str(c.frame),
        "source": "real",
    }
    row.update(c.extra or {})
    return row


def build_manifest(
    layout: str,
    root: str | Path,
    lenient: bool = False,
    *,
    label_map: str | None = None,
    modality: str | None = None,
    dataset: str | None = None,
    verify: bool = True,
) -> pd.DataFrame:
    """Scan ``root`` with ``layout`` and return a manifest DataFrame (all columns strings, paths relative to root).

    ``label_map`` / ``modality`` / ``dataset`` override the layout's defaults. ``verify`` reads every pair
    in full (else headers only). Strict mode raises the first problem (a :class:`MedsynthError` naming the
    file); ``lenient`` skips bad entries with a warning. Rows are sorted by subject, phase, slice, frame.
    """
    if layout not in LAYOUTS:
        raise ManifestError(f"layout: unknown layout {layout!r}; known: {sorted(LAYOUTS)}")
    if label_map is not None and label_map not in LABEL_MAPS:
        raise ManifestError(f"label_map: unknown label map {label_map!r}; known: {sorted(LABEL_MAPS)}")
    if modality is not None and modality not in MODALITIES:
        raise ManifestError(f"modality: {modality!r} is not one of {list(MODALITIES)}")
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"{root}: data root is not a directory")
    options = {"label_map": label_map, "modality": modality, "dataset": dataset}
    rows: list[dict[str, str]] = []
    skipped = 0
    for item in LAYOUTS[layout](root, options):
        try:
            if isinstance(item, LayoutEntryError):
                raise ManifestError(str(item))
            rows.append(_row(item, root, verify))
        except MedsynthError as err:
            if not lenient:
                raise
            skipped += 1
            log.warning("skipped: %s", err)
    if skipped:
        log.warning(
            "%s layout under %s: %d entr%s skipped (lenient mode)",
            layout,
            root,
            skipped,
            "y" if skipped == 1 else "ies",
        )
    if not rows:
        raise ManifestError(f"{root}: no usable image-label pairs for layout {layout!r}")
    df = pd.DataFrame(rows).fillna("")
    key = ["image", "label", "frame"]
    dup = df.duplicated(subset=key, keep="first")
    if dup.any():
        first = df[dup].iloc[0]
        raise ManifestError(f"{root}: duplicate entry for image {first['image']!r} (frame {first['frame']!r})")
    sort_cols = ["subject_id", "phase"] + (["slice_index"] if "slice_index" in df.columns else [])
    if "slice_index" in df.columns:
        df["_order"] = df["slice_index"].map(lambda s: int(s) if str(s).isdigit() else -1)
        df = df.sort_values(["subject_id", "phase", "_order", "image"], kind="stable").drop(columns="_order")
    else:
        df = df.sort_values(sort_cols + ["image"], kind="stable")
    df = df.reset_index(drop=True)
    ordered = list(COLUMNS) + [c for c in df.columns if c not in COLUMNS]
    return df[ordered]
