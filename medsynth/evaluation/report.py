"""Evaluation outputs: tidy CSV tables, figures (metric bars with CIs, real-vs-synthetic grids, Dice box
plots) and a Markdown report. Every file is written atomically."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

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
    pc = per_case.groupby(["arm", "class", "case"], sort=False)["dice"].mean().reset_index()
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
    cols = [
        "arm",
        "class",
        "n_seeds",
        "dice_mean",
        "dice_std",
        "hd95_mean",
        "hd95_std",
        "dice_diff_vs_real",
        "dice_diff_ci_low",
        "dice_diff_ci_high",
    ]
    unit = per_case["hd95_unit"].iloc[0] if len(per_case) else "px"
    parts = [
        "# Downstream segmentation report",
        "",
        "2-D MONAI U-Net (DiceCE), evaluated per test patient volume in 3-D. Dice / HD95 "
        f"({unit}) are means over test volumes; mean ± std over seeds; the difference to real-only is paired by "
        "seed and test volume, with a bootstrap CI over test volumes.",
        "",
        md_table(summary[[c for c in cols if c in summary.columns]]),
        "",
        "![dice](dice_boxes.png)",
    ]
    if config:
        parts += ["", "Config: `" + ", ".join(f"{k}={v}" for k, v in config.items()) + "`"]
    with atomic_file(out / "report.md") as tmp:
        tmp.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return out / "report.md"
