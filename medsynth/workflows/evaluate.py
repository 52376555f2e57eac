"""Scoring and output stages of the flows: fidelity, segmentation arms, anomaly scores, reports."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medsynth.data.slices import SliceSet
from medsynth.workflows import ops
from medsynth.workflows.outputs import write_report_outputs, write_run_outputs
from medsynth.workflows.stage import artefact, run_stage
from medsynth.workflows.stages import load_split

log = logging.getLogger(__name__)


def _reference_split(slices_record: dict[str, Any]) -> SliceSet:
    """Held-out real slices for comparisons: the test split (val when test is empty)."""
    test = load_split(slices_record, "test")
    return test if len(test) else load_split(slices_record, "val")


# ---- augment: fidelity, memorisation, segmentation -------------------------------------------------------
def score_fidelity(
    work: str, slices_record: dict[str, Any], synth_record: dict[str, Any], cfg: dict[str, Any]
) -> dict[str, Any]:
    """FD/rFD/KID/PRDC/MS-SSIM of a synthetic set against held-out real slices, plus the memorisation check."""
    from medsynth.evaluation.features import get_extractor
    from medsynth.evaluation.fidelity import FidelityConfig

    inputs = {"slices": slices_record["key"], "synthetic": synth_record["key"], "cfg": cfg}

    def build(tmp: Path) -> dict[str, Any]:
        real_test = _reference_split(slices_record)
        synth = SliceSet.load(artefact(synth_record))
        table, _ = ops.fidelity_table(
            real_test,
            synth,
            get_extractor(cfg["extractor"]),
            FidelityConfig(n_bootstrap=cfg["bootstrap"]),
            real_train=load_split(slices_record, "train"),
            real_test=real_test,
        )
        table.insert(0, "model", synth_record["name"])
        table.insert(1, "family", synth_record["family"])
        table.to_csv(tmp / "fidelity.csv", index=False)
        return {"path": "fidelity.csv", "name": synth_record["name"]}

    return run_stage(work, "fidelity", inputs, build)


def segmentation_arm(
    work: str,
    slices_record: dict[str, Any],
    synth_records: list[dict[str, Any]],
    arm: str,
    seed: int,
    params: dict[str, Any],
) -> dict[str, Any]:
    """Train one U-Net (one arm, one seed) and evaluate it per patient on the held-out real test split."""
    from medsynth.config import validate
    from medsynth.evaluation.segmentation import SegmentationConfig, run_segmentation_protocol

    inputs = {
        "slices": slices_record["key"],
        "synthetic": sorted(r["key"] for r in synth_records),
        "arm": arm,
        "seed": seed,
        "params": params,
    }

    def build(tmp: Path) -> dict[str, Any]:
        cfg = validate(SegmentationConfig, {**params, "arms": [arm], "seeds": [seed]}, "evaluation.segmentation")
        train = load_split(slices_record, "train")
        test = _reference_split(slices_record)
        synth = SliceSet.concat([SliceSet.load(artefact(r)) for r in synth_records]) if synth_records else None
        per_case = run_segmentation_protocol(train, test, synth, cfg)
        per_case.to_csv(tmp / "per_case.csv", index=False)
        return {"path": "per_case.csv", "arm": arm, "seed": seed}

    return run_stage(work, "segmentation", inputs, build)


def _sample_grid(
    real: SliceSet, synth_sets: list[tuple[str, SliceSet]], path: Path, n: int = 6, first: str = "real"
) -> Path:
    """Rows: real slices (titled ``first``), then each synthetic set; label contours overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(first, real)] + synth_sets
    fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n, 1.7 * len(rows)), squeeze=False)
    for r, (name, s) in enumerate(rows):
        idx = np.linspace(0, max(len(s) - 1, 0), n).astype(int) if len(s) else []
        for c in range(n):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(idx):
                i = idx[c]
                # slices are stored in display orientation (rows = H, columns = W)
                ax.imshow(s.images[i, 0], cmap="gray", vmin=0, vmax=1.2)
                if s.labels[i].any():
                    ax.contour(s.labels[i], levels=np.arange(0.5, 6), linewidths=0.5, cmap="autumn")
        axes[r, 0].set_title(name, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _markdown_table(df: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        cells = [floatfmt.format(v) if isinstance(v, float | np.floating) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _report_head(
    title: str,
    config: dict[str, Any],
    config_hash: str,
    manifest_record: dict[str, Any],
    slices_record: dict[str, Any],
    model_records: list[dict[str, Any]],
) -> list[str]:
    """First report lines of a run: name, config hash, seed, data, split sizes and the fitted models."""
    models = [{"name": m["name"], "family": m["family"], "model_hash": m["model_hash"]} for m in model_records]
    return [
        f"# medsynth {title} `{config['run_name']}`",
        "",
        f"Config hash `{config_hash}`, seed {config['seed']}, data source `{config['data']['source']}`.",
        f"Subjects per split: {manifest_record['subjects']}; slices per split: {slices_record['counts']}.",
        "",
        "## Models",
        _markdown_table(pd.DataFrame(models)),
    ]


def write_augment_outputs(
    work: str,
    out: str,
    config: dict[str, Any],
    config_hash: str,
    manifest_record: dict[str, Any],
    slices_record: dict[str, Any],
    model_records: list[dict[str, Any]],
    synth_records: list[dict[str, Any]],
    fidelity_records: list[dict[str, Any]],
    segmentation_records: list[dict[str, Any]],
) -> dict[str, Any]:
    """Aggregate metrics, draw figures, write the report and the dataset (atomically) and publish artifacts."""
    from medsynth.evaluation.segmentation import per_seed_table, summarise

    staging = Path(work) / "report"
    staging.mkdir(parents=True, exist_ok=True)
    tables: dict[str, str] = {}
    sections = _report_head("run", config, config_hash, manifest_record, slices_record, model_records)
    summary_for_artifact: pd.DataFrame | None = None
    if fidelity_records:
        fid = pd.concat([pd.read_csv(artefact(r)) for r in fidelity_records], ignore_index=True)
        fid.to_csv(staging / "fidelity.csv", index=False)
        tables["fidelity"] = str(staging / "fidelity.csv")
        sections += ["", "## Fidelity (synthetic vs held-out real)", _markdown_table(fid)]
    if segmentation_records:
        per_case = pd.concat([pd.read_csv(artefact(r)) for r in segmentation_records], ignore_index=True)
        from medsynth.evaluation.segmentation import split_timings

        # wall-clock seconds go beside the run folder (work/timings.csv): the run folder stays byte-identical
        results, timings = split_timings(per_case)
        results.to_csv(staging / "segmentation_per_case.csv", index=False)
        timings.to_csv(Path(work) / "timings.csv", index=False)
        seg = per_seed_table(per_case)
        seg.to_csv(staging / "segmentation.csv", index=False)
        summary = summarise(per_case, seed=config["seed"])
        summary.to_csv(staging / "segmentation_summary.csv", index=False)
        tables.update(
            segmentation_per_case=str(staging / "segmentation_per_case.csv"),
            segmentation=str(staging / "segmentation.csv"),
            segmentation_summary=str(staging / "segmentation_summary.csv"),
        )
        summary_for_artifact = summary
        sections += ["", "## Downstream segmentation (held-out real test patients)", _markdown_table(summary)]
    real = _reference_split(slices_record)
    synth_sets = [(r["name"], SliceSet.load(artefact(r))) for r in synth_records]
    grid = _sample_grid(real, synth_sets, staging / "samples.png")
    sections += ["", "## Samples", "![real vs synthetic](figures/samples.png)", ""]
    report = "\n".join(sections) + "\n"
    result = write_run_outputs(
        out, config["run_name"], config, config_hash, slices_record, synth_records, tables, report, [str(grid)]
    )
    _publish_artifacts(config["run_name"], report, summary_for_artifact, grid)
    return result


# ---- translate: appearance and anatomy before / after translation -------------------------------------
def score_translation(
    work: str, slices_record: dict[str, Any], model_record: dict[str, Any], cfg: dict[str, Any], seed: int
) -> dict[str, Any]:
    """FD to the real target test slices and target-U-Net Dice on the source test slices, before and after
    translation (:func:`medsynth.evaluation.translation.evaluate_translation`)."""
    from medsynth.evaluation.translation import TranslationEvalConfig, evaluate_translation
    from medsynth.models.registry import load_model

    inputs = {"slices": slices_record["key"], "model": model_record["key"], "cfg": cfg, "seed": seed}

    def build(tmp: Path) -> dict[str, Any]:
        model = load_model(artefact(model_record))
        params = {k: v for k, v in cfg.items() if k != "enabled"}
        train, test = load_split(slices_record, "train"), _reference_split(slices_record)
        table, _ = evaluate_translation(model, train, test, TranslationEvalConfig(**params), seed)
        table.insert(0, "model", model_record["name"])
        table.to_csv(tmp / "translation_metrics.csv", index=False)
        return {"path": "translation_metrics.csv", "name": model_record["name"]}

    return run_stage(work, "translation_metrics", inputs, build)


def write_translate_outputs(
    work: str,
    out: str,
    config: dict[str, Any],
    config_hash: str,
    manifest_record: dict[str, Any],
    slices_record: dict[str, Any],
    model_records: list[dict[str, Any]],
    translated_records: list[dict[str, Any]],
    metric_records: list[dict[str, Any]],
) -> dict[str, Any]:
    """``OUT/<run_name>/``: the target domain's real training cases plus the translated source training slices
    (nnU-Net raw + manifest), metrics/translation_metrics.csv, report with a before / after grid."""
    staging = Path(work) / "report"
    staging.mkdir(parents=True, exist_ok=True)
    tables: dict[str, str] = {}
    sections = _report_head("translate run", config, config_hash, manifest_record, slices_record, model_records)
    if metric_records:
        metrics = pd.concat([pd.read_csv(artefact(r)) for r in metric_records], ignore_index=True)
        metrics.to_csv(staging / "translation_metrics.csv", index=False)
        tables["translation_metrics"] = str(staging / "translation_metrics.csv")
        sections += [
            "",
            "## Translation (held-out test patients; before = as acquired, after = translated)",
            "FD against the real target-domain test slices; Dice of a U-Net trained on real target-domain training",
            "slices, against the source labels.",
            "",
            _markdown_table(metrics),
        ]
    key, dst = translated_records[0]["domain"]
    source = SliceSet.load(artefact(translated_records[0], "source"))
    sets = [(f"{r['name']} (translated)", SliceSet.load(artefact(r))) for r in translated_records]
    # paired domains (the phantom's scanner A / B): the true target-domain slice of each source slice, last row
    from medsynth.evaluation.translation import paired_targets

    train, truth = load_split(slices_record, "train"), None
    if key in train.meta:
        truth = paired_targets(source, train.subset(train.meta[key].astype(str).str.strip().str.lower() == dst))
        if truth is not None:
            sets.append(("true target (same slice, target domain)", truth))
    grid = _sample_grid(source, sets, staging / "samples.png", first="source")
    below = "the same slices translated" + ("; last row: their true target-domain slices" if truth is not None else "")
    sections += ["", f"## Samples (top: source training slices; below: {below})", ""]
    sections += ["![source vs translated](figures/samples.png)", ""]
    report = "\n".join(sections) + "\n"
    result = write_run_outputs(
        out, config["run_name"], config, config_hash, slices_record, translated_records, tables, report, [str(grid)],
        real_domain=(key, dst),
    )  # fmt: skip
    _publish_artifacts(config["run_name"], report, None, grid)
    return result


def _publish_artifacts(run_name: str, report: str, summary: pd.DataFrame | None, grid: Path | None = None) -> None:
    """Prefect UI artifacts (the report as markdown with the sample grid inlined, the metric summary as a
    table); no-op outside a Prefect run."""
    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact
        from prefect.context import get_run_context

        get_run_context()
    except Exception:  # not inside a Prefect run: nothing to publish
        return
    key = "".join(c if c.isalnum() else "-" for c in run_name.lower())
    if grid is not None and grid.is_file():
        # the UI cannot reach files on the worker: inline the figure
        b64 = base64.b64encode(grid.read_bytes()).decode()
        report = report.replace("(figures/samples.png)", f"(data:image/png;base64,{b64})")
    create_markdown_artifact(markdown=report, key=f"{key}-report", description="medsynth run report")
    if summary is not None:
        records = json.loads(summary.to_json(orient="records"))
        create_table_artifact(table=records, key=f"{key}-segmentation", description="segmentation summary")


# ---- anomaly ---------------------------------------------------------------------------------------------
def score_anomaly(work: str, slices_record: dict[str, Any], model_record: dict[str, Any]) -> dict[str, Any]:
    """Score the held-out test split with a model fitted on healthy training subjects."""
    from medsynth.evaluation.anomaly import comparison_table, has_scar_info, score_model, slice_table, subject_table
    from medsynth.models.registry import load_model

    inputs = {"slices": slices_record["key"], "model": model_record["key"]}

    def build(tmp: Path) -> dict[str, Any]:
        model = load_model(artefact(model_record))
        test = _reference_split(slices_record)
        scores = score_model(model, test)
        sdf = slice_table(test, scores)
        sdf.to_csv(tmp / "slice_scores.csv", index=False)
        subject_table(sdf).to_csv(tmp / "subject_scores.csv", index=False)
        out = {"path": "slice_scores.csv", "subjects": "subject_scores.csv", "name": model_record["name"]}
        if has_scar_info(test):
            table = comparison_table({model_record["name"]: scores}, test, include_baselines=False)
            table.to_csv(tmp / "metrics.csv", index=False)
            out["metrics"] = "metrics.csv"
        return out

    return run_stage(work, "anomaly", inputs, build)


def anomaly_baselines(work: str, slices_record: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """n-SD (2, 3, 5), FWHM and the thresholded scar score of the registry's default scar family (fitted on
    the labelled training split, when it holds scar) on the test split."""
    from medsynth.evaluation.anomaly import BASELINE_THRESHOLD, baseline_scores, evaluate_scores, has_scar_info
    from medsynth.models.registry import default_family

    inputs = {"slices": slices_record["key"], "seed": seed}

    def build(tmp: Path) -> dict[str, Any]:
        test = _reference_split(slices_record)
        train = load_split(slices_record, "train")
        scar_model = ops.fit(default_family("scar"), None, train, seed=seed)[0] if has_scar_info(train) else None
        rows = [
            evaluate_scores(test, scores, name, threshold=BASELINE_THRESHOLD)
            for name, scores in baseline_scores(test, scar_model).items()
        ]
        pd.DataFrame(rows).to_csv(tmp / "metrics.csv", index=False)
        return {"path": "metrics.csv", "metrics": "metrics.csv", "name": "baselines"}

    return run_stage(work, "anomaly_baselines", inputs, build)


def write_anomaly_outputs(
    work: str,
    out: str,
    config: dict[str, Any],
    config_hash: str,
    slices_record: dict[str, Any],
    score_records: list[dict[str, Any]],
    baseline_records: list[dict[str, Any]],
) -> dict[str, Any]:
    """``OUT/<run_name>/``: metrics/anomaly_metrics.csv (one row per method), per-model scores, report."""
    staging = Path(work) / "report"
    staging.mkdir(parents=True, exist_ok=True)
    tables: dict[str, str] = {}
    metric_parts = [pd.read_csv(artefact(r, "metrics")) for r in score_records + baseline_records if "metrics" in r]
    sections = [
        f"# medsynth anomaly run `{config['run_name']}`",
        "",
        f"Config hash `{config_hash}`, seed {config['seed']}. Models fitted on healthy training subjects;",
        f"scored on the held-out test split ({slices_record['counts']['test']}).",
    ]
    if metric_parts:
        metrics = pd.concat(metric_parts, ignore_index=True)
        metrics.to_csv(staging / "anomaly_metrics.csv", index=False)
        tables["anomaly_metrics"] = str(staging / "anomaly_metrics.csv")
        sections += ["", "## Scar detection (slice / case AUROC, pixel AUPRC / Dice)", _markdown_table(metrics)]
    for r in score_records:
        for key in ("path", "subjects"):
            dest = staging / f"{r['name']}_{'slice' if key == 'path' else 'subject'}_scores.csv"
            dest.write_bytes(artefact(r, key).read_bytes())
            tables[dest.stem] = str(dest)
    report = "\n".join(sections) + "\n"
    result = write_report_outputs(out, config["run_name"], config, tables, report, [])
    _publish_artifacts(config["run_name"], report, None)
    return result
