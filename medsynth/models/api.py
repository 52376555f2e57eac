"""Family-agnostic library functions behind ``medsynth fit`` / ``sample`` / ``scar`` and the Prefect flows.

Everything goes through the registry and the :class:`~medsynth.models.base.GenerativeModel` contract, so a new
family works here without changes. Outputs are written atomically. Synthetic slices are written as NIfTI
volumes of shape (X, Y, 1) laid out so that :func:`medsynth.data.preprocess.load_slices` reads them back in
the same (H, W) orientation (rows along -Y, columns along -X, RAS+ affine with the preprocessing spacing).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from medsynth.config import validate
from medsynth.data.manifest import write_manifest
from medsynth.data.slices import SliceSet
from medsynth.errors import ConfigError, InputFileError, ManifestError, MedsynthError
from medsynth.models.base import GenerativeModel
from medsynth.models.registry import create_model, load_model
from medsynth.utils.atomic import atomic_dir, atomic_file
from medsynth.utils.hashing import sha256_file, sha256_json
from medsynth.utils.seeding import rng as make_rng

log = logging.getLogger(__name__)

FIT_REPORT = "fit_report.json"


def preprocess_config(preprocess: Any):
    from medsynth.data.preprocess import PreprocessConfig

    if preprocess is None:
        return PreprocessConfig()
    if isinstance(preprocess, PreprocessConfig):
        return preprocess
    return validate(PreprocessConfig, preprocess, source="preprocess config")


def load_manifest_slices(manifest: str | Path, data_root: str | Path | None = None, preprocess: Any = None) -> SliceSet:
    """Slices of a manifest through the project's preprocessing (``preprocess``: config, dict or None)."""
    from medsynth.data.preprocess import load_slices

    return load_slices(manifest, data_root=data_root, cfg=preprocess_config(preprocess))


def split_train_val(slices: SliceSet) -> tuple[SliceSet, SliceSet | None]:
    """``train`` / ``val`` by the manifest split; every slice is training data when no row says ``train``."""
    splits = slices.meta["split"].astype(str)
    if (splits == "train").any():
        val = slices.split("val")
        return slices.split("train"), (val if len(val) else None)
    return slices, None


def fit_family(
    family: str,
    manifest: str | Path,
    out_dir: str | Path,
    config: dict[str, Any] | None = None,
    data_root: str | Path | None = None,
    seed: int = 0,
    preprocess: Any = None,
) -> Path:
    """Fit registry family ``family`` on the manifest's training split; save the model to ``out_dir``.

    Writes the family's ``model.json`` + ``weights.safetensors`` and ``fit_report.json`` (fit report, config
    hash, preprocessing, manifest hash). Returns ``out_dir``. Unknown family or config key → ConfigError.
    """
    out_dir = Path(out_dir)
    try:
        # checkpoints live beside the (atomically written) model folder so a rerun resumes an interrupted fit
        model = create_model(family, config, checkpoint_dir=out_dir.parent / f".{out_dir.name}.checkpoints")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    cfg = preprocess_config(preprocess)
    slices = load_manifest_slices(manifest, data_root, cfg)
    if len(slices) == 0:
        raise ManifestError(f"{manifest}: no slices to fit on")
    train, val = split_train_val(slices)
    log.info("fitting %s on %d slices (%d val)", family, len(train), 0 if val is None else len(val))
    report = model.fit(train, val, seed=seed)
    model.save(out_dir)
    record = {
        "family": family,
        "model_hash": model.model_hash,
        "config_hash": config_hash(model),
        "seed": seed,
        "manifest": str(manifest),
        "manifest_sha256": sha256_file(manifest),
        "n_train_slices": len(train),
        "n_val_slices": 0 if val is None else len(val),
        "preprocess": cfg.model_dump(mode="json"),
        "report": report,
    }
    with atomic_file(out_dir / FIT_REPORT) as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=_json_default), encoding="utf-8")
    return out_dir


def config_hash(model: GenerativeModel) -> str:
    return sha256_json({"family": model.family, "config": model.config.model_dump(mode="json")})[:16]


