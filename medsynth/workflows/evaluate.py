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
from medsynth.workflows.stage import artefact, resolved_inputs, run_stage
from medsynth.workflows.stages import load_split

log = logging.getLogger(__name__)


def _reference_split(slices_record: dict[str, Any]) -> SliceSet:
    """Held-out real slices for comparisons: the test split (val when test is empty)."""
    test = load_split(slices_record, "test")
    return test if len(test) else load_split(slices_record, "val")


def comparison_slices(real: SliceSet, n: int = 6) -> SliceSet:
    """``n`` held-out slices for the same-label-maps figure: slices with an LV blood pool and myocardium,
    spread over the split's order (patients, then slice position); half of them with scar when the split
    has scar (LGE), so the scar rendering shows."""
    from medsynth.labels import LV, MVO, MYO, SCAR

    heart = np.flatnonzero((real.labels == LV).any(axis=(1, 2)) & (real.labels == MYO).any(axis=(1, 2)))
    if len(heart) == 0:
        return real.subset(np.arange(min(n, len(real))))
    scarred = np.isin(real.labels[heart], (SCAR, MVO)).any(axis=(1, 2))
    groups = [heart[scarred], heart[~scarred]] if scarred.any() and (~scarred).any() else [heart]
    take, left = [], n
    for k, g in enumerate(groups):
        m = min(len(g), left if k == len(groups) - 1 else n // len(groups))
        take += g[np.linspace(0, len(g) - 1, m).astype(int)].tolist() if m else []
        left = n - len(take)
    return real.subset(np.asarray(sorted(set(take)), dtype=int))


def render_same_labels(real: SliceSet, model_records: list[dict[str, Any]], seed: int) -> list[tuple[str, SliceSet]]:
    """Each fitted label-conditioned family that can ``sample`` renders the label maps of ``real`` (held-out
    slices, images (N, 1, H, W), labels (N, H, W)): one SliceSet per family, images (N, 1, H, W) on the slice
    scale with ``real``'s labels and metadata, so a figure shows the same anatomy as real and per family."""
    from medsynth.models.registry import load_model

    rendered = []
    for record in model_records:
        model = load_model(artefact(record))
        if not (model.conditional and model.supports("sample")):
            continue
        samples = model.sample(len(real), real.labels, seed=seed)
        rendered.append((record["name"], SliceSet(samples.images.astype(np.float32), real.labels, real.meta)))
    return rendered


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
    n_real: int | str = "all",
    ratio: float | None = None,
) -> dict[str, Any]:
    """Train one U-Net (one arm kind, one learning-curve point ``n_real``, one seed) and evaluate it per
    patient on the held-out real test split. Each synthetic record is one named set (``real+<name>``).
    ``ratio``: with a ratio sweep in ``params`` (``synthetic_ratio`` a list), the one ratio this call trains
    (the arm is named with it, ``real+<name> x<ratio>``); None trains every configured ratio."""
    from medsynth.config import validate
    from medsynth.evaluation.segmentation import SegmentationConfig, run_segmentation_protocol

    inputs = {
        "slices": slices_record["key"],
        "synthetic": sorted(r["key"] for r in synth_records),
        "arm": arm,
        "seed": seed,
        "n_real": n_real,
        "params": params,
    }
    if ratio is not None:  # only then: the cache keys of runs without a sweep stay what they were
        inputs["ratio"] = float(ratio)
    # the protocol with its defaults filled in (the list keys are this call's own): a U-Net trained under a
    # default that has since changed is not reused (records from before this check carry none and are kept)
    resolved = validate(SegmentationConfig, params, "evaluation.segmentation").model_dump(mode="json")
    resolved = {k: v for k, v in resolved.items() if k not in ("arms", "seeds", "n_real_patients")}
    inputs = resolved_inputs(work, "segmentation", inputs, resolved)

    def build(tmp: Path) -> dict[str, Any]:
        cfg = validate(
            SegmentationConfig,
            {**params, "arms": [arm], "seeds": [seed], "n_real_patients": [n_real]},
            "evaluation.segmentation",
        )
        train = load_split(slices_record, "train")
        test = _reference_split(slices_record)
        synth = {r["name"]: SliceSet.load(artefact(r)) for r in synth_records} or None
        only = None if ratio is None else [float(ratio)]
        per_case = run_segmentation_protocol(train, test, synth, cfg, only_ratios=only)
        per_case.to_csv(tmp / "per_case.csv", index=False)
        return {"path": "per_case.csv", "arm": arm, "seed": seed, "n_real": n_real}

    return run_stage(work, "segmentation", inputs, build, resolved=resolved)


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


