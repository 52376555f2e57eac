"""Evaluation outputs: tidy CSV tables, figures (metric bars with CIs, real-vs-synthetic grids, Dice box
plots) and a Markdown report. Every file is written atomically."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medsynth.labels import LV, MVO, MYO, RV, SCAR
from medsynth.utils.atomic import atomic_file

log = logging.getLogger(__name__)


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    return plt


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a tidy CSV atomically (no index)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


def _save(fig, path: Path) -> Path:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format=path.suffix.lstrip("."))
    _plt().close(fig)
    return path


def plot_metric_bars(fidelity: pd.DataFrame, path: str | Path) -> Path:
    """One panel per metric: bar = value, whisker = CI (``fidelity`` has metric/value/ci_low/ci_high)."""
    plt = _plt()
    df = fidelity.reset_index(drop=True)
    n = len(df)
    ncol = max(1, min(n, 5))
    nrow = max(1, -(-n // ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.0 * ncol, 2.4 * nrow), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    for ax, (_, row) in zip(axes.ravel(), df.iterrows(), strict=False):
        lo, hi = row["ci_low"], row["ci_high"]
        err = None
        if np.isfinite(lo) and np.isfinite(hi):
            err = [[max(row["value"] - lo, 0.0)], [max(hi - row["value"], 0.0)]]
        ax.bar([0], [row["value"]], yerr=err, capsize=4, color="tab:blue")
        ax.set_title(str(row["metric"]), fontsize=8)
        ax.set_xticks([])
        ax.tick_params(labelsize=7)
    fig.suptitle(f"extractor {df['extractor'].iloc[0]} ({df['extractor_hash'].iloc[0]})" if n else "", fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_sample_grid(real: np.ndarray, synthetic: np.ndarray, path: str | Path, n: int = 8, seed: int = 0) -> Path:
    """Top row real, bottom row synthetic: ``n`` random images (N, 1, H, W) each, grey, range [0, 1]."""
    plt = _plt()
    gen = np.random.default_rng(seed)
    n = max(1, min(n, len(real), len(synthetic)))
    fig, axes = plt.subplots(2, n, figsize=(1.3 * n, 2.8), squeeze=False)
    for r, (name, imgs) in enumerate((("real", real), ("synthetic", synthetic))):
        idx = np.sort(gen.choice(len(imgs), n, replace=False))
        for c, i in enumerate(idx):
            axes[r, c].imshow(imgs[i, 0], cmap="gray", vmin=0.0, vmax=1.0)
            axes[r, c].axis("off")
        axes[r, 0].set_title(name, fontsize=8, loc="left")
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_dice_boxes(per_case: pd.DataFrame, path: str | Path) -> Path:
    """Per-class box plots of per-patient Dice (seed-averaged), one box per arm."""
    plt = _plt()
    pc = per_case
    if "n_real_patients" in pc and pc.groupby("arm")["n_real_patients"].nunique().max() > 1:
        pc = pc.assign(arm=pc["arm"] + " n=" + pc["n_real_patients"].astype(str))  # one box per curve point
    pc = pc.groupby(["arm", "class", "case"], sort=False)["dice"].mean().reset_index()
    classes = list(dict.fromkeys(pc["class"]))
    arms = list(dict.fromkeys(pc["arm"]))
    fig, axes = plt.subplots(1, max(len(classes), 1), figsize=(2.4 * max(len(classes), 1), 3), squeeze=False)
    for ax, cls in zip(axes[0], classes, strict=False):
        data = [pc[(pc["class"] == cls) & (pc["arm"] == a)]["dice"].dropna().to_numpy() for a in arms]
        ax.boxplot(data, tick_labels=arms, showmeans=True)
        ax.set_title(cls, fontsize=9)
        ax.set_ylim(0, 1)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    axes[0, 0].set_ylabel("Dice (per patient)")
    fig.tight_layout()
    return _save(fig, Path(path))


def md_table(df: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        cells = [floatfmt.format(v) if isinstance(v, float | np.floating) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_fidelity_report(
    out_dir: str | Path,
    fidelity: pd.DataFrame,
    real: np.ndarray | None = None,
    synthetic: np.ndarray | None = None,
    memorisation: dict | None = None,
) -> Path:
    """``fidelity.csv``, ``fidelity_bars.png``, optional ``samples.png`` and ``report.md`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(fidelity, out / "fidelity.csv")
    plot_metric_bars(fidelity, out / "fidelity_bars.png")
    parts = [
        "# Fidelity report",
        "",
        f"Extractor: `{fidelity['extractor'].iloc[0]}` (hash `{fidelity['extractor_hash'].iloc[0]}`); "
        f"n_real = {fidelity['n_real'].iloc[0]}, n_synthetic = {fidelity['n_synthetic'].iloc[0]}.",
        "",
        md_table(fidelity[["metric", "value", "ci_low", "ci_high"]]),
        "",
        "rfd = FD(synthetic, real half B) / FD(real half A, real half B): ~1 means as close as real data is to "
        "itself. MS-SSIM: lower = more diverse.",
        "",
        "![metrics](fidelity_bars.png)",
    ]
    if real is not None and synthetic is not None and len(real) and len(synthetic):
        plot_sample_grid(real, synthetic, out / "samples.png")
        parts += ["", "## Samples (top real, bottom synthetic)", "", "![samples](samples.png)"]
    if memorisation:
        parts += ["", "## Memorisation", "", md_table(pd.DataFrame([memorisation]))]
    with atomic_file(out / "report.md") as tmp:
        tmp.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return out / "report.md"


def write_segmentation_report(
    out_dir: str | Path,
    per_case: pd.DataFrame,
    per_seed: pd.DataFrame,
    summary: pd.DataFrame,
    config: dict | None = None,
) -> Path:
    """``segmentation.csv`` (arm × seed × class), ``segmentation_per_case.csv``, ``summary.csv``,
    ``dice_boxes.png`` and ``report.md`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(per_seed, out / "segmentation.csv")
    from medsynth.evaluation.segmentation import split_timings

    results, timings = split_timings(per_case)  # wall-clock apart: the results stay byte-identical per seed
    write_csv(results, out / "segmentation_per_case.csv")
    if len(timings):
        write_csv(timings, out / "timings.csv")
    write_csv(summary, out / "summary.csv")
    plot_dice_boxes(per_case, out / "dice_boxes.png")
    plot_learning_curve(summary, out / "learning_curve.png")
    from medsynth.evaluation.segmentation import reach_statements

    units = per_case["hd95_unit"].dropna().unique() if len(per_case) else []
    unit = str(units[0]) if len(units) == 1 else "mm or px"
    curve, per_class = segmentation_tables(summary, unit)
    parts = [
        "# Downstream segmentation report",
        "",
        "2-D MONAI U-Net (DiceCE), evaluated per test patient volume in 3-D. Dice is a fraction (0–1), HD95 in "
        f"{unit}; means over test volumes, mean ± SD over seeds; differences to real-only (in Dice points, "
        "1 point = 0.01) are paired by seed and test volume at the same number of real patients, with a "
        "bootstrap CI over test volumes.",
        "",
        segmentation_paragraph(summary, unit),
        "",
        "![learning curve](learning_curve.png)",
        "",
        reach_paragraph(reach_statements(summary)),
        "",
        md_table(curve),
        "",
        md_table(per_class),
        "",
        "![dice](dice_boxes.png)",
    ]
    if config:
        parts += ["", "Config: `" + ", ".join(f"{k}={v}" for k, v in config.items()) + "`"]
    with atomic_file(out / "report.md") as tmp:
        tmp.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return out / "report.md"


