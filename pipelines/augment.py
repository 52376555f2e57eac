"""The ``augment`` flow (the main job): data → slices → models → synthetic pairs → scores → dataset."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from medsynth.utils.hashing import sha256_json
from pipelines import tasks as t


@flow(name="medsynth-augment", log_prints=False, result_serializer="json")
def augment_flow(config: dict[str, Any], work: str, out: str, data_root: str | None = None) -> dict[str, Any]:
    """Run the augmentation pipeline for a resolved config (``RunConfig.model_dump()``).

    ``work`` holds the per-stage artefacts (the resumable cache), ``out`` the final ``<run_name>/`` folder.
    """
    logger = get_run_logger()
    seed = config["seed"]
    config_hash = sha256_json(config)[:16]

    manifest, slices = t.prepare_slices(config, work, data_root)
    logger.info("slices per split: %s", slices["counts"])

    models = t.run_many(
        t.fit_model, [{"work": work, "slices_record": slices, "spec": m, "seed": seed} for m in config["models"]]
    )
    synthetic = t.run_many(
        t.synthesize,
        [
            {"work": work, "model_record": m, "slices_record": slices, "synthesis": config["synthesis"], "seed": seed}
            for m in models
        ],
    )

    scar = config["synthesis"]["scar"]
    if scar["enabled"]:
        synthetic += t.run_many(
            t.scar_cases,
            [
                {"work": work, "model_record": m, "slices_record": slices, "scar": scar, "seed": seed}
                for m in models
                if "scar" in m["capabilities"]
            ],
        )

    evaluation = config["evaluation"]
    fidelity = []
    if evaluation["fidelity"]["enabled"]:
        fidelity = t.run_many(
            t.score_fidelity,
            [
                {"work": work, "slices_record": slices, "synth_record": s, "cfg": evaluation["fidelity"]}
                for s in synthetic
            ],
        )
    segmentation = []
    seg = evaluation["segmentation"]
    if seg["enabled"]:
        from medsynth.evaluation.segmentation import ratio_sweep

        labelled = [s for s in synthetic if s["has_labels"]]
        calls = []
        base = {"work": work, "slices_record": slices, "params": seg["params"]}
        # one U-Net per (arm, learning-curve point, seed, and with a ratio sweep ratio); each labelled synthetic
        # set (family) its own arms
        sweep = ratio_sweep(seg["params"])
        for arm in seg["arms"]:
            sets = [[]] if arm == "real" else [[s] for s in labelled]
            points = ["all"] if arm == "synthetic" else seg["n_real_patients"]
            ratios = sweep if arm == "real+synthetic" and sweep else [None]
            for records in sets:
                for n in points:
                    for r in ratios:
                        for s in seg["seeds"]:
                            call = {**base, "synth_records": records, "arm": arm, "seed": s, "n_real": n}
                            calls.append(call if r is None else {**call, "ratio": r})
        segmentation = t.run_many(t.segmentation_arm, calls)

    result = t.write_augment_outputs(
        work=work,
        out=out,
        config=config,
        config_hash=config_hash,
        manifest_record=manifest,
        slices_record=slices,
        model_records=models,
        synth_records=synthetic,
        fidelity_records=fidelity,
        segmentation_records=segmentation,
    )
    logger.info("wrote %s (%s cases, %s synthetic)", result["path"], result["cases"], result["synthetic_cases"])
    return result
