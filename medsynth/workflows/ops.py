"""The operations behind both the CLI commands and the flow stages, on in-memory slice sets.

Each operation takes a model and :class:`~medsynth.data.slices.SliceSet` s and returns a SliceSet whose
``meta`` carries the provenance of every slice (:func:`synthetic_meta`: family, model hash, seed, source case,
the source slice's preprocessing ``record`` — its geometry). The caller decides where the result goes: a flow
stage (:mod:`medsynth.workflows.stages`) stores it as ``.npz`` in its stage folder; a CLI command
(:mod:`medsynth.workflows.commands`) writes it as NIfTI pairs plus a manifest with :func:`write_slice_dataset`,
the one writer of NIfTI files and provenance rows for the model commands.

Every operation asks the model for the capability it needs through :func:`~medsynth.models.base.require`; none
names a family.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medsynth.data.cohorts import healthy_subjects, scar_eligible, scar_removable
from medsynth.data.manifest import write_manifest
from medsynth.data.slices import SliceSet
from medsynth.errors import ConfigError, ManifestError
from medsynth.models.base import GenerativeModel, require
from medsynth.utils.atomic import atomic_dir
from medsynth.utils.hashing import sha256_json
from medsynth.utils.seeding import rng as make_rng

log = logging.getLogger(__name__)

#: Which training slices a family is fitted on (``models[i].fit_on`` of a run config).
FIT_ON = ("train", "healthy_train")


def config_hash(model: GenerativeModel) -> str:
    """Hash of the family and its config (provenance column ``config_hash`` of the model commands)."""
    return sha256_json({"family": model.family, "config": model.config.model_dump(mode="json")})[:16]


# ---- fitting ----------------------------------------------------------------------------------------------
def fit_set(slices: SliceSet, fit_on: str = "train") -> SliceSet:
    """The slices a family is fitted on: all of ``slices`` or only its healthy subjects
    (:func:`medsynth.data.cohorts.healthy_subjects`)."""
    if fit_on not in FIT_ON:
        raise ConfigError(f"fit_on: expected one of {FIT_ON}, got {fit_on!r}")
    return slices.subset(healthy_subjects(slices)) if fit_on == "healthy_train" else slices


def fit(
    family: str,
    params: dict[str, Any] | None,
    train: SliceSet,
    val: SliceSet | None = None,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
) -> tuple[GenerativeModel, dict[str, Any]]:
    """Create registry family ``family`` with ``params`` (ConfigError naming the key when invalid), fit it on
    ``train`` (``val``: held-out slices for its report, or None) and return ``(model, fit report)``.

    ``checkpoint_dir``: where a checkpointing family saves its progress, so a rerun resumes an interrupted fit.
    """
    from medsynth.models.registry import create_model

    model = create_model(family, params, checkpoint_dir=checkpoint_dir)
    if len(train) == 0:
        raise ManifestError(f"{family}: no slices to fit on")
    log.info("fitting %s on %d slices (%d val)", family, len(train), 0 if val is None else len(val))
    report = model.fit(train, val if val is not None and len(val) else None, seed=seed)
    return model, report


def fit_record(model: GenerativeModel, report: dict[str, Any], seed: int, **inputs: Any) -> dict[str, Any]:
    """The ``fit_report.json`` written beside every fitted model (CLI and flows): family, hashes, seed,
    what it was fitted on (``inputs``: manifest, slice counts, preprocessing, …) and the family's report."""
    return {
        "family": model.family,
        "model_hash": model.model_hash,
        "config_hash": config_hash(model),
        "seed": seed,
        **inputs,
        "report": report,
    }


