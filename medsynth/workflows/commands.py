"""The model commands of the CLI (``medsynth fit`` / ``sample`` / ``scar`` / ``translate`` / ``detect`` /
``evaluate scar`` / ``evaluate translation``) over files: read a manifest and a saved model, run the same
operation as the flows (:mod:`medsynth.workflows.ops`), write NIfTI pairs + a manifest or metric tables.

Outputs are written atomically. Every model directory holds ``fit_report.json`` beside the model; the
preprocessing recorded there is used again when the model is applied to a manifest.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medsynth.data.loading import load_manifest_slices, preprocess_config, split_train_val
from medsynth.data.slices import SliceSet
from medsynth.errors import ConfigError, InputFileError, ManifestError
from medsynth.models.base import GenerativeModel, json_default, require
from medsynth.models.registry import load_model
from medsynth.utils.atomic import atomic_dir, atomic_file
from medsynth.utils.hashing import sha256_file
from medsynth.workflows import ops

log = logging.getLogger(__name__)

FIT_REPORT = "fit_report.json"


def write_fit_report(model_dir: str | Path, record: dict[str, Any]) -> Path:
    path = Path(model_dir) / FIT_REPORT
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=json_default), encoding="utf-8")
    return path


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


def load_fitted(model_dir: str | Path) -> tuple[GenerativeModel, Any]:
    """A saved model and the preprocessing config it was fitted with (the default when not recorded)."""
    return load_model(model_dir), preprocess_config(read_fit_report(model_dir).get("preprocess"))


def _spacing(cfg: Any) -> float:
    return float(cfg.spacing_mm or 1.0)


def _apply(
    model_dir: str | Path, capability: str, manifest: str | Path, data_root: str | Path | None
) -> tuple[GenerativeModel, Any, SliceSet]:
    """A saved model that offers ``capability`` (CapabilityError naming the folder otherwise), its
    preprocessing, and the manifest's slices preprocessed the same way."""
    model, cfg = load_fitted(model_dir)
    require(model, capability, str(model_dir))
    return model, cfg, load_manifest_slices(manifest, data_root, cfg)


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
    from medsynth.models.registry import create_model

    out_dir = Path(out_dir)
    create_model(family, config)  # a bad family or key fails before any slice is read
    cfg = preprocess_config(preprocess)
    slices = load_manifest_slices(manifest, data_root, cfg)
    if len(slices) == 0:
        raise ManifestError(f"{manifest}: no slices to fit on")
    train, val = split_train_val(slices)
    # checkpoints live beside the (atomically written) model folder so a rerun resumes an interrupted fit
    checkpoints = out_dir.parent / f".{out_dir.name}.checkpoints"
    model, report = ops.fit(family, config, train, val, seed=seed, checkpoint_dir=checkpoints)
    model.save(out_dir)
    record = ops.fit_record(
        model,
        report,
        seed,
        manifest=str(manifest),
        manifest_sha256=sha256_file(manifest),
        n_train_slices=len(train),
        n_val_slices=0 if val is None else len(val),
        preprocess=cfg.model_dump(mode="json"),
    )
    write_fit_report(out_dir, record)
    return out_dir


def sample_dataset(
    model_dir: str | Path,
    out_dir: str | Path,
    n: int,
    seed: int,
    labels_manifest: str | Path | None = None,
    data_root: str | Path | None = None,
    scar_fraction: float = 0.0,
) -> Path:
    """Sample ``n`` slices from a saved model into ``out_dir`` (NIfTI pairs + ``manifest.csv``); return the
    manifest path. Label-conditioned families draw their ``n`` label maps (with replacement only when
    ``n`` exceeds the available slices) from ``labels_manifest``, seeded by ``seed``; ``scar_fraction``: that
    share of the scar-free maps gets a label-level scar first (:func:`medsynth.workflows.ops.synthesize`)."""
    if not 0.0 <= scar_fraction <= 1.0:
        raise ConfigError(f"--scar-fraction: expected a share in [0, 1], got {scar_fraction}")
    model, cfg = load_fitted(model_dir)
    require(model, "sample")
    pool = None
    if labels_manifest is not None:
        pool = load_manifest_slices(labels_manifest, data_root, cfg)
        if len(pool) == 0:
            raise ManifestError(f"{labels_manifest}: no label slices")
        if not model.conditional:
            log.info("family %r is not label-conditioned: the labels of %s are not used", model.family, labels_manifest)
    if scar_fraction > 0 and not (model.conditional and pool is not None):
        raise ConfigError("--scar-fraction: needs a label-conditioned model and --labels")
    synthetic, has_labels = ops.synthesize(model, pool, n, seed, distinct=True, scar_fraction=scar_fraction)
    return ops.write_slice_dataset(out_dir, synthetic, has_labels, _spacing(cfg))