def _protocol_lines(seg_stage: dict[str, Any], per_case: pd.DataFrame, n_test: int) -> tuple[list[str], pd.DataFrame]:
    """The protocol in words (for the report) and as a one-row table (``metrics/segmentation_protocol.csv``)."""
    from medsynth.evaluation.segmentation import SegmentationConfig

    cfg = SegmentationConfig(**seg_stage["params"])
    aug = cfg.augmentation
    aug_text = (
        f"rotation ±{aug.rotate_deg:g}°, zoom ±{aug.zoom:.0%}, shift ±{aug.shift:g} (normalised coordinates), "
        f"intensity ×(1 ± {aug.intensity_scale:g}) + (± {aug.intensity_offset:g}), "
        + ("left-right flips" if aug.flip else "no flips (a mirrored slice puts the RV on the wrong side)")
        if cfg.augment
        else "none"
    )
    mixed = per_case[per_case["arm_kind"] == "real+synthetic"]
    share = mixed["synthetic_batch_fraction"]
    ratios = cfg.ratios()
    # a sweep: the measured share per ratio (one pooled mean over the ratios would describe no arm)
    by_ratio = (
        mixed.groupby("synthetic_ratio")["synthetic_batch_fraction"].mean()
        if cfg.sweep and "synthetic_ratio" in mixed
        else pd.Series(dtype=float)
    )
    expected = ", ".join(f"{cfg.synthetic_share(r):.0%}" for r in ratios)
    if cfg.mixing == "per_batch":
        mix = f"a fixed {cfg.synthetic_batch_share:.0%} of every batch"
    else:
        mix = f"pooled with the real slices and drawn uniformly (expected synthetic share of a batch {expected})"
        if cfg.mixing == "weighted":
            mix += (
                f", each synthetic slice's loss weighted {cfg.synthetic_weight:g} times a real one's (the batch "
                "loss is the weighted mean of the per-slice losses)"
            )
    ratio_text = (
        f"Synthetic slices: {ratios[0]:g} per real slice, {mix}"
        if not cfg.sweep
        else f"Synthetic ratio sweep: one real+synthetic arm per ratio {', '.join(f'{r:g}' for r in ratios)} "
        f"synthetic slices per real slice (arm names end in x<ratio>), {mix}"
    )
    lines = [
        f"Each arm trains a 2-D MONAI U-Net (channels {list(cfg.channels)}, DiceCE loss, Adam, {cfg.iterations} "
        f"steps of batch {cfg.batch_size}, {cfg.image_size}² px{', heart ROI' if cfg.roi == 'heart' else ''}) "
        f"and is scored per test patient volume in 3-D on {n_test} held-out real test volumes; seeds "
        f"{seg_stage['seeds']}. Real training patients per learning-curve point: "
        f"{', '.join(str(n) for n in seg_stage['n_real_patients'])} (nested: every seed orders the training "
        "patients once at random and takes the first n; no test patient is ever trained on).",
        ratio_text
        + (
            f"; measured synthetic share of the batches {', '.join(f'{v:.0%}' for v in by_ratio)}."
            if len(by_ratio)
            else f"; measured synthetic share of the batches {share.mean():.0%}."
            if len(share)
            else "."
        ),
        f"Standard augmentation in every arm, real-only included: {aug_text}.",
        "Dice is a fraction (0–1) averaged over LV, MYO and RV; differences are in Dice points (1 point = 0.01), "
        "paired with real-only at the same number of real patients (per test patient, averaged over seeds; "
        "the synthetic-only arm against real-only with all patients), with a bootstrap CI over test patients.",
    ]
    table = pd.DataFrame(
        [
            {
                "iterations": cfg.iterations,
                "batch_size": cfg.batch_size,
                "image_size": cfg.image_size,
                "roi": cfg.roi,
                "seeds": json.dumps(seg_stage["seeds"]),
                "n_real_patients": json.dumps(seg_stage["n_real_patients"]),
                # one ratio: the number; a sweep: the JSON list of ratios
                "synthetic_ratio": ratios[0] if not cfg.sweep else json.dumps(ratios),
                "mixing": cfg.mixing,
                "synthetic_weight": cfg.effective_weight(),
                "synthetic_batch_share_expected": (
                    cfg.synthetic_share() if not cfg.sweep else json.dumps([cfg.synthetic_share(r) for r in ratios])
                ),
                "synthetic_batch_share_measured": (
                    json.dumps([float(v) for v in by_ratio])
                    if len(by_ratio)
                    else float(share.mean())
                    if len(share)
                    else float("nan")
                ),
                "augment": cfg.augment,
                "augmentation": json.dumps(aug.model_dump(), sort_keys=True),
            }
        ]
    )
    return lines, table


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
    """Aggregate metrics, draw figures, write the report and the dataset (atomically) and publish artifacts.

    The report has a paragraph per section written from the numbers (:mod:`medsynth.evaluation.report`),
    the learning curve (``figures/learning_curve.png``) and the samples of every set side by side
    (``figures/samples.png``)."""
    from medsynth.evaluation import report as rp
    from medsynth.evaluation.segmentation import per_seed_table, reach_statements, split_timings, summarise

    staging = Path(work) / "report"
    staging.mkdir(parents=True, exist_ok=True)
    tables: dict[str, str] = {}
    figures: list[str] = []
    sections = _report_head("run", config, config_hash, manifest_record, slices_record, model_records)
    filtered = [(r["name"], r["sample_report"]) for r in synth_records if "rejected" in (r.get("sample_report") or {})]
    if filtered:
        sections += ["", "## Generated label maps", "", *[rp.rejection_line(name, rep) for name, rep in filtered]]
    summary_for_artifact: pd.DataFrame | None = None
    if fidelity_records:
        fid = pd.concat([pd.read_csv(artefact(r)) for r in fidelity_records], ignore_index=True)
        fid.to_csv(staging / "fidelity.csv", index=False)
        tables["fidelity"] = str(staging / "fidelity.csv")
        extractors = ", ".join(sorted(set(fid["extractor"].astype(str))))
        explained = rp.FIDELITY_EXPLAINED
        sections += [
            "",
            "## Fidelity (synthetic vs held-out real)",
            "",
            rp.fidelity_paragraph(fid),
            "",
            f"One column per synthetic set: value [95 % bootstrap CI]; features: {extractors}.",
            "",
            _markdown_table(rp.fidelity_side_by_side(fid)),
            "",
            "What the metrics mean:",
            "",
            *[f"- **{m}**: {rp.FIDELITY_EXPLAINED[m]}" for m in dict.fromkeys(fid["metric"]) if m in explained],
        ]
    if segmentation_records:
        per_case = pd.concat([pd.read_csv(artefact(r)) for r in segmentation_records], ignore_index=True)
        # wall-clock seconds go beside the run folder (work/timings.csv): the run folder stays byte-identical
        results, timings = split_timings(per_case)
        results.to_csv(staging / "segmentation_per_case.csv", index=False)
        timings.to_csv(Path(work) / "timings.csv", index=False)
        seg = per_seed_table(per_case)
        seg.to_csv(staging / "segmentation.csv", index=False)
        summary = summarise(per_case, seed=config["seed"])
        summary.to_csv(staging / "segmentation_summary.csv", index=False)
        reach = reach_statements(summary)
        pd.DataFrame(reach).to_csv(staging / "learning_curve_reach.csv", index=False)
        seg_stage = config["evaluation"]["segmentation"]
        protocol_lines, protocol = _protocol_lines(seg_stage, per_case, per_case["case"].nunique())
        protocol.to_csv(staging / "segmentation_protocol.csv", index=False)
        tables.update(
            segmentation_per_case=str(staging / "segmentation_per_case.csv"),
            segmentation=str(staging / "segmentation.csv"),
            segmentation_summary=str(staging / "segmentation_summary.csv"),
            learning_curve_reach=str(staging / "learning_curve_reach.csv"),
            segmentation_protocol=str(staging / "segmentation_protocol.csv"),
        )
        summary_for_artifact = summary
        units = per_case["hd95_unit"].dropna().unique()
        unit = str(units[0]) if len(units) == 1 else "mm or px"
        curve_png = rp.plot_learning_curve(summary, staging / "learning_curve.png")
        figures.append(str(curve_png))
        curve_tab, class_tab = rp.segmentation_tables(summary, unit)
        sections += [
            "",
            "## Downstream segmentation (held-out real test patients)",
            "",
            *[line for p in protocol_lines for line in (p, "")],
            rp.segmentation_paragraph(summary, unit),
            "",
            "### Learning curve",
            "",
            "![learning curve: mean Dice against real training patients](figures/learning_curve.png)",
            "",
            rp.reach_paragraph(reach),
            "",
            _markdown_table(curve_tab),
            "",
            f"### Per class (Dice as a fraction, HD95 in {unit})",
            "",
            _markdown_table(class_tab),
        ]
    real = _reference_split(slices_record)
    synth_sets = [(r["name"], SliceSet.load(artefact(r))) for r in synth_records]
    grid = rp.plot_samples(real, synth_sets, staging / "samples.png")
    figures.insert(0, str(grid))
    sections += [
        "",
        "## Samples",
        "",
        "Top row: held-out real slices; below, one row per synthetic set, side by side; labels drawn as thin "
        "contours (legend below the figure).",
        "",
        "![real vs synthetic](figures/samples.png)",
        "",
    ]
    shown = comparison_slices(real)
    same = render_same_labels(shown, model_records, seed=config["seed"])
    if same:
        grid_same = rp.plot_samples(
            shown, same, staging / "same_labels.png", n=len(shown),
            title="The same held-out label maps: real (top) and rendered by each family (contours: the real labels)",
        )  # fmt: skip
        figures.insert(1, str(grid_same))
        sections += [
            "### The same label maps, real and per family",
            "",
            "Top row: held-out real slices that no model saw; below, each label-conditioned family renders exactly "
            "those label maps (the contours are the real labels), so differences are appearance, not anatomy.",
            "",
            "![same label maps: real and per family](figures/same_labels.png)",
            "",
        ]
    report = "\n".join(sections) + "\n"
    result = write_run_outputs(
        out, config["run_name"], config, config_hash, slices_record, synth_records, tables, report, figures
    )
    _publish_artifacts(config["run_name"], report, summary_for_artifact, grid, [Path(f) for f in figures])
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
    from medsynth.evaluation import report as rp

    # one window over both domains' usual range (the slice scale), not the source's: translated LGE is brighter
    grid = rp.plot_samples(source, sets, staging / "samples.png", first="source", vmax=1.2)
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