# ---- provenance -------------------------------------------------------------------------------------------
def synthetic_meta(
    src: pd.DataFrame | None,
    ids: list[str],
    model: GenerativeModel,
    seed: int,
    from_labels: bool,
    keep_split: bool = False,
) -> pd.DataFrame:
    """Slice metadata (provenance) of generated slices, one row per id.

    ``src``: the real source slices' rows (one per output slice; None when nothing was drawn from real data).
    With ``from_labels`` the output follows the source's anatomy, so its pathology and source case carry over;
    the preprocessing ``record`` (geometry) and acquisition columns always come from the source row. New
    samples are training data (split ``train``); ``keep_split``: the source's split (a translated or
    scar-edited slice is the same patient's anatomy, so it stays on that patient's side of the split)."""
    n = len(ids)
    if src is None:
        src = pd.DataFrame({c: [""] * n for c in ("modality", "vendor", "phase", "pathology", "split", "record")})
        src["case"] = src["slice_index"] = ""
    src = src.reset_index(drop=True)
    case_ref = (src["case"].astype(str) + "#" + src["slice_index"].astype(str)).where(src["case"].astype(str) != "", "")
    return pd.DataFrame(
        {
            "subject_id": ids,
            "case": ids,
            "slice_index": "0",
            "dataset": "synthetic",
            "modality": src["modality"].astype(str),
            "vendor": src["vendor"].astype(str),
            "phase": src["phase"].astype(str),
            "pathology": src["pathology"].astype(str) if from_labels else "unknown",
            "split": src["split"].astype(str).replace("", "train") if keep_split else "train",
            "record": src["record"].astype(str),
            "source": "synthetic",
            "family": model.family,
            "model_hash": model.model_hash,
            "config_hash": config_hash(model),
            "seed": str(seed),
            "source_case": case_ref if from_labels else "",
        }
    )


#: SliceSet metadata columns that are not manifest columns (identity and geometry of the slice itself).
_NOT_MANIFEST = frozenset({"case", "slice_index", "record"})
#: Provenance columns of a manifest row, with the value of a real (not generated) case.
PROVENANCE_DEFAULTS = {
    "source": "real", "family": "", "model_hash": "", "seed": "", "source_case": "", "config_hash": "",
}  # fmt: skip


def manifest_row(meta: dict[str, Any], files: dict[str, str], keep_extra: bool = True, **fixed: Any) -> dict[str, Any]:
    """One manifest row of a written slice or case: identity and acquisition columns and provenance from its
    SliceSet ``meta`` row (generated or real), the file columns ``files`` (image, label, spacing, shape,
    sha256) and ``fixed`` values (e.g. ``label_map``, the run's ``config_hash``). ``keep_extra``: keep further
    meta columns (``pair_id``, ``variant``, ``translated_from``). The one builder of provenance rows: the CLI
    datasets and the flows' run outputs."""
    row: dict[str, Any] = {"subject_id": str(meta.get("subject_id", "")), **files}
    for col in ("dataset", "modality", "vendor", "pathology"):
        row[col] = str(meta.get(col, "") or "")
    row["phase"] = str(meta.get("phase") or "none")
    row["label_map"] = "canonical"
    row["split"] = str(meta.get("split") or "train")
    for col, default in PROVENANCE_DEFAULTS.items():
        row[col] = str(meta.get(col) or default)
    extra = {k: v for k, v in meta.items() if k not in row and k not in _NOT_MANIFEST} if keep_extra else {}
    return {**row, **extra, **fixed}


def write_slice_dataset(out_dir: str | Path, slices: SliceSet, has_labels: bool, default_spacing_mm: float) -> Path:
    """Write ``slices`` as NIfTI image(-label) pairs named after ``meta.case`` plus ``manifest.csv`` (one
    :func:`manifest_row` per slice), atomically. Returns the manifest path."""
    from medsynth.data.writer import write_pairs

    out_dir = Path(out_dir)
    meta = slices.meta
    with atomic_dir(out_dir) as tmp:
        paths = write_pairs(
            tmp,
            slices.images.astype(np.float32),
            slices.labels.astype(np.uint8) if has_labels else None,
            meta["case"].astype(str).tolist(),
            meta["record"].astype(str).tolist(),
            default_spacing_mm,
        )
        rows = [manifest_row(m, p) for m, p in zip(meta.to_dict("records"), paths, strict=True)]
        write_manifest(pd.DataFrame(rows), tmp / "manifest.csv")
    log.info("wrote %d slices to %s", len(slices), out_dir)
    return out_dir / "manifest.csv"


