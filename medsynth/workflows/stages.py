"""The pipeline stages. Each takes paths and small JSON records and returns a record (see ``stage.py``).

Records carry artefact paths and hashes, never arrays, so an orchestrator (Prefect, Dask) can ship them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medsynth.data.manifest import load_manifest, read_manifest, resolve_data_root, write_manifest
from medsynth.data.slices import SliceSet
from medsynth.errors import ConfigError
from medsynth.transforms import RandomLabelDeformation
from medsynth.utils.hashing import sha256_file
from medsynth.workflows.stage import artefact, file_hashes, run_stage, stage_dir

log = logging.getLogger(__name__)

#: Pathology values counted as healthy when a family is fitted on ``healthy_train``.
HEALTHY = frozenset({"normal", "NOR", "healthy"})


def _tree_fingerprint(root: Path, work: str | Path | None = None) -> str:
    """Fingerprint of a data folder: every file's relative name and content hash, so a changed file (even one
    a layout reads without the manifest changing) invalidates the caches. Hashes are reused while a file's
    size and mtime are unchanged (:func:`medsynth.workflows.stage.file_hashes`)."""
    from medsynth.utils.hashing import sha256_json

    files = sorted(p for p in root.rglob("*") if p.is_file())
    hashes = file_hashes(files, work)
    return sha256_json([(str(p.relative_to(root)), hashes[str(p)]) for p in files])


def _manifest_files_fingerprint(manifest: Path, data_root: str | None, work: str | Path | None) -> str:
    """Content hashes of the manifest and of every image / label file it names (missing files are left to the
    manifest checks, which name them)."""
    from medsynth.data.manifest import resolve_path
    from medsynth.errors import MedsynthError
    from medsynth.utils.hashing import sha256_json

    df = read_manifest(manifest)
    root = resolve_data_root(manifest, data_root)
    files: list[Path] = []
    for col in ("image", "label"):
        for rel in df[col]:
            try:
                full = resolve_path(root, rel, manifest) if rel else None
            except MedsynthError:
                continue
            if full is not None and full.exists():
                files.append(full)
    files = sorted(set(files))
    hashes = file_hashes([manifest, *files], work)
    return sha256_json({"manifest": hashes[str(manifest)], "files": [(str(p), hashes[str(p)]) for p in files]})


def _prepare_inputs(work: str, data: dict[str, Any], seed: int, data_root: str | None) -> tuple[dict, Path | None]:
    """The prepare stage's key inputs (config, seed, the content of every input file) and its data target."""
    source = data["source"]
    inputs: dict[str, Any] = {"data": data, "seed": seed}
    if source not in ("layout", "manifest"):
        return inputs, None
    if data_root is None and not Path(data.get("root") or data.get("manifest") or "").is_absolute():
        raise ConfigError(
            f"data.source is {source!r}: give --data-root or set ${data['data_root_env']} to the data folder"
        )
    base = Path(data_root) if data_root else Path("/")
    target = base / (data["root"] or "") if source == "layout" else base / data["manifest"]
    if source == "manifest" and not Path(data["manifest"]).is_absolute() and Path(data["manifest"]).is_file():
        # a manifest shipped with the project (data_manifests/…): its paths are under the data root
        target, inputs["manifest_data_root"] = Path(data["manifest"]), str(data_root) if data_root else None
    if not target.exists():
        raise ConfigError(f"data.{'root' if source == 'layout' else 'manifest'}: {target} does not exist")
    if target.is_dir():
        inputs["fingerprint"] = _tree_fingerprint(target, work)
    else:
        inputs["fingerprint"] = _manifest_files_fingerprint(target, inputs.get("manifest_data_root"), work)
    inputs["target"] = str(target.resolve())
    return inputs, target


def prepare_fingerprint(work: str, data: dict[str, Any], seed: int, data_root: str | None) -> str:
    """Hash of what :func:`prepare_manifest` depends on, file contents included (for orchestrator cache keys:
    a data file changed between runs must not let a cached prepare step through)."""
    from medsynth.utils.hashing import sha256_json

    return sha256_json(_prepare_inputs(work, data, seed, data_root)[0])