def read_reference(path: str | Path, cfg: Any) -> np.ndarray:
    """A style reference image file → its slices (m, 1, S, S) on the slice intensity scale: a NIfTI volume or a
    PNG (any format :func:`~medsynth.data.readers.read_volume` reads) preprocessed with ``cfg`` like training
    data (every slice kept: a reference has no label map, so the crop is centred on the field of view), or a
    slice set ``.npz`` (already preprocessed; its images are used as they are). InputFileError naming the file
    for an unreadable file, no slices or non-finite values."""
    from medsynth.data.preprocess import preprocess_pair
    from medsynth.data.readers import read_volume
    from medsynth.data.volume import Volume

    path = Path(path)
    if path.name.lower().endswith(".npz"):
        if not path.is_file():
            raise InputFileError(f"{path}: file not found")
        images = SliceSet.load(path).images
    else:
        vol = read_volume(path)
        blank = Volume(np.zeros(vol.shape, np.uint8), vol.affine, vol.spacing, vol.path)
        images, _, _ = preprocess_pair(vol, blank, cfg.model_copy(update={"slices": "all"}))
    if images.ndim != 4 or images.shape[1] != 1 or len(images) == 0:
        raise InputFileError(f"{path}: no image slices in the style reference (shape {images.shape})")
    if not np.isfinite(images).all():
        raise InputFileError(f"{path}: the style reference holds NaN or Inf")
    return images.astype(np.float32)


def sample_styled_dataset(
    model_dir: str | Path,
    reference: str | Path,
    out_dir: str | Path,
    n: int,
    seed: int,
    labels_manifest: str | Path,
    data_root: str | Path | None = None,
) -> Path:
    """Like :func:`sample_dataset` in the appearance of the image file ``reference`` (:func:`read_reference`;
    :func:`medsynth.workflows.ops.synthesize_with_style`) with a model that can ``style``; NIfTI pairs +
    ``manifest.csv`` (``style_reference`` names the file). Returns the manifest path. Nothing is written when
    the model, the reference or the labels are unusable."""
    model, cfg = load_fitted(model_dir)
    require(model, "style", str(model_dir))
    refs = read_reference(reference, cfg)
    pool = load_manifest_slices(labels_manifest, data_root, cfg)
    if len(pool) == 0:
        raise ManifestError(f"{labels_manifest}: no label slices")
    synthetic = ops.synthesize_with_style(model, pool, refs, n, seed, reference_name=Path(reference).name)
    return ops.write_slice_dataset(out_dir, synthetic, True, _spacing(cfg))