# --------------------------------------------------------------------------------- words from the numbers

#: One line per fidelity metric, printed under the fidelity table.
FIDELITY_EXPLAINED: dict[str, str] = {
    "fd": "Fréchet distance between Gaussian fits to real (held-out) and synthetic features; lower is closer, "
    "its scale depends on the feature extractor, so read it against fd_real_halves.",
    "rfd": "relative FD: FD(synthetic, real half B) divided by the real-vs-real FD(real half A, real half B); "
    "1 = as close to real data as real data is to itself, 2 = twice as far.",
    "fd_real_halves": "FD between two patient-disjoint halves of the real slices: the floor FD can reach with "
    "this many images.",
    "kid": "kernel inception distance (unbiased polynomial-kernel MMD² of the features): like FD without the "
    "Gaussian assumption; 0 = same distribution.",
    "precision": "fraction of synthetic images inside the real images' k-nearest-neighbour balls (realism); "
    "0 = not one synthetic image lies where real images lie in feature space.",
    "recall": "fraction of real images inside the synthetic images' k-NN balls (how much real variety the "
    "samples span).",
    "density": "how many real k-NN balls contain each synthetic image, divided by k (≈1 for real-like samples, "
    "0 = none).",
    "coverage": "fraction of real images whose k-NN ball contains at least one synthetic image.",
    "ms_ssim_synthetic": "mean MS-SSIM between random pairs of synthetic images: lower = more diverse; compare "
    "with ms_ssim_real.",
    "ms_ssim_real": "mean MS-SSIM between random pairs of real images: the diversity reference.",
    "memorised_fraction": "fraction of synthetic images closer to a real training image than held-out real "
    "images ever are (flagged as near-copies); 0 = no copies.",
    "nn_distance_ratio_median": "median of (a synthetic image's distance to its nearest training image) / "
    "(the held-out baseline); well below 1 would mean copying.",
}