# ---- data -----------------------------------------------------------------------------------------------
def prepare_manifest(work: str, data: dict[str, Any], seed: int, data_root: str | None) -> dict[str, Any]:
    """Produce the run's manifest with patient-level splits: phantom, a dataset layout, or a given manifest.

    The stage key covers the content of every input file (a layout's whole folder; a manifest and each file
    it names), so a changed image is read again; a manifest ``sha256`` that does not match its image is an
    error naming the file."""
    from medsynth.data.splits import assign_splits

    source = data["source"]
    inputs, root = _prepare_inputs(work, data, seed, data_root)

    def build(tmp: Path) -> dict[str, Any]:
        if source == "phantom":
            from medsynth.phantom import generate_dataset

            ph = data["phantom"]
            parts = []
            for k, contrast in enumerate(ph["contrast"].split("+")):
                folder = f"phantom_{contrast}" if "+" in ph["contrast"] else "phantom"
                m = generate_dataset(
                    tmp / folder, subjects=ph["subjects"], contrast=contrast, scanner=ph["scanner"], seed=seed + k
                )
                part = read_manifest(m)
                if "+" in ph["contrast"]:  # one manifest over both folders; subject ids kept apart
                    part["image"], part["label"] = folder + "/" + part["image"], folder + "/" + part["label"]
                    part["subject_id"] = contrast + "_" + part["subject_id"]
                parts.append(part)
            df = pd.concat(parts, ignore_index=True)
            df_root = tmp if "+" in ph["contrast"] else Path(m).parent
        elif source == "layout":
            from medsynth.data.layouts import build_manifest

            df = build_manifest(data["layout"], root, lenient=data["lenient"])
            df_root = root
        else:
            df, df_root = load_manifest(
                root,
                data_root=inputs.get("manifest_data_root"),
                lenient=data["lenient"],
                hasher=lambda p: file_hashes([p], work)[str(p)],
            )
        df = _limit_subjects(df, data.get("max_subjects"), seed)
        if (df["split"] == "").any():
            df = assign_splits(df, fractions=data["splits"], seed=seed)
        write_manifest(df, tmp / "manifest.csv", data_root=df_root)
        counts = df.drop_duplicates("subject_id")["split"].value_counts().to_dict()
        return {"path": "manifest.csv", "subjects": counts, "rows": len(df)}

    record = run_stage(work, "prepare", inputs, build)
    record["sha256"] = sha256_file(artefact(record))
    return record


def _limit_subjects(df: pd.DataFrame, max_subjects: int | None, seed: int) -> pd.DataFrame:
    subjects = df.drop_duplicates("subject_id")
    if not max_subjects or len(subjects) <= max_subjects:
        return df
    rng = np.random.default_rng(seed)
    # round-robin over pathology groups keeps the subsample stratified
    groups = [g["subject_id"].tolist() for _, g in subjects.groupby("pathology", sort=True)]
    for g in groups:
        rng.shuffle(g)
    keep: list[str] = []
    while len(keep) < max_subjects:
        for g in groups:
            if g and len(keep) < max_subjects:
                keep.append(g.pop())
    return df[df["subject_id"].isin(keep)].reset_index(drop=True)


def list_subjects(manifest_record: dict[str, Any]) -> list[str]:
    return sorted(read_manifest(artefact(manifest_record))["subject_id"].unique().tolist())


def preprocess_subject(
    work: str, manifest_record: dict[str, Any], subject_id: str, preprocess: dict[str, Any], lenient: bool = False
) -> dict[str, Any]:
    """Slices of one subject (all its image–label pairs) as an npz SliceSet."""
    from medsynth.data.manifest import resolve_path
    from medsynth.data.preprocess import PreprocessConfig, slices_from_manifest
    from medsynth.errors import MedsynthError

    # Keyed on this subject's rows and the content of its files, not the whole manifest: a changed file of
    # one subject re-reads that subject only.
    mpath = artefact(manifest_record)
    df = read_manifest(mpath)
    root = resolve_data_root(mpath)
    rows = df[df["subject_id"] == subject_id]
    files: list[Path] = []
    for rel in [*rows["image"], *rows["label"]]:
        try:
            full = resolve_path(root, rel, mpath) if rel else None
        except MedsynthError:
            continue  # named by the preprocessing below
        if full is not None and full.exists():
            files.append(full)
    hashes = file_hashes(sorted(set(files)), work)
    inputs = {
        "subject": subject_id,
        "rows": rows.drop(columns=["image", "label"]).to_dict("records"),
        "files": sorted(hashes.values()),
        "preprocess": preprocess,
        "lenient": lenient,
    }

    def build(tmp: Path) -> dict[str, Any]:
        slices = slices_from_manifest(rows, root, PreprocessConfig(**preprocess), manifest=str(mpath), lenient=lenient)
        slices.save(tmp / "slices.npz")
        return {"path": "slices.npz", "n": len(slices)}

    return run_stage(work, "preprocess", inputs, build)