# ---- synthesis --------------------------------------------------------------------------------------------
def synthesize(
    model: GenerativeModel,
    pool: SliceSet | None,
    n: int,
    seed: int,
    name: str | None = None,
    deformation: dict[str, Any] | None = None,
    context: bool = False,
    distinct: bool = False,
    scar_fraction: float = 0.0,
) -> tuple[SliceSet, bool]:
    """Draw ``n`` slices from a model that can ``sample``; returns ``(slices, has_labels)``.

    Label-conditioned families get the label maps of ``n`` slices drawn from ``pool`` (seeded by ``seed``;
    ``distinct``: without repeats while ``n`` ≤ the pool), each deformed by a seeded
    :class:`~medsynth.transforms.RandomLabelDeformation` with ``deformation``'s keys when given. ``context``:
    families declaring it keep the (equally deformed) real surroundings of the source slice. Unconditional
    families still draw source rows from ``pool`` (for acquisition metadata and geometry) but ignore their
    labels; images-only samples get all-background labels and ``has_labels`` False. ``scar_fraction``:
    label-conditioned families render that share of the scar-free maps with a label-level scar drawn from
    the scar shapes of ``pool`` (:func:`medsynth.synthesis.scar.insert_label_scar`; metadata column
    ``label_scar``, pathology ``infarct``), a seeded stream of its own so the other draws stay as they are.
    """
    from medsynth.transforms import RandomLabelDeformation

    require(model, "sample")
    if n < 1:
        raise ConfigError(f"n: expected a positive number of samples, got {n}")
    if model.conditional and pool is None:
        raise ConfigError(f"labels: family {model.family!r} is label-conditioned; give slices with label maps")
    if pool is not None and len(pool) == 0:
        raise ManifestError("labels: no slices to draw label maps from")
    rng = make_rng(seed)
    idx = draw_rows(rng, len(pool), n, distinct) if pool is not None else None
    labels = ctx = None
    if model.conditional:
        use_context = context and model.supports("context")
        if deformation is not None:
            deform = RandomLabelDeformation(**deformation)
            params = [deform.sample(rng) for _ in idx]
            labels = np.stack([p(pool.labels[i]) for p, i in zip(params, idx, strict=True)])
            if use_context:
                # the same deformation on the source image keeps its real surroundings aligned with the labels
                ctx = np.stack([p(pool.images[i, 0], order=1)[None] for p, i in zip(params, idx, strict=True)])
        else:
            labels = pool.labels[idx]
            ctx = pool.images[idx] if use_context else None
    added = None
    if scar_fraction > 0 and labels is not None:
        from medsynth.synthesis.scar import insert_label_scar, scar_shapes

        shapes = scar_shapes(pool.labels)
        if len(shapes) == 0:
            raise ConfigError(
                "synthesis.labels.scar_fraction: the training label maps have no scar to draw shapes from"
            )
        labels, added = insert_label_scar(labels, shapes, scar_fraction, np.random.default_rng([seed, 1]))
        log.info("label-level scar added to %d of %d label maps", int(added.sum()), len(labels))
    samples = model.sample_in_context(labels, ctx, seed=seed) if ctx is not None else model.sample(n, labels, seed)
    has_labels = samples.labels is not None
    out_labels = samples.labels if has_labels else np.zeros((n, *samples.images.shape[2:]), np.uint8)
    ids = [f"syn_{name or model.family}_{i:05d}" for i in range(n)]
    meta = synthetic_meta(pool.meta.iloc[idx] if idx is not None else None, ids, model, seed, model.conditional)
    if added is not None:
        meta["label_scar"] = added
        meta.loc[added, "pathology"] = "infarct"
    return SliceSet(samples.images.astype(np.float32), out_labels.astype(np.uint8), meta), has_labels


