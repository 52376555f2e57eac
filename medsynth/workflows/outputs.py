"""The run's final outputs, written atomically under ``OUT/<run_name>/``.

- ``dataset/``: nnU-Net v2 raw (imagesTr, labelsTr, dataset.json) + MONAI ``datalist.json`` — the real
  training cases (preprocessed slice stacks) plus the labelled synthetic slices, every file with its true
  geometry (:mod:`medsynth.data.writer`: resampled in-plane spacing, source slice spacing, the source scan's
  world position; a synthetic slice takes its label slice's). The dataset is 2-D only (nnU-Net ``2d``);
- ``manifest.csv``: a medsynth manifest of ``dataset/`` with provenance per case (``shape`` / ``spacing`` in
  canonical (X, Y, Z) order, as the manifest builder writes them);
- ``metrics/*.csv``, ``report.md`` and its figures; ``config.yaml`` (resolved) and ``versions.json``.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from medsynth.data.export import Case, label_renumbering, write_nnunet_dataset
from medsynth.data.manifest import write_manifest
from medsynth.data.slices import SliceSet
from medsynth.data.volume import shape_to_str, spacing_to_str
from medsynth.data.writer import canonical_shape_spacing, slice_affine, stack_groups
from medsynth.labels import LABEL_MAPS
from medsynth.utils.atomic import atomic_dir
from medsynth.utils.hashing import sha256_file
from medsynth.workflows.ops import manifest_row
from medsynth.workflows.stage import artefact

log = logging.getLogger(__name__)

VERSIONED_PACKAGES = ("medsynth", "torch", "monai", "numpy", "scipy", "scikit-learn", "nibabel", "prefect", "pandas")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _default_spacing(config: dict[str, Any]) -> float:
    """Spacing (mm) for slices without a geometry record: the preprocessing config's ``spacing_mm``."""
    return float((config.get("preprocess") or {}).get("spacing_mm") or 1.0)


def real_cases(train: SliceSet, default_spacing_mm: float = 1.0) -> list[tuple[Case, dict[str, Any]]]:
    """The real training cases: each source volume's kept slices as one (H, W, n) stack with the source
    scan's geometry (:mod:`medsynth.data.writer`). A volume whose kept slices are not consecutive (or, for
    PNG stacks, not cropped alike) becomes one case per run, ``real_NNNN_KK``: no slice is invented."""
    out = []
    for i, (case, idx) in enumerate(train.meta.groupby("case", sort=True).indices.items()):
        idx = np.asarray(idx)
        records = train.meta["record"].iloc[idx].tolist()
        groups = stack_groups(records, default_spacing_mm)
        for k, group in enumerate(groups):
            sel = idx[group]
            affine, spacing = slice_affine(records[group[0]], default_spacing_mm)
            image = np.moveaxis(train.images[sel, 0], 0, -1)
            label = np.moveaxis(train.labels[sel], 0, -1)
            cid = f"real_{i:04d}" if len(groups) == 1 else f"real_{i:04d}_{k:02d}"
            row = train.meta.iloc[sel[0]]
            out.append((Case(cid, image, label, spacing, affine), {**row.to_dict(), "source_case": case}))
    return out


def synthetic_cases(synth: SliceSet, default_spacing_mm: float = 1.0) -> list[tuple[Case, dict[str, Any]]]:
    """One (H, W, 1) case per synthetic slice, with the geometry of the label slice it was made from (its
    ``record``); slices without a record get the writer's default geometry."""
    out = []
    for i in range(len(synth)):
        row = synth.meta.iloc[i]
        affine, spacing = slice_affine(row["record"], default_spacing_mm)
        case = Case(str(row["subject_id"]), synth.images[i, 0][..., None], synth.labels[i][..., None], spacing, affine)
        out.append((case, row.to_dict()))
    return out


def _label_map_name(remap: dict[int, int]) -> str:
    """A known label map that reads the renumbered codes back as canonical ones."""
    for name, lut in LABEL_MAPS.items():
        if all(lut.get(dst) == src for src, dst in remap.items()):
            return name
    raise ValueError(f"no known label map matches the renumbering {remap}; add one to medsynth.labels")