def fmt(value, spec: str = "{:.3f}") -> str:
    """A number for a report cell; missing values (NaN / None) read "–", never a bare ``nan``."""
    try:
        if value is None or pd.isna(value):
            return "–"
    except (TypeError, ValueError):
        return str(value)
    if isinstance(value, float | np.floating | int | np.integer):
        return spec.format(float(value)) if "f" in spec or "g" in spec else spec.format(value)
    return str(value)


def _ci_text(lo, hi, spec: str) -> str:
    return "–" if pd.isna(lo) or pd.isna(hi) else f"[{spec.format(lo)}, {spec.format(hi)}]"


def fidelity_side_by_side(fid: pd.DataFrame) -> pd.DataFrame:
    """Metric rows × one column per synthetic set (``model``): "value [CI low, CI high]" strings."""
    models = list(dict.fromkeys(fid["model"])) if "model" in fid else ["synthetic"]
    metrics = list(dict.fromkeys(fid["metric"]))
    rows = []
    for m in metrics:
        row = {"metric": m}
        for name in models:
            cell = fid[(fid["metric"] == m) & ((fid["model"] == name) if "model" in fid else True)]
            if cell.empty:
                row[name] = "–"
                continue
            r = cell.iloc[0]
            ci = _ci_text(r.get("ci_low"), r.get("ci_high"), "{:.3g}")
            row[name] = fmt(r["value"], "{:.3g}") + ("" if ci == "–" else f" {ci}")
        rows.append(row)
    return pd.DataFrame(rows)


def fidelity_paragraph(fid: pd.DataFrame) -> str:
    """A few sentences per synthetic set, from its fidelity rows: realism (precision), coverage (recall), rFD,
    diversity and copying, each said in words."""
    out = []
    models = list(dict.fromkeys(fid["model"])) if "model" in fid else ["synthetic"]
    for name in models:
        part = fid[fid["model"] == name] if "model" in fid else fid
        v = dict(zip(part["metric"], part["value"], strict=False))
        s = [f"**{name}**:"]
        p, r = v.get("precision"), v.get("recall")
        if p is not None and pd.notna(p):
            if p == 0:
                s.append(
                    "precision is 0: not one synthetic image lies among the real images in feature space, so the "
                    "samples are recognisably unlike real slices to this extractor"
                    + (f", although they span {r:.0%} of the real variety (recall)." if pd.notna(r) else ".")
                )
            else:
                span = f" and they span {r:.0%} of the real variety (recall)." if pd.notna(r) else "."
                s.append(f"{p:.0%} of the synthetic images look like real ones (precision){span}")
        rfd = v.get("rfd")
        if rfd is not None and pd.notna(rfd):
            if rfd <= 1.2:
                s.append(f"rFD {rfd:.2f}: about as close to the real slices as real data is to itself.")
            else:
                s.append(f"rFD {rfd:.2f}: {rfd:.1f} times as far from the real slices as real data is from itself.")
        ms, mr = v.get("ms_ssim_synthetic"), v.get("ms_ssim_real")
        if ms is not None and mr is not None and pd.notna(ms) and pd.notna(mr):
            verdict = "less diverse than real slices" if ms > mr else "at least as diverse as real slices"
            s.append(f"MS-SSIM {ms:.2f} vs {mr:.2f} between real pairs: the samples are {verdict}.")
        mem = v.get("memorised_fraction")
        if mem is not None and pd.notna(mem):
            s.append(
                "No synthetic image is a near-copy of a training image."
                if mem == 0
                else f"{mem:.1%} of the synthetic images are flagged as near-copies of training images."
            )
        out.append(" ".join(s))
    return "\n\n".join(out)


def _sign_words(d: float, lo: float, hi: float, higher_better: bool) -> str:
    """What a paired difference with its CI means, in words."""
    if pd.isna(lo) or pd.isna(hi):
        return "no CI could be computed"
    if lo <= 0 <= hi:
        return "the CI crosses zero: no difference from real-only can be told apart from chance here"
    better = (lo > 0) == higher_better
    side = "above" if lo > 0 else "below"
    return f"the CI lies entirely {side} zero: {'better' if better else 'worse'} than real-only"


