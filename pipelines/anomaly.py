"""The ``anomaly`` flow: fit on healthy subjects → score held-out scans → AUROC / Dice report."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from medsynth.utils.hashing import sha256_json
from pipelines import tasks as t


@flow(name="medsynth-anomaly", result_serializer="json")
def anomaly_flow(config: dict[str, Any], work: str, out: str, data_root: str | None = None) -> dict[str, Any]:
    """Fit every configured family that can ``score`` on the healthy training subjects, score the test split."""
    logger = get_run_logger()
    seed = config["seed"]
    manifest, slices = t.prepare_slices(config, work, data_root)
    logger.info("slices per split: %s", slices["counts"])
    specs = [{**m, "fit_on": "healthy_train"} for m in config["models"]]
    models = t.run_many(t.fit_model, [{"work": work, "slices_record": slices, "spec": m, "seed": seed} for m in specs])
    scores = t.run_many(t.score_anomaly, [{"work": work, "slices_record": slices, "model_record": m} for m in models])
    baselines = []
    if config["evaluation"]["anomaly"]["baselines"]:
        baselines = [t.run_one(t.anomaly_baselines, work=work, slices_record=slices, seed=seed)]
    result = t.write_anomaly_outputs(
        work=work,
        out=out,
        config=config,
        config_hash=sha256_json(config)[:16],
        slices_record=slices,
        score_records=scores,
        baseline_records=baselines,
    )
    logger.info("wrote %s", result["path"])
    return result