def write_common_outputs(
    tmp: Path, config: dict[str, Any], metric_tables: dict[str, str], report_md: str, figures: list[str]
) -> None:
    """``metrics/``, ``figures/``, ``report.md``, ``config.yaml`` and ``versions.json`` into a run folder."""
    (tmp / "metrics").mkdir()
    for name, path in metric_tables.items():
        shutil.copy(path, tmp / "metrics" / f"{name}.csv")
    (tmp / "figures").mkdir()
    for fig in figures:
        shutil.copy(fig, tmp / "figures" / Path(fig).name)
    (tmp / "report.md").write_text(report_md, encoding="utf-8")
    (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    (tmp / "versions.json").write_text(json.dumps(package_versions(), indent=2), encoding="utf-8")


def write_report_outputs(
    out_root: str,
    run_name: str,
    config: dict[str, Any],
    metric_tables: dict[str, str],
    report_md: str,
    figures: list[str],
) -> dict[str, Any]:
    """A run folder without a dataset (e.g. the anomaly flow), written atomically."""
    target = Path(out_root) / run_name
    with atomic_dir(target) as tmp:
        write_common_outputs(tmp, config, metric_tables, report_md, figures)
    return {"path": str(target)}


def write_run_outputs(
    out_root: str,
    run_name: str,
    config: dict[str, Any],
    config_hash: str,
    slices_record: dict[str, Any],
    synth_records: list[dict[str, Any]],
    metric_tables: dict[str, str],
    report_md: str,
    figures: list[str],
    real_domain: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Assemble ``OUT/<run_name>`` atomically; returns ``{"path": ..., "cases": ...}``. ``real_domain``
    ``(column, value)`` keeps only those real training cases (a translate run's target domain)."""
    target = Path(out_root) / run_name
    train = SliceSet.load(artefact(slices_record, "train"))
    if real_domain is not None:
        column, value = real_domain
        train = train.subset((train.meta[column].astype(str).str.strip().str.lower() == value).to_numpy())
    default_spacing = _default_spacing(config)
    cases = real_cases(train, default_spacing)
    for rec in synth_records:
        if rec.get("has_labels"):
            cases += synthetic_cases(SliceSet.load(artefact(rec)), default_spacing)
        else:
            log.info("synthetic set %s has no labels: kept out of the segmentation dataset", rec["name"])
    modality = str(train.meta["modality"].iloc[0]) if len(train) else "MR"
    with atomic_dir(target) as tmp:
        ds = write_nnunet_dataset(
            tmp / "dataset",
            [c for c, _ in cases],
            channel_name=modality.upper(),
            dataset_name=config.get("output", {}).get("dataset_name", "MedsynthAugmented"),
            description=f"medsynth run {run_name}: real training cases + synthetic slices",
        )
        remap = label_renumbering(int(v) for v in ds["medsynth"]["canonical_codes"].values())
        label_map = _label_map_name(remap)
        rows = []
        for case, meta in cases:
            img = f"imagesTr/{case.case_id}_0000.nii.gz"
            shape, spacing = canonical_shape_spacing(case.image.shape, case.world_affine())
            files = {
                "image": img,
                "label": f"labelsTr/{case.case_id}.nii.gz",
                "spacing": spacing_to_str(spacing),
                "shape": shape_to_str(shape),
                "sha256": sha256_file(tmp / "dataset" / img),
            }
            fixed = {"label_map": label_map, "split": "train", "config_hash": config_hash}
            rows.append(manifest_row({"subject_id": case.case_id, **meta}, files, keep_extra=False, **fixed))
        write_manifest(pd.DataFrame(rows), tmp / "manifest.csv", data_root=tmp / "dataset")
        # the header records "dataset" relative to the manifest: still right after the rename
        write_common_outputs(tmp, config, metric_tables, report_md, figures)
    n_syn = sum(1 for _, m in cases if m.get("source") == "synthetic")
    return {"path": str(target), "cases": len(cases), "synthetic_cases": n_syn}
