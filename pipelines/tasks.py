"""Prefect tasks: one per stage in :mod:`medsynth.workflows.stages`. They pass paths and small records.

Results are cached on their inputs (records carry artefact hashes, configs are plain dicts; the data step's
key also covers its input files' content) and persisted as JSON (never pickle), so a rerun reuses finished
tasks. Should a cached record point at artefacts deleted since,
:func:`resolve` runs the task again with ``refresh_cache``.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.futures import PrefectFuture

from medsynth.workflows import evaluate as ev
from medsynth.workflows import stages
from medsynth.workflows.stage import is_done
from pipelines.runtime import cache_key

# No retries: every stage is deterministic given its inputs, so a failure would only repeat. Transient
# trouble (a worker lost on a cluster) is handled by Dask resubmitting the task.
# Results are small JSON records, persisted as JSON: a rerun reads them back without unpickling anything
# (Prefect's default serializer is cloudpickle, which would run code from $PREFECT_HOME/storage).
_JSON = {"result_serializer": "json"}
_CACHED = {"cache_key_fn": cache_key, "persist_result": True, **_JSON}

prepare_manifest = task(stages.prepare_manifest, name="prepare-manifest", **_CACHED)
list_subjects = task(stages.list_subjects, name="list-subjects", **_JSON)
preprocess_subject = task(stages.preprocess_subject, name="preprocess-subject", **_CACHED)
merge_slices = task(stages.merge_slices, name="merge-slices", **_CACHED)
fit_model = task(stages.fit_model, name="fit-model", **_CACHED)
synthesize = task(stages.synthesize, name="synthesize", **_CACHED)
scar_cases = task(stages.scar_cases, name="scar-cases", **_CACHED)
translate_cases = task(stages.translate_cases, name="translate-cases", **_CACHED)
score_fidelity = task(ev.score_fidelity, name="score-fidelity", **_CACHED)
segmentation_arm = task(ev.segmentation_arm, name="segmentation-arm", **_CACHED)
score_anomaly = task(ev.score_anomaly, name="score-anomaly", **_CACHED)
anomaly_baselines = task(ev.anomaly_baselines, name="anomaly-baselines", **_CACHED)
score_translation = task(ev.score_translation, name="score-translation", **_CACHED)
write_augment_outputs = task(ev.write_augment_outputs, name="write-outputs", **_JSON)
write_anomaly_outputs = task(ev.write_anomaly_outputs, name="write-anomaly-outputs", **_JSON)
write_translate_outputs = task(ev.write_translate_outputs, name="write-translate-outputs", **_JSON)


def _resolve(future: PrefectFuture, task_obj: Any, kwargs: dict[str, Any]) -> Any:
    record = future.result()
    if isinstance(record, dict) and "dir" in record and not is_done(record):
        record = task_obj.with_options(refresh_cache=True)(**kwargs)
    return record


def run_many(task_obj: Any, calls: list[dict[str, Any]]) -> list[Any]:
    """Submit one task run per kwargs dict (fanned out on the flow's task runner); gather their records.

    A cached record whose artefacts were deleted since is rebuilt by re-running that call uncached.
    """
    futures = [task_obj.submit(**kw) for kw in calls]
    return [_resolve(f, task_obj, kw) for f, kw in zip(futures, calls, strict=True)]


def run_one(task_obj: Any, **kwargs: Any) -> Any:
    return run_many(task_obj, [kwargs])[0]


def prepare_slices(config: dict[str, Any], work: str, data_root: str | None) -> tuple[dict, dict]:
    """The data half every flow shares: manifest with splits → per-subject slices (fanned out) → split sets.

    Returns ``(manifest_record, slices_record)``."""
    manifest = run_one(prepare_manifest, work=work, data=config["data"], seed=config["seed"], data_root=data_root)
    per_subject = run_many(
        preprocess_subject,
        [
            {
                "work": work,
                "manifest_record": manifest,
                "subject_id": s,
                "preprocess": config["preprocess"],
                "lenient": config["data"]["lenient"],
            }
            for s in list_subjects(manifest)
        ],
    )
    return manifest, run_one(merge_slices, work=work, subject_records=per_subject)