def _publish_artifacts(
    run_name: str, report: str, summary: pd.DataFrame | None, grid: Path | None = None, figures: list[Path] = ()
) -> None:
    """Prefect UI artifacts (the report as markdown with the sample grid inlined, the metric summary as a
    table); no-op outside a Prefect run."""
    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact
        from prefect.context import get_run_context

        get_run_context()
    except Exception:  # not inside a Prefect run: nothing to publish
        return
    key = "".join(c if c.isalnum() else "-" for c in run_name.lower())
    for fig in {*figures, *([grid] if grid is not None else [])}:
        if fig.is_file():
            # the UI cannot reach files on the worker: inline the figure
            b64 = base64.b64encode(fig.read_bytes()).decode()
            report = report.replace(f"(figures/{fig.name})", f"(data:image/png;base64,{b64})")
    create_markdown_artifact(markdown=report, key=f"{key}-report", description="medsynth run report")
    if summary is not None:
        records = json.loads(summary.to_json(orient="records"))
        create_table_artifact(table=records, key=f"{key}-segmentation", description="segmentation summary")


# ---- anomaly ---------------------------------------------------------------------------------------------
def score_anomaly(work: str, slices_record: dict[str, Any], model_record: dict[str, Any]) -> dict[str, Any]:
    """Score the held-out test split with a model fitted on healthy training subjects."""
    from medsynth.evaluation.anomaly import comparison_table, has_scar_info, score_model, slice_table, subject_table
    from medsynth.models.registry import load_model

    # "maps": the stage also keeps the pixel maps (for the report's figure); keyed apart from stages without them
    inputs = {"slices": slices_record["key"], "model": model_record["key"], "maps": True}

    def build(tmp: Path) -> dict[str, Any]:
        model = load_model(artefact(model_record))
        test = _reference_split(slices_record)
        scores = score_model(model, test)
        sdf = slice_table(test, scores)
        sdf.to_csv(tmp / "slice_scores.csv", index=False)
        subject_table(sdf).to_csv(tmp / "subject_scores.csv", index=False)
        out = {"path": "slice_scores.csv", "subjects": "subject_scores.csv", "name": model_record["name"]}
        if scores.pixel_maps is not None:
            # float16 keeps the maps of a test split small; the figure needs no more precision
            np.savez_compressed(tmp / "pixel_maps.npz", maps=scores.pixel_maps.astype(np.float16))
            out["maps"] = "pixel_maps.npz"
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
    figures: list[str] = []
    if metric_parts:
        from medsynth.evaluation import report as rp

        metrics = pd.concat(metric_parts, ignore_index=True)
        metrics.to_csv(staging / "anomaly_metrics.csv", index=False)
        tables["anomaly_metrics"] = str(staging / "anomaly_metrics.csv")
        sections += [
            "",
            "## Scar detection (slice / case AUROC, pixel AUPRC / Dice)",
            "",
            rp.anomaly_paragraph(metrics),
            "",
            _markdown_table(metrics),
        ]
        test = _reference_split(slices_record)
        maps = [(r["name"], np.load(artefact(r, "maps"))["maps"]) for r in score_records if "maps" in r]
        if maps:
            figures.append(str(rp.plot_anomaly_maps(test, maps, staging / "pixel_maps.png")))
            sections += [
                "",
                "### Pixel maps",
                "",
                "Top row: held-out LGE slices with the reference scar (and MVO) outlined; below, each model's pixel "
                "map of the same slices (brighter = more anomalous; each row on its own scale, 0 to its 99th "
                "percentile over the test split).",
                "",
                "![pixel maps of the held-out slices](figures/pixel_maps.png)",
            ]
    for r in score_records:
        for key in ("path", "subjects"):
            dest = staging / f"{r['name']}_{'slice' if key == 'path' else 'subject'}_scores.csv"
            dest.write_bytes(artefact(r, key).read_bytes())
            tables[dest.stem] = str(dest)
    report = "\n".join(sections) + "\n"
    result = write_report_outputs(out, config["run_name"], config, tables, report, figures)
    _publish_artifacts(config["run_name"], report, None)
    return result