def segmentation_paragraph(summary: pd.DataFrame, unit: str = "mm", ci: float = 0.95) -> str:
    """Sentences per non-reference arm and learning-curve point (class ``mean``): the paired Dice change in
    points and the HD95 change in ``unit`` against real-only at the same n, and whether each CI crosses zero;
    then which arm helped most."""
    m = summary[summary["class"] == "mean"]
    real = m[m["arm"] == "real"].set_index("n_real_patients")
    pct = f"{ci:.0%}"
    lines = []
    helped, hurt = [], []
    for _, row in m[m["arm"] != "real"].iterrows():
        n, ref_n = int(row["n_real_patients"]), row.get("reference_n")
        d, lo, hi = row["dice_diff_vs_real"], row["dice_diff_ci_low"], row["dice_diff_ci_high"]
        if pd.isna(d):
            lines.append(f"- **{row['arm']}**: no real-only arm to compare with.")
            continue
        ref_n = int(ref_n)
        where = f"with {n} real patients" if n else "with no real patients"
        ref = real["dice_mean"].get(ref_n, np.nan)
        text = (
            f"- **{row['arm']}** {where}: mean Dice {row['dice_mean']:.3f} vs {fmt(ref)} for real-only "
            f"({ref_n} patients), a change of {100 * d:+.1f} Dice points ({pct} CI {100 * lo:+.1f} to "
            f"{100 * hi:+.1f}); {_sign_words(d, lo, hi, higher_better=True)}."
        )
        hd, hlo, hhi = row["hd95_diff_vs_real"], row["hd95_diff_ci_low"], row["hd95_diff_ci_high"]
        if pd.notna(hd):
            text += (
                f" HD95 changed by {hd:+.1f} {unit} ({pct} CI {hlo:+.1f} to {hhi:+.1f}; lower is better); "
                f"{_sign_words(hd, hlo, hhi, higher_better=False)}."
            )
        lines.append(text)
        if pd.notna(lo) and lo > 0:
            helped.append((d, row["arm"], n))
        if pd.notna(hi) and hi < 0:
            hurt.append(f"{row['arm']} with {n} real patients ({100 * d:+.1f} points)")
    if not lines:
        return "Only the real-only arm ran: there is nothing to compare it with."
    if helped:
        d, arm, n = max(helped)
        head = f"Synthetic data helped: the largest significant gain is **{arm}** with {n} real patients, " \
               f"{100 * d:+.1f} Dice points over real-only."  # fmt: skip
    else:
        head = "No arm with synthetic data beat real-only with a CI above zero."
    if hurt:
        head += " Worse than real-only, with the CI below zero: " + "; ".join(hurt) + "."
    ratios = ratio_paragraph(summary, pct)
    return head + "\n\n" + "\n".join(lines) + (f"\n\n{ratios}" if ratios else "")


def ratio_paragraph(summary: pd.DataFrame, pct: str = "95 %") -> str:
    """Which synthetic ratio was best at each learning-curve point, in words, and whether its CI overlaps
    the other ratios' (from :func:`medsynth.evaluation.segmentation.best_ratios`); empty without a sweep."""
    from medsynth.evaluation.segmentation import best_ratios

    best = best_ratios(summary)
    if best.empty:
        return ""
    lines = ["Synthetic ratio sweep (synthetic slices per real slice), best ratio per number of real patients:"]
    for _, b in best.iterrows():
        others = b["overlapping"].split(";") if b["overlapping"] else []
        if len(others) > 1:
            overlap = f"its CI overlaps those of ratios {', '.join(others)}: the data do not tell these apart from it"
        elif others:
            overlap = f"its CI overlaps that of ratio {others[0]}: the data do not tell the two apart"
        else:
            overlap = "its CI overlaps no other ratio's: the data tell it apart from every other ratio"
        lines.append(
            f"- **{b['synthetic_set']}** with {b['n_real_patients']} real patients: ratio {b['best_ratio']:g} "
            f"({b['best_arm']}, mean Dice {b['dice_mean']:.3f}, {100 * b['dice_diff']:+.1f} Dice points over "
            f"real-only, {pct} CI {100 * b['dice_diff_ci_low']:+.1f} to {100 * b['dice_diff_ci_high']:+.1f}) of "
            f"the ratios {b['ratios'].replace(';', ', ')}; {overlap}."
        )
    return "\n".join(lines)