def draw_rows(rng: np.random.Generator, size: int, n: int, distinct: bool) -> np.ndarray:
    """``n`` row indices into a pool of ``size`` slices; ``distinct``: without repeats while ``n`` <= ``size``."""
    return rng.choice(size, size=n, replace=n > size) if distinct else rng.integers(0, size, size=n)


def synthesize_with_style(
    model: GenerativeModel,
    pool: SliceSet,
    references: np.ndarray,
    n: int,
    seed: int,
    name: str | None = None,
    reference_name: str = "",
) -> SliceSet:
    """``n`` slices from a model that can ``style``: the label maps of ``n`` slices of ``pool`` (drawn as
    :func:`synthesize` draws them with ``distinct``: the same maps for the same seed) rendered in the appearance
    of ``references`` (m, 1, H, W) on the slice scale: one reference for every map when m = 1, else map i gets
    reference i mod m. The ``vendor`` column is left empty (the appearance is the reference's, not the label
    source's); ``style_reference`` records ``reference_name``."""
    require(model, "style")
    if n < 1:
        raise ConfigError(f"n: expected a positive number of samples, got {n}")
    if pool is None or len(pool) == 0:
        raise ManifestError("labels: no slices to draw label maps from")
    idx = draw_rows(make_rng(seed), len(pool), n, distinct=True)
    refs = references if len(references) == 1 else references[np.arange(n) % len(references)]
    samples = model.sample_with_style(pool.labels[idx], refs, seed=seed)
    ids = [f"syn_{name or model.family}_{i:05d}" for i in range(n)]
    meta = synthetic_meta(pool.meta.iloc[idx], ids, model, seed, from_labels=True)
    meta["vendor"] = ""
    meta["style_reference"] = reference_name
    return SliceSet(samples.images.astype(np.float32), samples.labels.astype(np.uint8), meta)


def scar_cases(model: GenerativeModel, pool: SliceSet, n: int, seed: int, name: str | None = None) -> SliceSet:
    """``n`` new scar cases: scar inserted by a model that can ``scar`` into the healthy myocardium of
    scar-eligible slices of ``pool`` (:func:`medsynth.data.cohorts.scar_eligible`, drawn seeded)."""
    require(model, "scar")
    eligible = np.flatnonzero(scar_eligible(pool.labels))
    if eligible.size == 0:
        raise ManifestError("no slice with healthy myocardium (LV blood pool, no scar) to insert scar into")
    rng = make_rng(seed)
    idx = rng.choice(eligible, size=n, replace=n > eligible.size)
    samples = model.insert_scar(pool.images[idx], pool.labels[idx], seed=seed)
    ids = [f"syn_{name or model.family}_{i:05d}" for i in range(n)]
    meta = synthetic_meta(pool.meta.iloc[idx], ids, model, seed, from_labels=True)
    meta["pathology"] = "infarct"
    return SliceSet(samples.images.astype(np.float32), samples.labels.astype(np.uint8), meta)