def scar_dataset(
    model_dir: str | Path,
    manifest: str | Path,
    out_dir: str | Path,
    seed: int = 0,
    data_root: str | Path | None = None,
) -> Path:
    """Scar / scar-free pairs (:func:`medsynth.workflows.ops.scar_pairs`) of the LGE slices of ``manifest``
    with a model that can insert scar; NIfTI pairs + manifest (``pair_id``, ``variant``). Returns the manifest."""
    return _write_applied(model_dir, "scar", manifest, data_root, out_dir, lambda m, sl: ops.scar_pairs(m, sl, seed))


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
    that can ``translate``; write translated images with their original label maps (NIfTI pairs) and a
    manifest whose domain column names the to-domain, with provenance. Returns the manifest path."""

    def translate(model: GenerativeModel, slices: SliceSet) -> SliceSet:
        if split is not None:
            slices = slices.subset((slices.meta["split"].astype(str) == split).to_numpy())
        return ops.translate(model, slices, direction, seed)[0]

    where = f" in split {split!r}" if split else ""
    return _write_applied(model_dir, "translate", manifest, data_root, out_dir, translate, where)


def _write_applied(
    model_dir: str | Path,
    capability: str,
    manifest: str | Path,
    data_root: str | Path | None,
    out_dir: str | Path,
    apply: Callable[[GenerativeModel, SliceSet], SliceSet],
    where: str = "",
) -> Path:
    """Apply ``apply(model, slices) -> SliceSet`` (an operation needing ``capability``) to the slices of
    ``manifest``; a :class:`ManifestError` from the operation is re-raised naming the manifest (and
    ``where``). Writes the labelled result as NIfTI pairs + manifest and returns the manifest path."""
    model, cfg, slices = _apply(model_dir, capability, manifest, data_root)
    try:
        result = apply(model, slices)
    except ManifestError as err:
        raise ManifestError(f"{manifest}: {err}{where}") from None
    return ops.write_slice_dataset(out_dir, result, True, _spacing(cfg))


def detect(
    model: GenerativeModel, slices: SliceSet, out_dir: str | Path, agg: str = "max", baselines: bool = True
) -> dict[str, Path]:
    """Score ``slices`` with ``model`` and write ``slice_scores.csv``, ``subject_scores.csv`` and, when the
    labels carry scar information, ``anomaly_metrics.csv`` (model row, then n-SD / FWHM rows) into ``out_dir``."""
    from medsynth.evaluation.anomaly import comparison_table, has_scar_info, score_model, slice_table, subject_table

    out_dir = Path(out_dir)
    scores = score_model(model, slices)
    sdf = slice_table(slices, scores)
    written = {"slice_scores": _write_csv(sdf, out_dir / "slice_scores.csv")}
    written["subject_scores"] = _write_csv(subject_table(sdf, agg), out_dir / "subject_scores.csv")
    if has_scar_info(slices):
        table = comparison_table({model.family: scores}, slices, include_baselines=baselines, agg=agg)
        written["anomaly_metrics"] = _write_csv(table, out_dir / "anomaly_metrics.csv")
    else:
        log.info("no scar labels in the scored set: anomaly_metrics.csv not written")
    return written


def detect_manifest(
    model_dir: str | Path,
    manifest: str | Path,
    out_dir: str | Path,
    data_root: str | Path | None = None,
    agg: str = "max",
    baselines: bool = True,
) -> dict[str, Path]:
    """``medsynth detect``: score a manifest's slices with a saved model that can ``score`` (preprocessed as
    the model was fitted) and write the tables of :func:`detect`."""
    model, _, slices = _apply(model_dir, "score", manifest, data_root)
    written = detect(model, slices, out_dir, agg=agg, baselines=baselines)
    log.info("scored %d slices with %s: wrote %s", len(slices), model.family, ", ".join(map(str, written.values())))
    return written


def run_scar_evaluation(
    manifest: str | Path,
    out_dir: str | Path,
    model_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    seed: int = 0,
    test_fraction: float = 0.5,
    preprocess: Any = None,
) -> Path:
    """``medsynth evaluate scar``: write ``out_dir/scar_metrics.csv`` and return its path.

    With ``model_dir`` every slice of the manifest is evaluated with that model. Otherwise the registry's
    default scar family (:func:`medsynth.models.registry.default_family`) is fitted on the manifest's
    ``train`` split and evaluated on the rest (``test``/``val``); without splits a seeded patient-level split
    (``test_fraction``, stratified by scar) is made, so no patient is in both.
    """
    from medsynth.evaluation.scar import evaluate_scar, patient_split
    from medsynth.models.registry import default_family

    slices = load_manifest_slices(manifest, data_root, preprocess)
    if len(slices) == 0:
        raise ManifestError(f"{manifest}: no slices to evaluate")
    if model_dir is not None:
        table = evaluate_scar(slices, load_model(model_dir))
    else:
        splits = slices.meta["split"].astype(str).to_numpy()
        is_test = (splits != "train") if (splits == "train").any() else patient_split(slices, test_fraction, seed)
        if is_test.all() or not is_test.any():
            raise ManifestError(f"{manifest}: need both training and held-out patients for the scar evaluation")
        model, _ = ops.fit(default_family("scar"), None, slices.subset(~is_test), seed=seed)
        table = evaluate_scar(slices.subset(is_test), model)
    out = Path(out_dir) / "scar_metrics.csv"
    with atomic_file(out) as tmp:
        table.to_csv(tmp, index=False)
    log.info("scar metrics:\n%s", table.to_string(index=False))
    return out


def run_translation_evaluation(
    model_dir: str | Path,
    manifest: str | Path,
    out_dir: str | Path,
    data_root: str | Path | None = None,
    config: Any = None,
    seed: int = 0,
) -> str:
    """``medsynth evaluate translation``: evaluate a saved translation model on a manifest holding both
    domains with a patient-level train/test split; write ``translation_metrics.csv`` and ``report.md`` to
    ``out_dir`` atomically. Returns the metrics path."""
    from medsynth.evaluation.report import md_table
    from medsynth.evaluation.translation import TranslationEvalConfig, evaluate_translation

    model, _, slices = _apply(model_dir, "translate", manifest, data_root)
    splits = slices.meta["split"].astype(str)
    train, test = slices.subset((splits == "train").to_numpy()), slices.subset((splits == "test").to_numpy())
    if len(train) == 0 or len(test) == 0:
        raise ManifestError(f"{manifest}: needs subjects in both the train and the test split")
    table, _ = evaluate_translation(model, train, test, config or TranslationEvalConfig(), seed)
    with atomic_dir(out_dir) as tmp:
        table.to_csv(tmp / "translation_metrics.csv", index=False)
        lines = [
            f"# Translation {table['direction'].iloc[0]} ({model.family}, model {model.model_hash[:16]})",
            "",
            "before = source test slices as they are, after = translated; FD against the real target test slices;",
            "Dice of a U-Net trained on real target-domain training slices, against the source labels.",
            "",
            md_table(table),
            "",
        ]
        (tmp / "report.md").write_text("\n".join(lines), encoding="utf-8")
    log.info("translation metrics written to %s", out_dir)
    return str(Path(out_dir) / "translation_metrics.csv")


def _write_csv(df: pd.DataFrame, path: Path) -> Path:
    with atomic_file(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    return path