def reach_paragraph(reach: list[dict]) -> str:
    """The "X % real + synthetic reaches Y % of all-real" figures in words (from
    :func:`medsynth.evaluation.segmentation.reach_statements`)."""
    if not reach:
        return "The learning curve has a single real-patient count: no fraction of the real data to compare."
    out = []
    for r in reach:
        real_part = f" (real-only with the same patients: {r['real_y_pct']:.0f} %)" if pd.notna(r["real_y_pct"]) else ""
        out.append(
            f"- {r['arm']}: {r['x_pct']:.0f} % of the real patients ({r['n_real_patients']} of {r['n_all']}) plus "
            f"synthetic data reach {r['y_pct']:.0f} % of the all-real mean Dice{real_part}."
        )
    return "\n".join(out)


def segmentation_tables(summary: pd.DataFrame, unit: str = "mm") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Report tables (strings, no bare ``nan``): the learning curve (class ``mean``; Dice as a fraction, the
    difference in Dice points, HD95 in ``unit``) and the per-class Dice / HD95. The reference arm's difference
    reads "–, reference"."""

    def diff(row, metric: str, scale: float, spec: str) -> str:
        if row["arm"] == "real":
            return "–, reference"
        d = row[f"{metric}_diff_vs_real"]
        if pd.isna(d):
            return "–"
        lo, hi = row[f"{metric}_diff_ci_low"], row[f"{metric}_diff_ci_high"]
        ci = _ci_text(scale * lo, scale * hi, spec) if pd.notna(lo) else "–"
        return f"{spec.format(scale * d)} {ci}"

    def pm(mean, std, spec: str) -> str:
        return fmt(mean, spec) + ("" if pd.isna(std) or pd.isna(mean) else f" ± {spec.format(std)}")

    from medsynth.evaluation.segmentation import best_ratios

    best = best_ratios(summary)
    best_at = {(b["best_arm"], int(b["n_real_patients"])): b for _, b in best.iterrows()}

    def ratio_cell(r) -> str:
        ratio = r.get("synthetic_ratio")
        if pd.isna(ratio):
            return "–"
        b = best_at.get((r["arm"], int(r["n_real_patients"])))
        if b is None:
            return f"{ratio:g}"
        tie = f"; CI overlaps {b['overlapping'].replace(';', ', ')}" if b["overlapping"] else ""
        return f"{ratio:g} (best at this n{tie})"

    curve, per_class = [], []
    for _, r in summary.iterrows():
        ref = "" if r["arm"] == "real" or pd.isna(r.get("reference_n")) else f" (vs real n={int(r['reference_n'])})"
        if r["class"] == "mean":
            curve.append(
                {
                    "arm": r["arm"],
                    "real patients": int(r["n_real_patients"]),
                    "seeds": int(r["n_seeds"]),
                    "Dice (mean ± SD over seeds)": pm(r["dice_mean"], r["dice_std"], "{:.3f}"),
                    "Dice 95 % CI": _ci_text(r.get("dice_ci_low"), r.get("dice_ci_high"), "{:.3f}"),
                    "Δ Dice vs real-only, points [CI]": diff(r, "dice", 100.0, "{:+.1f}") + ref,
                    f"HD95 ({unit})": pm(r["hd95_mean"], r["hd95_std"], "{:.1f}"),
                    f"Δ HD95 ({unit}) [CI]": diff(r, "hd95", 1.0, "{:+.1f}"),
                }
            )
            if not best.empty:  # a ratio sweep: which ratio each arm used and which was best
                curve[-1]["synthetic ratio"] = ratio_cell(r)
        else:
            per_class.append(
                {
                    "arm": r["arm"],
                    "real patients": int(r["n_real_patients"]),
                    "class": r["class"],
                    "Dice": pm(r["dice_mean"], r["dice_std"], "{:.3f}"),
                    "Δ Dice, points [CI]": diff(r, "dice", 100.0, "{:+.1f}"),
                    f"HD95 ({unit})": pm(r["hd95_mean"], r["hd95_std"], "{:.1f}"),
                }
            )
    return pd.DataFrame(curve), pd.DataFrame(per_class)


def rejection_line(name: str, report: dict[str, Any]) -> str:
    """One report line for a synthetic set whose label maps passed a plausibility filter: ``report`` holds ``n``
    (maps generated), ``rejected``, ``rejected_fraction`` and ``reasons`` (count per broken rule)."""
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(report.get("reasons", {}).items(), key=lambda kv: -kv[1]))
    kept = int(report["n"]) - int(report["rejected"])
    return (
        f"- `{name}`: {int(report['n'])} label maps generated, {int(report['rejected'])} rejected by the anatomical "
        f"plausibility check ({100 * float(report['rejected_fraction']):.0f} %"
        + (f": {reasons}" if reasons else "")
        + f"); the synthetic set is drawn from the {kept} that passed (one LV inside a closed myocardial ring, "
        "the RV beside it, no islands)."
    )


def plot_learning_curve(summary: pd.DataFrame, path: str | Path, ci: float = 0.95) -> Path:
    """Left: mean Dice (over classes) against the number of real training patients, one line per arm with its
    bootstrap CI band; a synthetic-only arm (0 real patients) is a dashed horizontal line with its band. Right
    (when the summary has paired differences): each arm's difference to real-only at the same n in Dice points,
    with its paired CI (the bands of the left panel overlap where the paired differences do not)."""
    plt = _plt()
    m = summary[summary["class"] == "mean"]
    paired = "dice_diff_vs_real" in m and m["dice_diff_vs_real"].notna().any()
    fig, axes = plt.subplots(1, 2 if paired else 1, figsize=(11.5 if paired else 7.6, 4.0), squeeze=False)
    ax = axes[0, 0]
    ns = sorted(int(n) for n in m.loc[m["n_real_patients"] > 0, "n_real_patients"].unique())
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    # a synthetic-only arm takes the colour of its family's real + synthetic arm (one colour per family), so the
    # dashed line reads as that family's without a second look at the legend
    sets = m.groupby("arm", sort=False)["synthetic_set"].first() if "synthetic_set" in m else pd.Series(dtype=str)
    family = {arm: s for arm, s in sets.items() if isinstance(s, str) and s}
    arms = list(dict.fromkeys(m["arm"]))
    trained = [a for a in arms if (m.loc[m["arm"] == a, "n_real_patients"] > 0).any()]
    arm_colour = {arm: colours[i % len(colours)] for i, arm in enumerate(trained)}
    family_colour: dict[str, str] = {}
    for arm in trained:
        if arm in family:
            family_colour.setdefault(family[arm], arm_colour[arm])
    for arm in arms:
        if arm not in arm_colour:
            arm_colour[arm] = family_colour.get(family.get(arm, ""), colours[len(arm_colour) % len(colours)])
    for arm, g in m.groupby("arm", sort=False):
        g = g.sort_values("n_real_patients")
        c = arm_colour[arm]
        if (g["n_real_patients"] == 0).all() and ns:
            r = g.iloc[0]
            ax.axhline(r["dice_mean"], color=c, ls="--", label=f"{arm} (0 real patients)")
            if pd.notna(r["dice_ci_low"]):
                ax.axhspan(r["dice_ci_low"], r["dice_ci_high"], color=c, alpha=0.12)
            continue
        x = g["n_real_patients"].to_numpy()
        ax.plot(x, g["dice_mean"], marker="o", color=c, label=arm)
        if g["dice_ci_low"].notna().all():
            ax.fill_between(x, g["dice_ci_low"], g["dice_ci_high"], color=c, alpha=0.18, linewidth=0)
    ax.set_xlabel("real training patients (n)")
    ax.set_ylabel("mean Dice over LV, MYO, RV (fraction)")
    ax.set_title(f"Learning curve on held-out real test patients (bands: {ci:.0%} CI over test patients)",
                 fontsize=8)  # fmt: skip
    if ns:
        ax.set_xticks(ns)
    # the y range follows the data (with its CI bands), so differences of a few Dice points stay visible
    lo = np.nanmin(np.r_[m["dice_mean"].to_numpy(float), m["dice_ci_low"].to_numpy(float)])
    hi = np.nanmax(np.r_[m["dice_mean"].to_numpy(float), m["dice_ci_high"].to_numpy(float)])
    if np.isfinite(lo) and np.isfinite(hi):
        pad = max(0.02, 0.08 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad))
    else:
        ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if paired:
        d = m[m["dice_diff_vs_real"].notna() & (m["n_real_patients"] > 0)]
        bx = axes[0, 1]
        bx.axhline(0.0, color="black", lw=0.8)
        arms = list(dict.fromkeys(d["arm"]))
        width = 0.6 / max(len(arms), 1)  # arms side by side at each n, so their CIs do not hide each other
        for k, (arm, g) in enumerate(d.groupby("arm", sort=False)):
            g = g.sort_values("n_real_patients")
            x = np.searchsorted(ns, g["n_real_patients"].to_numpy()) + (k - (len(arms) - 1) / 2) * width
            y = 100 * g["dice_diff_vs_real"].to_numpy(float)
            err = 100 * np.abs(
                np.vstack([g["dice_diff_ci_low"].to_numpy(float), g["dice_diff_ci_high"].to_numpy(float)]) - y / 100
            )
            bx.errorbar(x, y, yerr=err, fmt="o-", ms=4, lw=1, capsize=2, color=arm_colour[arm], label=arm)
        bx.set_xticks(range(len(ns)), [str(n) for n in ns])
        bx.set_xlabel("real training patients (n)")
        bx.set_ylabel("Dice change vs real-only (points)")
        bx.set_title(f"Paired difference to real-only at the same n ({ci:.0%} CI)", fontsize=8)
        bx.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    axes[0, -1].legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="arm",
                       title_fontsize=8)  # fmt: skip
    fig.tight_layout()
    return _save(fig, Path(path))


def _panel_title(row: pd.Series, i: int) -> str:
    """Subject (last characters), phase and slice of one panel, as far as the metadata says."""
    sid = str(row["subject_id"]) if "subject_id" in row and pd.notna(row["subject_id"]) else f"#{i}"
    # a generated slice's id is syn_<set>_<number>; the row label already names the set
    parts = [f"syn {sid.rsplit('_', 1)[-1]}" if sid.startswith("syn_") else sid[-16:]]
    if "phase" in row and isinstance(row["phase"], str) and row["phase"] not in ("", "none", "unknown"):
        parts.append(row["phase"])
    if "slice_index" in row and pd.notna(row["slice_index"]) and str(row["slice_index"]) != "":
        parts.append(f"z{row['slice_index']}")
    return " ".join(parts)


#: Contours drawn myocardium first: its inner line is the LV's outline and its outer line borders the RV, so
#: the LV and RV contours drawn after it stay visible; scar and MVO (inside the myocardium) last.
_CONTOUR_ORDER = (MYO, RV, LV, SCAR, MVO)


def plot_samples(
    real,
    synth_sets: list[tuple[str, object]],
    path: str | Path,
    n: int = 6,
    first: str = "real (held-out)",
    vmax: float | None = None,
    title: str = "Real vs synthetic slices (one row per set; labels as contours)",
) -> Path:
    """Rows: real slices, then each synthetic set (side by side for comparison). Each panel is the grey image
    with its labels drawn as thin contours in the colours of ``medsynth inspect`` (an opaque fill would hide the
    appearance the figure is there to compare), titled with subject / phase / slice; a legend names the
    contour colours and each row's first panel names its set. One grey window for every panel (0 to the
    99.5th percentile of the real images, or 0 to ``vmax``), so brightness differences between real and
    synthetic show.
    ``real`` and the sets are SliceSets (images (N, 1, H, W) normalised, labels (N, H, W))."""
    from matplotlib.lines import Line2D

    from medsynth.data.inspect import COLOURS
    from medsynth.labels import CANONICAL

    plt = _plt()
    rows = [(first, real)] + list(synth_sets)
    if vmax is None:
        vmax = float(np.percentile(real.images, 99.5)) if len(real) else 1.0
        vmax = vmax if np.isfinite(vmax) and vmax > 0 else 1.0
    fig, axes = plt.subplots(
        len(rows), n, figsize=(1.9 * n, 2.05 * len(rows) + 0.7), squeeze=False, layout="constrained"
    )
    present = set()
    for r, (name, s) in enumerate(rows):
        idx = np.linspace(0, max(len(s) - 1, 0), n).astype(int) if len(s) else []
        for c in range(n):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_visible(False)
            if c < len(idx):
                i = idx[c]
                lab = s.labels[i]
                ax.imshow(s.images[i, 0], cmap="gray", vmin=0.0, vmax=vmax, interpolation="nearest")
                for code in _CONTOUR_ORDER:
                    mask = lab == code
                    if mask.any():
                        present.add(code)
                        # the class mask's half-level line, on the pixel boundary
                        ax.contour(mask.astype(np.float32), levels=[0.5], colors=[COLOURS[code]], linewidths=0.7)
                ax.set_title(_panel_title(s.meta.iloc[i], i), fontsize=6)
        axes[r, 0].set_ylabel(name, fontsize=9, fontweight="bold")
    shown = [k for k in COLOURS if k in present] or list(COLOURS)
    handles = [Line2D([], [], color=COLOURS[k], lw=1.5, label=CANONICAL[k]) for k in shown]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False,
               title="label contours", title_fontsize=8)  # fmt: skip
    fig.suptitle(title, fontsize=9)
    with atomic_file(Path(path)) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)


def anomaly_paragraph(metrics: pd.DataFrame) -> str:
    """One paragraph from the anomaly table (rows: methods; columns slice_auroc, case_auroc, pixel_dice, ...):
    the best method by case and by slice AUROC, where the learned models stand against the n-SD(3) rule, and
    what the pixel Dice says. An AUROC of 0.5 is chance."""
    m = metrics.set_index("method")
    parts = []
    for col, what in (("case_auroc", "case"), ("slice_auroc", "slice")):
        if col in m and m[col].notna().any():
            best = m[col].idxmax()
            parts.append(f"the best {what}-level AUROC is {m.loc[best, col]:.2f} ({best})")
    ref = "nsd3"
    learned = [i for i in m.index if not (i.startswith("nsd") or i.startswith("fwhm") or i.startswith("gmm>"))]
    if ref in m.index and learned and "case_auroc" in m:
        beat = [i for i in learned if m.loc[i, "case_auroc"] > m.loc[ref, "case_auroc"]]
        parts.append(
            f"against the n-SD(3) rule's {m.loc[ref, 'case_auroc']:.2f} case AUROC, "
            + (
                f"{', '.join(beat)} score{'s' if len(beat) == 1 else ''} higher"
                if beat
                else "no learned model scores higher"
            )
        )
    if "pixel_dice" in m and m["pixel_dice"].notna().any():
        best = m["pixel_dice"].idxmax()
        parts.append(f"pixel-level scar Dice is led by {best} ({m.loc[best, 'pixel_dice']:.2f})")
    text = "; ".join(parts)
    return (text[:1].upper() + text[1:] + ". " if text else "") + (
        "AUROC 0.5 is chance; `[wall]` rows score a slice by the 95th percentile of its pixel map inside the LV "
        "wall only; case scores come from the slices of a subject."
    )


def plot_anomaly_maps(test, maps: list[tuple[str, np.ndarray]], path: str | Path, n: int = 6) -> Path:
    """Top row: ``n`` held-out slices of ``test`` (a SliceSet: images (N, 1, H, W), labels (N, H, W)), most of
    them with scar (largest scar first, spread over subjects), with scar / MVO outlined; then one row per model
    with its pixel map (N, H, W) of the same slices, each row scaled 0 to its 99th percentile over all slices."""
    from medsynth.data.inspect import COLOURS

    plt = _plt()
    scar_px = np.isin(test.labels, (SCAR, MVO)).sum(axis=(1, 2))
    with_scar = np.flatnonzero(scar_px > 0)
    order = with_scar[np.argsort(-scar_px[with_scar], kind="stable")]
    subjects = test.meta["subject_id"].astype(str).to_numpy() if "subject_id" in test.meta else np.arange(len(test))
    pick, seen = [], set()
    for i in order:  # one slice per subject first, so the figure is not one patient's stack
        if subjects[i] not in seen and len(pick) < n - 1:
            pick.append(int(i))
            seen.add(subjects[i])
    healthy = np.flatnonzero((scar_px == 0) & (test.labels == MYO).any(axis=(1, 2)))
    if len(healthy):
        pick.append(int(healthy[len(healthy) // 2]))  # one scar-free slice, for the models' false alarms
    pick = pick[:n]
    rows = [("held-out LGE (scar outlined)", None)] + maps
    fig, axes = plt.subplots(len(rows), len(pick), figsize=(1.9 * len(pick), 2.0 * len(rows)), squeeze=False)
    vmax_img = float(np.percentile(test.images, 99.5)) if len(test) else 1.0
    for r, (name, m) in enumerate(rows):
        scale = float(np.nanpercentile(np.asarray(m, np.float32), 99)) if m is not None else vmax_img
        for c, i in enumerate(pick):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if m is None:
                ax.imshow(test.images[i, 0], cmap="gray", vmin=0.0, vmax=vmax_img)
                ax.set_title(_panel_title(test.meta.iloc[i], i), fontsize=6)
            else:
                ax.imshow(np.asarray(m[i], np.float32), cmap="magma", vmin=0.0, vmax=scale if scale > 0 else 1.0)
            for code in (SCAR, MVO):
                mask = test.labels[i] == code
                if mask.any():
                    ax.contour(mask.astype(np.float32), levels=[0.5], colors=[COLOURS[code]], linewidths=0.7)
        axes[r, 0].set_ylabel(name, fontsize=7)
    from matplotlib.lines import Line2D

    fig.suptitle("Anomaly pixel maps on held-out slices (contours: reference scar / MVO)", fontsize=8)
    handles = [Line2D([], [], color=COLOURS[c], lw=1.2, label=t) for c, t in ((SCAR, "scar"), (MVO, "MVO"))]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return _save(fig, Path(path))