def scar_pairs(model: GenerativeModel, slices: SliceSet, seed: int) -> SliceSet:
    """Scar / scar-free pairs of ``slices``: each scar-eligible slice next to a copy with a synthetic scar
    (variant ``scar``, source ``synthetic``), each slice with scar next to its scar-free counterpart
    (:func:`medsynth.synthesis.scar.remove_scar`; variant ``scar_free``). Rows share a ``pair_id``; only
    myocardium pixels differ within a pair. Other slices are left out."""
    from medsynth.synthesis.scar import remove_scar

    require(model, "scar")
    add, remove = scar_eligible(slices.labels), scar_removable(slices.labels)
    keep = np.flatnonzero(add | remove)
    if keep.size == 0:
        raise ManifestError("no slice with LV blood pool and myocardium to insert scar into")
    to_add = np.flatnonzero(add)
    inserted = model.insert_scar(slices.images[to_add], slices.labels[to_add], seed=seed) if to_add.size else None
    where = {int(i): k for k, i in enumerate(to_add)}
    images, labels, src_rows, extra = [], [], [], []
    for k, i in enumerate(keep):
        image, label = slices.images[i, 0], slices.labels[i]
        if add[i]:
            new = (inserted.images[where[int(i)], 0], inserted.labels[where[int(i)]], "scar", "synthetic")
            pair = [new, (image, label, "scar_free", "real")]
        else:
            other_img, other_lab = remove_scar(image, label)
            pair = [(image, label, "scar", "real"), (other_img, other_lab, "scar_free", "synthetic")]
        for img, lab, variant, source in pair:
            images.append(img)
            labels.append(lab)
            src_rows.append(i)
            extra.append({"pair_id": f"pair_{k:05d}", "variant": variant, "source": source})
    extra_df = pd.DataFrame(extra)
    ids = [f"{e['pair_id']}_{e['variant']}" for e in extra]
    meta = synthetic_meta(slices.meta.iloc[src_rows], ids, model, seed, from_labels=True, keep_split=True)
    meta["source"] = extra_df["source"]
    meta["dataset"] = "scar_pairs"
    meta["pathology"] = np.where(extra_df["variant"] == "scar", "infarct", "normal")
    meta["pair_id"], meta["variant"] = extra_df["pair_id"], extra_df["variant"]
    return SliceSet(np.stack(images)[:, None].astype(np.float32), np.stack(labels).astype(np.uint8), meta)


def translate(
    model: GenerativeModel, slices: SliceSet, direction: str, seed: int, name: str | None = None
) -> tuple[SliceSet, SliceSet]:
    """The from-domain slices of ``slices`` translated by a model that can ``translate``, their label maps
    carried over; returns ``(translated, source)``. The domain column of the translated rows names the
    to-domain, ``translated_from`` the from-domain."""
    require(model, "translate")
    key, src, dst, mask = model.translation_domains(slices, direction)
    if not mask.any():
        raise ManifestError(f"no slice with {key} = {src!r} to translate")
    source = slices.subset(mask)
    ids = [f"syn_{name or model.family}_{i:05d}" for i in range(len(source))]
    meta = synthetic_meta(source.meta, ids, model, seed, from_labels=True, keep_split=True)
    if key in meta.columns:
        meta[key] = dst
    meta["translated_from"] = src
    images = model.translate(source.images, seed=seed, direction=direction)
    return SliceSet(np.asarray(images, np.float32), source.labels, meta), source


# ---- scoring ----------------------------------------------------------------------------------------------
def fidelity_table(
    reference: SliceSet,
    synthetic: SliceSet,
    extractor: Any,
    config: Any,
    real_train: SliceSet | None = None,
    real_test: SliceSet | None = None,
) -> tuple[pd.DataFrame, Any]:
    """FD / rFD / KID / PRDC / MS-SSIM of ``synthetic`` against ``reference`` real slices
    (:func:`medsynth.evaluation.fidelity.compute_fidelity`) and, given the real train and test splits, the
    memorisation check's rows (``memorised_fraction``, ``nn_distance_ratio_median``). Returns
    ``(table, memorisation result or None)``; one row per metric."""
    from medsynth.evaluation.fidelity import compute_fidelity
    from medsynth.evaluation.memorisation import check_memorisation

    table = compute_fidelity(reference, synthetic, extractor, config)
    if real_train is None or real_test is None:
        return table, None
    mem = check_memorisation(synthetic, real_train, real_test)
    rows = pd.DataFrame(
        [
            {"metric": "memorised_fraction", "value": mem.summary["fraction_flagged"]},
            {"metric": "nn_distance_ratio_median", "value": mem.summary["median_ratio"]},
        ]
    )
    rows["ci_low"] = rows["ci_high"] = np.nan
    rows["extractor"] = f"memorisation:{mem.summary['space']}"
    rows["extractor_hash"] = mem.summary.get("method", mem.summary["space"])
    rows["n_real"], rows["n_synthetic"] = len(real_train), len(synthetic)
    return pd.concat([table, rows], ignore_index=True), mem
