"""The pipeline stages. Each takes paths and small JSON records and returns a record (see ``stage.py``).

Records carry artefact paths and hashes, never arrays, so an orchestrator (Prefect, Dask) can ship them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medsynth.data.manifest import load_manifest, read_manifest, resolve_data_root, write_manifest
from medsynth.data.slices import SliceSet
from medsynth.errors import ConfigError, ManifestError
from medsynth.utils.hashing import sha256_file
from medsynth.workflows import ops
from medsynth.workflows.stage import artefact, file_hashes, resolved_inputs, run_stage, stage_dir

log = logging.getLogger(__name__)


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
            two = "+" in ph["contrast"] or "+" in ph["scanner"]
            # cine+lge: different hearts per contrast (seed + k); A+B: the same hearts (same seed, same subject
            # ids, so a patient-level split keeps both scans of a heart together) under both scanners
            runs = [(c, ph["scanner"], seed + k) for k, c in enumerate(ph["contrast"].split("+"))]
            if "+" in ph["scanner"]:
                runs = [(ph["contrast"], sc, seed) for sc in ph["scanner"].split("+")]
            for contrast, scanner, run_seed in runs:
                folder = "phantom"
                if two:
                    folder = f"phantom_{contrast}" if "+" in ph["contrast"] else f"phantom_{scanner}"
                m = generate_dataset(
                    tmp / folder, subjects=ph["subjects"], contrast=contrast, scanner=scanner, seed=run_seed
                )
                part = read_manifest(m)
                if two:  # one manifest over both folders
                    part["image"], part["label"] = folder + "/" + part["image"], folder + "/" + part["label"]
                if "+" in ph["contrast"]:  # different hearts: subject ids kept apart
                    part["subject_id"] = contrast + "_" + part["subject_id"]
                parts.append(part)
            df = pd.concat(parts, ignore_index=True)
            df_root = tmp if two else Path(m).parent
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
    """Fit one generative family on the training split (or its healthy subjects) and save it
    (:func:`medsynth.workflows.ops.fit`, as ``medsynth fit`` does)."""
    from medsynth.models.registry import resolved_params
    from medsynth.workflows.commands import write_fit_report

    # the spec alone would let a fit made under an earlier default stand in for one under today's (a spec that
    # leaves out a key whose default changed hashes the same): a cached fit is checked against the resolved config
    resolved = resolved_params(spec["family"], spec.get("params"))
    inputs = {"slices": slices_record["key"], "spec": spec, "seed": seed}
    inputs = resolved_inputs(work, "models", inputs, resolved, legacy=_saved_config)
    # outside the stage's atomic folder, so a fit interrupted by a crash or Ctrl-C resumes from it
    checkpoints = Path(work) / "checkpoints" / stage_dir(work, "models", inputs).name

    def build(tmp: Path) -> dict[str, Any]:
        fit_on = spec.get("fit_on") or "train"
        train = ops.fit_set(load_split(slices_record, "train"), fit_on)
        val = ops.fit_set(load_split(slices_record, "val"), fit_on)
        if len(train) == 0:
            raise ConfigError(f"models[{spec['family']}].fit_on: no healthy subjects in the training split")
        model, report = ops.fit(spec["family"], spec.get("params") or {}, train, val, seed, checkpoints)
        model.save(tmp / "model")
        record = ops.fit_record(model, report, seed, fit_on=fit_on, n_train_slices=len(train), n_val_slices=len(val))
        write_fit_report(tmp, record)
        return {
            "path": "model",
            "family": model.family,
            "name": spec.get("name") or spec["family"],
            "model_hash": model.model_hash,
            "conditional": model.conditional,
            "capabilities": model.supported(),
        }

    return run_stage(work, "models", inputs, build, resolved=resolved)


def _saved_config(record: dict[str, Any]) -> dict[str, Any] | None:
    """The config a fit recorded before stage records carried ``resolved``: that of the saved model as it loads
    (keys added to a family since take the value its loader gives a model saved without them, e.g.
    ``surroundings: none``), runtime keys left out; None when it does not load."""
    from medsynth.errors import MedsynthError
    from medsynth.models.base import RUNTIME_CONFIG_KEYS
    from medsynth.models.registry import load_model

    try:
        config = load_model(artefact(record)).config.model_dump(mode="json")
    except (MedsynthError, OSError, ValueError):
        return None
    return {k: v for k, v in config.items() if k not in RUNTIME_CONFIG_KEYS}


def synthesize(
    work: str, model_record: dict[str, Any], slices_record: dict[str, Any], synthesis: dict[str, Any], seed: int
) -> dict[str, Any]:
    """Draw ``synthesis.n`` slices (:func:`medsynth.workflows.ops.synthesize`). Label-conditioned families get
    seeded deformations of real training labels."""
    from medsynth.models.registry import load_model

    deformation = dict(synthesis.get("labels") or {})
    scar_fraction = float(deformation.pop("scar_fraction", 0.0) or 0.0)
    keyed = synthesis
    if "labels" in synthesis and not scar_fraction:
        # scar_fraction 0 (off) is left out of the key, so caches written before the key existed stay valid
        keyed = {**synthesis, "labels": deformation}
    inputs = {"model": model_record["key"], "slices": slices_record["key"], "synthesis": keyed, "seed": seed}

    def build(tmp: Path) -> dict[str, Any]:
        model = load_model(artefact(model_record))
        synthetic, has_labels = ops.synthesize(
            model,
            load_split(slices_record, "train"),
            int(synthesis["n"]),
            seed,
            name=model_record["name"],
            deformation=deformation,
            scar_fraction=scar_fraction,
            context=bool(synthesis.get("context")),
        )
        synthetic.save(tmp / "synthetic.npz")
        return {
            "path": "synthetic.npz",
            "n": len(synthetic),
            "has_labels": has_labels,
            "name": model_record["name"],
            "family": model.family,
            # e.g. the label maps a plausibility filter rejected on the way to these n (the report says it)
            "sample_report": dict(model.last_sample_report),
        }

    return run_stage(work, "synthesis", inputs, build)


def translate_cases(
    work: str, model_record: dict[str, Any], slices_record: dict[str, Any], direction: str, seed: int
) -> dict[str, Any]:
    """The from-domain training slices translated to the to-domain, labels carried over
    (:func:`medsynth.workflows.ops.translate`)."""
    from medsynth.models.registry import load_model

    inputs = {"model": model_record["key"], "slices": slices_record["key"], "direction": direction, "seed": seed}

    def build(tmp: Path) -> dict[str, Any]:
        model = load_model(artefact(model_record))
        try:
            translated, source = ops.translate(
                model, load_split(slices_record, "train"), direction, seed, name=model_record["name"]
            )
        except ManifestError as err:
            raise ConfigError(f"models[{model_record['name']}]: training split: {err}") from None
        translated.save(tmp / "synthetic.npz")
        source.save(tmp / "source.npz")  # the untranslated inputs, for before / after figures
        key, _, dst, _ = model.translation_domains(source, direction)
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


def scar_cases(
    work: str, model_record: dict[str, Any], slices_record: dict[str, Any], scar: dict[str, Any], seed: int
) -> dict[str, Any]:
    """New scar cases: scar inserted into the healthy myocardium of real training slices
    (:func:`medsynth.workflows.ops.scar_cases`)."""
    from medsynth.models.registry import load_model

    inputs = {"model": model_record["key"], "slices": slices_record["key"], "scar": scar, "seed": seed}

    def build(tmp: Path) -> dict[str, Any]:
        model = load_model(artefact(model_record))
        name = f"{model_record['name']}+scar"
        try:
            cases = ops.scar_cases(model, load_split(slices_record, "train"), int(scar["n"]), seed, name=name)
        except ManifestError as err:
            raise ConfigError(f"synthesis.scar: training split: {err}") from None
        cases.save(tmp / "synthetic.npz")
        return {"path": "synthetic.npz", "n": len(cases), "has_labels": True, "name": name, "family": model.family}

    return run_stage(work, "scar_cases", inputs, build)