def merge_slices(work: str, subject_records: list[dict[str, Any]]) -> dict[str, Any]:
    """Gather per-subject slices into train / val / test sets (by the manifest's patient-level split)."""
    inputs = {"subjects": sorted(r["key"] for r in subject_records)}

    def build(tmp: Path) -> dict[str, Any]:
        parts = [SliceSet.load(artefact(r)) for r in subject_records]
        parts = [p for p in parts if len(p)]
        allset = SliceSet.concat(parts)
        out: dict[str, Any] = {"counts": {}}
        for split in ("train", "val", "test"):
            sub = allset.split(split)
            sub.save(tmp / f"{split}.npz")
            out[split] = f"{split}.npz"
            out["counts"][split] = {"slices": len(sub), "subjects": int(sub.meta["subject_id"].nunique())}
        return out

    return run_stage(work, "slices", inputs, build)


def load_split(slices_record: dict[str, Any], split: str) -> SliceSet:
    return SliceSet.load(artefact(slices_record, split))


# ---- models ---------------------------------------------------------------------------------------------
def fit_model(work: str, slices_record: dict[str, Any], spec: dict[str, Any], seed: int) -> dict[str, Any]:
    """Fit one generative family on the training split (or its healthy subjects) and save it."""
    from medsynth.models.registry import create_model

    inputs = {"slices": slices_record["key"], "spec": spec, "seed": seed}
    # outside the stage's atomic folder, so a fit interrupted by a crash or Ctrl-C resumes from it
    checkpoints = Path(work) / "checkpoints" / stage_dir(work, "models", inputs).name

    def build(tmp: Path) -> dict[str, Any]:
        train = load_split(slices_record, "train")
        val = load_split(slices_record, "val")
        if spec.get("fit_on") == "healthy_train":
            train = train.subset(train.meta["pathology"].isin(HEALTHY).to_numpy())
            val = val.subset(val.meta["pathology"].isin(HEALTHY).to_numpy())
            if len(train) == 0:
                raise ConfigError(f"models[{spec['family']}].fit_on: no healthy subjects in the training split")
        model = create_model(spec["family"], spec.get("params") or {}, checkpoint_dir=checkpoints)
        report = model.fit(train, val if len(val) else None, seed=seed)
        model.save(tmp / "model")
        (tmp / "fit_report.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
        return {
            "path": "model",
            "family": model.family,
            "name": spec.get("name") or spec["family"],
            "model_hash": model.model_hash,
            "conditional": model.conditional,
            "capabilities": model.supported(),
        }

    return run_stage(work, "models", inputs, build)


def synthesize(
    work: str, model_record: dict[str, Any], slices_record: dict[str, Any], synthesis: dict[str, Any], seed: int
) -> dict[str, Any]:
    """Draw ``synthesis.n`` slices. Label-conditioned families get seeded deformations of real training labels."""
    from medsynth.models.registry import load_model

    inputs = {"model": model_record["key"], "slices": slices_record["key"], "synthesis": synthesis, "seed": seed}

    def build(tmp: Path) -> dict[str, Any]:
        model = load_model(artefact(model_record))
        n = int(synthesis["n"])
        train = load_split(slices_record, "train")
        rng = np.random.default_rng(seed)
        source_idx = rng.integers(0, len(train), size=n)
        deform = RandomLabelDeformation(**synthesis.get("labels", {}))
        labels = context = None
        if model.conditional:
            params = [deform.sample(rng) for _ in source_idx]
            labels = np.stack([p(train.labels[i]) for p, i in zip(params, source_idx, strict=True)])
            if synthesis.get("context") and model.supports("context"):
                # the same deformation on the source image keeps its real surroundings aligned with the labels
                context = np.stack(
                    [p(train.images[i, 0], order=1)[None] for p, i in zip(params, source_idx, strict=True)]
                )
        extra = {"context": context} if context is not None else {}
        samples = model.sample(n, labels=labels, seed=seed, **extra)
        has_labels = samples.labels is not None
        out_labels = samples.labels if has_labels else np.zeros((n, *samples.images.shape[2:]), np.uint8)
        meta = _synthetic_meta(train.meta.iloc[source_idx], model_record, seed, model.conditional)
        SliceSet(samples.images.astype(np.float32), out_labels.astype(np.uint8), meta).save(tmp / "synthetic.npz")
        return {
            "path": "synthetic.npz",
            "n": n,
            "has_labels": has_labels,
            "name": model_record["name"],
            "family": model.family,
        }

    return run_stage(work, "synthesis", inputs, build)


def translate_cases(
    work: str, model_record: dict[str, Any], slices_record: dict[str, Any], direction: str, seed: int
) -> dict[str, Any]:
    """The from-domain training slices translated to the to-domain, labels carried over (``translate``)."""
    from medsynth.models.registry import load_model

    inputs = {"model": model_record["key"], "slices": slices_record["key"], "direction": direction, "seed": seed}

    def build(tmp: Path) -> dict[str, Any]:
        model = load_model(artefact(model_record))
        train = load_split(slices_record, "train")
        key, src, dst, mask = model.translation_domains(train, direction)
        if not mask.any():
            raise ConfigError(f"models[{model_record['name']}]: no training slice with {key} = {src!r} to translate")
        source = train.subset(mask)
        meta = _synthetic_meta(source.meta, model_record, seed, from_labels=True)
        if key in meta.columns:
            meta[key] = dst
        meta["translated_from"] = src
        translated = model.translate(source.images, seed=seed, direction=direction)
        SliceSet(translated, source.labels, meta).save(tmp / "synthetic.npz")
        source.save(tmp / "source.npz")  # the untranslated inputs, for before / after figures
        return {
            "path": "synthetic.npz",
            "source": "source.npz",
            "n": len(source),
            "has_labels": True,
            "name": model_record["name"],
            "family": model.family,
            "domain": [key, dst],
        }

    return run_stage(work, "translation", inputs, build)


def _synthetic_meta(src: pd.DataFrame, model_record: dict[str, Any], seed: int, from_labels: bool) -> pd.DataFrame:
    """Slice metadata of a synthetic set; ``src`` holds the real source slices' rows (one per sample)."""
    src = src.reset_index(drop=True)
    name, n = model_record["name"], len(src)
    ids = [f"syn_{name}_{i:05d}" for i in range(n)]
    return pd.DataFrame(
        {
            "subject_id": ids,
            "case": ids,
            "slice_index": "0",
            "dataset": "synthetic",
            "modality": src["modality"],
            "vendor": src["vendor"],
            "phase": src["phase"],
            "pathology": src["pathology"] if from_labels else "unknown",
            "split": "train",
            "record": src["record"],
            "source": "synthetic",
            "family": model_record["family"],
            "model_hash": model_record["model_hash"],
            "seed": str(seed),
            "source_case": src["case"] if from_labels else "",
        }
    )


def scar_cases(
    work: str, model_record: dict[str, Any], slices_record: dict[str, Any], scar: dict[str, Any], seed: int
) -> dict[str, Any]:
    """New scar cases: scar inserted into the healthy myocardium of real training slices (``scar`` capability)."""
    from medsynth.labels import LV, MVO, MYO, SCAR
    from medsynth.models.registry import load_model

    inputs = {"model": model_record["key"], "slices": slices_record["key"], "scar": scar, "seed": seed}

    def build(tmp: Path) -> dict[str, Any]:
        model = load_model(artefact(model_record))
        train = load_split(slices_record, "train")
        flat = train.labels.reshape(len(train), -1)
        healthy = (flat == LV).any(1) & ((flat == MYO).sum(1) >= 20) & ~np.isin(flat, (SCAR, MVO)).any(1)
        pool = np.flatnonzero(healthy)
        if pool.size == 0:
            raise ConfigError("synthesis.scar: no training slice with healthy myocardium to insert scar into")
        rng = np.random.default_rng(seed)
        idx = rng.choice(pool, size=int(scar["n"]), replace=int(scar["n"]) > pool.size)
        samples = model.insert_scar(train.images[idx], train.labels[idx], seed=seed)
        record = {**model_record, "name": f"{model_record['name']}+scar"}
        meta = _synthetic_meta(train.meta.iloc[idx], record, seed, from_labels=True)
        meta["pathology"] = "infarct"
        SliceSet(samples.images, samples.labels, meta).save(tmp / "synthetic.npz")
        return {
            "path": "synthetic.npz",
            "n": len(idx),
            "has_labels": True,
            "name": record["name"],
            "family": model.family,
        }

    return run_stage(work, "scar_cases", inputs, build)