def read_fit_report(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / FIT_REPORT
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputFileError(f"{path}: corrupt fit report: {' '.join(str(err).split())}") from None
    if not isinstance(record, dict):
        raise InputFileError(f"{path}: corrupt fit report: expected a JSON object, got {type(record).__name__}")
    return record


def slice_to_nifti(array: np.ndarray, spacing_mm: float, dtype: Any) -> nib.Nifti1Image:
    """(H, W) slice → (X, Y, 1) NIfTI whose radiological display (rows -Y, columns -X) is the slice."""
    vol = np.ascontiguousarray(array[::-1, ::-1].T[:, :, None]).astype(dtype)
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    img = nib.Nifti1Image(vol, affine)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    return img


def write_pairs(
    tmp: Path, images: np.ndarray, labels: np.ndarray | None, names: list[str], spacing_mm: float
) -> list[dict[str, str]]:
    """Write ``images`` (n, 1, H, W) / ``labels`` (n, H, W) under ``tmp``; return manifest path columns."""
    (tmp / "images").mkdir(parents=True, exist_ok=True)
    if labels is not None:
        (tmp / "labels").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, name in enumerate(names):
        rel_img = f"images/{name}.nii.gz"
        nib.save(slice_to_nifti(images[i, 0], spacing_mm, np.float32), str(tmp / rel_img))
        rel_lab = ""
        if labels is not None:
            rel_lab = f"labels/{name}.nii.gz"
            nib.save(slice_to_nifti(labels[i], spacing_mm, np.uint8), str(tmp / rel_lab))
        h, w = images.shape[2:]
        rows.append(
            {
                "image": rel_img,
                "label": rel_lab,
                "spacing": f"{spacing_mm:.6g}x{spacing_mm:.6g}x{spacing_mm:.6g}",
                "shape": f"{w}x{h}x1",
                "sha256": sha256_file(tmp / rel_img),
            }
        )
    return rows


def sample_dataset(
    model_dir: str | Path,
    out_dir: str | Path,
    n: int,
    seed: int,
    labels_manifest: str | Path | None = None,
    data_root: str | Path | None = None,
) -> Path:
    """Sample ``n`` slices from a saved model into ``out_dir`` (NIfTI pairs + ``manifest.csv``); return the
    manifest path. Label-conditioned families draw their ``n`` label maps (with replacement only when
    ``n`` exceeds the available slices) from ``labels_manifest``, seeded by ``seed``."""
    if n < 1:
        raise ConfigError(f"n: expected a positive number of samples, got {n}")
    model = load_model(model_dir)
    fit = read_fit_report(model_dir)
    cfg = preprocess_config(fit.get("preprocess"))
    spacing = float(cfg.spacing_mm or 1.0)
    rng = make_rng(seed)
    source_meta = None
    labels = None
    if labels_manifest is not None and model.conditional:
        pool = load_manifest_slices(labels_manifest, data_root, cfg)
        if len(pool) == 0:
            raise ManifestError(f"{labels_manifest}: no label slices")
        idx = rng.choice(len(pool), size=n, replace=n > len(pool))
        labels = pool.labels[idx]
        source_meta = pool.meta.iloc[idx].reset_index(drop=True)
    elif labels_manifest is not None:
        log.info("family %r is not label-conditioned: --labels %s is not used", model.family, labels_manifest)
    elif model.conditional:
        raise ConfigError(f"labels: family {model.family!r} is label-conditioned; pass a labels manifest")
    samples = model.sample(n, labels, seed=seed)
    names = [f"synth_{seed}_{i:05d}" for i in range(n)]
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        paths = write_pairs(tmp, samples.images, samples.labels, names, spacing)
        rows = []
        for i, p in enumerate(paths):
            src = source_meta.iloc[i] if source_meta is not None else None
            rows.append(
                {
                    "subject_id": names[i],
                    **p,
                    "dataset": "synthetic",
                    "modality": str(src["modality"]) if src is not None else "",
                    "vendor": str(src["vendor"]) if src is not None else "",
                    "phase": str(src["phase"]) if src is not None and src["phase"] else "none",
                    "pathology": str(src["pathology"]) if src is not None else "",
                    "label_map": "canonical",
                    "split": "train",
                    "source": "synthetic",
                    "family": model.family,
                    "model_hash": model.model_hash,
                    "seed": str(seed),
                    "source_case": f"{src['case']}#{src['slice_index']}" if src is not None else "",
                    "config_hash": config_hash(model),
                }
            )
        write_manifest(pd.DataFrame(rows), tmp / "manifest.csv")
    log.info("wrote %d %s samples to %s", n, model.family, out_dir)
    return out_dir / "manifest.csv"


def scar_dataset(
    model_dir: str | Path,
    manifest: str | Path,
    out_dir: str | Path,
    seed: int = 0,
    data_root: str | Path | None = None,
) -> Path:
    """Scar / scar-free pairs from the LGE slices of ``manifest`` using the model's scar model.

    Slices with healthy myocardium and no scar get a synthetic scar (variant ``scar``) next to the untouched
    original (``scar_free``); slices with scar get a scar-free counterpart next to the original. Rows share a
    ``pair_id``. Only myocardium pixels differ within a pair. Returns the manifest path.
    """
    from medsynth.labels import LV, MVO, MYO, SCAR
    from medsynth.synthesis.scar import remove_scar

    model = load_model(model_dir)
    if not model.supports("scar"):
        raise MedsynthError(f"{model_dir}: the {model.family!r} model cannot insert scar (fit on LGE with scar labels)")
    fit = read_fit_report(model_dir)
    cfg = preprocess_config(fit.get("preprocess"))
    slices = load_manifest_slices(manifest, data_root, cfg)
    rng = make_rng(seed)
    imgs, labs, rows = [], [], []
    for i in range(len(slices)):
        image, label = slices.images[i, 0], slices.labels[i]
        has_scar = np.isin(label, (SCAR, MVO)).any()
        if not (label == LV).any() or (not has_scar and (label == MYO).sum() < 20):
            continue
        if has_scar:
            other_img, other_lab = remove_scar(image, label)
            pair = [(image, label, "scar", "real"), (other_img, other_lab, "scar_free", "synthetic")]
        else:
            new = model.insert_scar(image[None, None], label[None], seed=int(rng.integers(2**31)))
            other_img, other_lab = new.images[0, 0], new.labels[0]
            pair = [(other_img, other_lab, "scar", "synthetic"), (image, label, "scar_free", "real")]
        meta = slices.meta.iloc[i]
        pid = f"pair_{len(rows) // 2:05d}"
        for img, lab, variant, source in pair:
            imgs.append(img)
            labs.append(lab)
            rows.append({"meta": meta, "pair_id": pid, "variant": variant, "source": source})
    if not rows:
        raise ManifestError(f"{manifest}: no slice with LV blood pool and myocardium to insert scar into")
    spacing = float(cfg.spacing_mm or 1.0)
    names = [f"{r['pair_id']}_{r['variant']}" for r in rows]
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        paths = write_pairs(tmp, np.stack(imgs)[:, None], np.stack(labs), names, spacing)
        records = []
        for r, p, name in zip(rows, paths, names, strict=True):
            m = r["meta"]
            records.append(
                {
                    "subject_id": f"{m['subject_id']}",
                    **p,
                    "dataset": "scar_pairs",
                    "modality": str(m["modality"]),
                    "vendor": str(m["vendor"]),
                    "phase": str(m["phase"]) or "none",
                    "pathology": "infarct" if r["variant"] == "scar" else "normal",
                    "label_map": "canonical",
                    "split": str(m["split"]),
                    "source": r["source"],
                    "family": model.family,
                    "model_hash": model.model_hash,
                    "seed": str(seed),
                    "source_case": f"{m['case']}#{m['slice_index']}",
                    "config_hash": config_hash(model),
                    "pair_id": r["pair_id"],
                    "variant": r["variant"],
                    "name": name,
                }
            )
        df = pd.DataFrame(records).drop(columns=["name"])
        write_manifest(df, tmp / "manifest.csv")
    return out_dir / "manifest.csv"


def translate_dataset(
    model_dir: str | Path,
    manifest: str | Path,
    out_dir: str | Path,
    seed: int = 0,
    data_root: str | Path | None = None,
    direction: str = "forward",
    split: str | None = None,
) -> Path:
    """Translate the from-domain slices of ``manifest`` (only the ``split`` rows when given) with a model
    declaring ``translate``; write translated images with their original label maps (NIfTI pairs) and a
    manifest whose domain column names the to-domain, with provenance. Returns the manifest path."""
    model = load_model(model_dir)
    if not model.supports("translate"):
        raise MedsynthError(f"{model_dir}: the {model.family!r} model cannot translate")
    fit = read_fit_report(model_dir)
    cfg = preprocess_config(fit.get("preprocess"))
    slices = load_manifest_slices(manifest, data_root, cfg)
    if split is not None:
        slices = slices.subset((slices.meta["split"].astype(str) == split).to_numpy())
    key, src, dst, mask = model.translation_domains(slices, direction)
    if not mask.any():
        raise ManifestError(f"{manifest}: no slice with {key} = {src!r}{f' in split {split!r}' if split else ''}")
    slices = slices.subset(mask)
    images = model.translate(slices.images, seed=seed, direction=direction)
    spacing = float(cfg.spacing_mm or 1.0)
    names = [f"translated_{i:05d}" for i in range(len(slices))]
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        paths = write_pairs(tmp, images, slices.labels, names, spacing)
        records = []
        for i, p in enumerate(paths):
            m = slices.meta.iloc[i]
            row = {
                "subject_id": str(m["subject_id"]),
                **p,
                "dataset": "translated",
                "modality": str(m["modality"]),
                "vendor": str(m["vendor"]),
                "phase": str(m["phase"]) or "none",
                "pathology": str(m["pathology"]),
                "label_map": "canonical",
                "split": str(m["split"]),
                "source": "synthetic",
                "family": model.family,
                "model_hash": model.model_hash,
                "seed": str(seed),
                "source_case": f"{m['case']}#{m['slice_index']}",
                "config_hash": config_hash(model),
                "translated_from": src,
            }
            if key in row:
                row[key] = dst
            records.append(row)
        write_manifest(pd.DataFrame(records), tmp / "manifest.csv")
    log.info("translated %d %s slices (%s -> %s) into %s", len(slices), key, src, dst, out_dir)
    return out_dir / "manifest.csv"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)
