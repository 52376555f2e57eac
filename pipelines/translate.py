"""The ``translate`` flow: two domains → fit a translation family → translate the source training slices
(labels carried over) → before / after metrics on the held-out test patients → target-domain dataset."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from medsynth.errors import ConfigError
from medsynth.utils.hashing import sha256_json
from pipelines import tasks as t


@flow(name="medsynth-translate", result_serializer="json")
def translate_flow(config: dict[str, Any], work: str, out: str, data_root: str | None = None) -> dict[str, Any]:
    """Fit every configured family (each must declare ``translate``), translate and score, write the run."""
    logger = get_run_logger()
    seed = config["seed"]
    manifest, slices = t.prepare_slices(config, work, data_root)
    logger.info("slices per split: %s", slices["counts"])
    models = t.run_many(
        t.fit_model, [{"work": work, "slices_record": slices, "spec": m, "seed": seed} for m in config["models"]]
    )
    unable = [m["name"] for m in models if "translate" not in m["capabilities"]]
    if unable:
        raise ConfigError(
            f"models: {unable} cannot translate; the translate flow needs e.g. family 'cyclegan', 'cut' or 'fastcut'"
        )
    stage_cfg = config["evaluation"]["translation"]
    direction = stage_cfg["direction"]
    translated = t.run_many(
        t.translate_cases,
        [
            {"work": work, "model_record": m, "slices_record": slices, "direction": direction, "seed": seed}
            for m in models
        ],
    )
    metrics = []
    if stage_cfg["enabled"]:
        metrics = t.run_many(
            t.score_translation,
            [
                {"work": work, "slices_record": slices, "model_record": m, "cfg": stage_cfg, "seed": seed}
                for m in models
            ],
        )
    result = t.write_translate_outputs(
        work=work,
        out=out,
        config=config,
        config_hash=sha256_json(config)[:16],
        manifest_record=manifest,
        slices_record=slices,
        model_records=models,
        translated_records=translated,
        metric_records=metrics,
    )
    logger.info("wrote %s (%s cases, %s translated)", result["path"], result["cases"], result["synthetic_cases"])
    return result
