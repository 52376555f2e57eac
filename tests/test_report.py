"""Report words follow the numbers: paragraphs from given tables (both signs, CIs crossing zero), no bare
``nan`` in rendered tables, figures with legends."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from medsynth.evaluation import report as rp


def _summary(d: float, lo: float, hi: float, hd: float = -1.0, hlo: float = -2.0, hhi: float = -0.5) -> pd.DataFrame:
    nan = float("nan")
    common = {"n_seeds": 3, "dice_std": 0.01, "hd95_std": 0.5, "dice_ci_low": 0.5, "dice_ci_high": 0.7}
    rows = [
        {**common, "arm": "real", "n_real_patients": 2, "class": "mean", "dice_mean": 0.60, "hd95_mean": 9.0,
         "reference_n": pd.NA, "dice_diff_vs_real": nan, "dice_diff_ci_low": nan, "dice_diff_ci_high": nan,
         "hd95_diff_vs_real": nan, "hd95_diff_ci_low": nan, "hd95_diff_ci_high": nan},
        {**common, "arm": "real+gmm", "n_real_patients": 2, "class": "mean", "dice_mean": 0.60 + d,
         "hd95_mean": 9.0 + hd, "reference_n": 2, "dice_diff_vs_real": d, "dice_diff_ci_low": lo,
         "dice_diff_ci_high": hi, "hd95_diff_vs_real": hd, "hd95_diff_ci_low": hlo, "hd95_diff_ci_high": hhi},
        {**common, "arm": "real", "n_real_patients": 2, "class": "lv", "dice_mean": 0.8, "hd95_mean": nan,
         "reference_n": pd.NA, "dice_diff_vs_real": nan, "dice_diff_ci_low": nan, "dice_diff_ci_high": nan,
         "hd95_diff_vs_real": nan, "hd95_diff_ci_low": nan, "hd95_diff_ci_high": nan, "dice_std": nan},
    ]  # fmt: skip
    return pd.DataFrame(rows)


def test_paragraph_says_better_worse_or_crossing_zero():
    up = rp.segmentation_paragraph(_summary(0.05, 0.02, 0.08), "mm")
    assert "+5.0 Dice points" in up and "+2.0 to +8.0" in up
    assert "entirely above zero: better than real-only" in up
    assert up.startswith("Synthetic data helped") and "real+gmm" in up
    assert "HD95 changed by -1.0 mm" in up and "entirely below zero: better than real-only" in up

    down = rp.segmentation_paragraph(_summary(-0.037, -0.047, -0.027, 1.0, 0.5, 2.0), "mm")
    assert "-3.7 Dice points" in down and "entirely below zero: worse than real-only" in down
    assert down.startswith("No arm with synthetic data beat real-only")
    assert "Worse than real-only, with the CI below zero: real+gmm with 2 real patients (-3.7 points)" in down
    assert "entirely above zero: worse than real-only" in down  # HD95 up = worse

    cross = rp.segmentation_paragraph(_summary(0.01, -0.01, 0.03, 0.2, -0.5, 0.9), "px")
    assert cross.count("the CI crosses zero") == 2 and "HD95 changed by +0.2 px" in cross
    assert cross.startswith("No arm") and "Worse than" not in cross
    for text in (up, down, cross):
        assert not re.search(r"\bnan\b", text, re.IGNORECASE)


def test_tables_have_units_reference_and_no_bare_nan():
    curve, per_class = rp.segmentation_tables(_summary(0.05, 0.02, 0.08), "mm")
    assert "HD95 (mm)" in curve.columns and "Δ Dice vs real-only, points [CI]" in curve.columns
    ref = curve.set_index("arm").loc["real"]
    assert ref["Δ Dice vs real-only, points [CI]"] == "–, reference"
    assert ref["Δ HD95 (mm) [CI]"] == "–, reference"
    assert curve.set_index("arm").loc["real+gmm", "Δ Dice vs real-only, points [CI]"].startswith("+5.0 [+2.0, +8.0]")
    assert per_class.iloc[0]["HD95 (mm)"] == "–"  # missing HD95 reads as a dash
    for table in (curve, per_class):
        text = table.to_string()
        assert not re.search(r"\bnan\b", text, re.IGNORECASE), text
    assert rp.fmt(float("nan")) == "–" and rp.fmt(None) == "–" and rp.fmt(0.12345) == "0.123"


def _fid(precision: float, rfd: float, model: str = "gmm") -> pd.DataFrame:
    rows = [
        ("fd", 0.2, 0.1, 0.3), ("rfd", rfd, rfd - 0.1, rfd + 0.1), ("fd_real_halves", 0.1, np.nan, np.nan),
        ("precision", precision, 0.0, 0.5), ("recall", 0.78, 0.7, 0.8), ("ms_ssim_synthetic", 0.3, 0.2, 0.4),
        ("ms_ssim_real", 0.2, 0.1, 0.3), ("memorised_fraction", 0.0, np.nan, np.nan),
    ]  # fmt: skip
    df = pd.DataFrame(rows, columns=["metric", "value", "ci_low", "ci_high"])
    df.insert(0, "model", model)
    return df


def test_fidelity_words_follow_the_numbers():
    zero = rp.fidelity_paragraph(_fid(0.0, 2.03))
    assert "precision is 0" in zero and "78%" in zero and "rFD 2.03" in zero and "2.0 times as far" in zero
    assert "less diverse" in zero and "No synthetic image is a near-copy" in zero
    half = rp.fidelity_paragraph(_fid(0.5, 1.05))
    assert "precision is 0" not in half and "50% of the synthetic images look like real ones" in half
    assert "about as close" in half
    both = pd.concat([_fid(0.0, 2.0, "gmm"), _fid(0.4, 1.1, "vae")], ignore_index=True)
    side = rp.fidelity_side_by_side(both)
    assert list(side.columns) == ["metric", "gmm", "vae"]  # families side by side
    assert side.set_index("metric").loc["fd_real_halves", "gmm"] == "0.1"  # no "[nan, nan]"
    assert not re.search(r"\bnan\b", side.to_string(), re.IGNORECASE)
    assert all(m in rp.FIDELITY_EXPLAINED for m in side["metric"])
    assert "divided by the real-vs-real" in rp.FIDELITY_EXPLAINED["rfd"]


def test_learning_curve_figure(tmp_path):
    import matplotlib.pyplot as plt

    summary = pd.DataFrame(
        [
            {"arm": a, "n_real_patients": n, "class": "mean", "dice_mean": v, "dice_ci_low": v - 0.05,
             "dice_ci_high": v + 0.05}
            for a, n, v in [("real", 2, 0.5), ("real", 4, 0.7), ("real+gmm", 2, 0.6), ("real+gmm", 4, 0.72),
                            ("gmm only", 0, 0.3)]
        ]
    )  # fmt: skip
    captured = {}
    orig = rp._save

    def keep(fig, path):
        ax = fig.axes[0]
        captured["labels"] = [t.get_text() for t in ax.get_legend().get_texts()]
        captured["xlabel"], captured["ylabel"] = ax.get_xlabel(), ax.get_ylabel()
        return orig(fig, path)

    rp._save = keep
    try:
        path = rp.plot_learning_curve(summary, tmp_path / "lc.png")
    finally:
        rp._save = orig
        plt.close("all")
    assert path.stat().st_size > 0
    assert captured["labels"] == ["real", "real+gmm", "gmm only (0 real patients)"]
    assert "patients" in captured["xlabel"] and "Dice" in captured["ylabel"] and "fraction" in captured["ylabel"]


@pytest.mark.parametrize("n_sets", [1, 2])
def test_samples_figure_has_a_row_per_set(tmp_path, n_sets):
    from medsynth.data.slices import SliceSet

    def sset(k: int) -> SliceSet:
        img = np.random.default_rng(k).random((4, 1, 16, 16)).astype(np.float32)
        lab = np.zeros((4, 16, 16), np.uint8)
        lab[:, 4:10, 4:10] = 1
        lab[:, 6:8, 6:8] = 3
        return SliceSet(img, lab, pd.DataFrame({"subject_id": list("abcd")}))

    sets = [(f"fam{k}", sset(k)) for k in range(n_sets)]
    path = rp.plot_samples(sset(9), sets, tmp_path / "s.png", n=3)
    assert path.stat().st_size > 0


def test_samples_show_the_image_itself_with_thin_label_contours(tmp_path, monkeypatch):
    """The labels must not cover the appearance the figure compares: the grey image is drawn as it is, the
    labels as thin contour lines (one per class present), named by a legend; every panel has a title."""
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from medsynth.data.slices import SliceSet

    img = np.random.default_rng(0).random((3, 1, 16, 16)).astype(np.float32)
    lab = np.zeros((3, 16, 16), np.uint8)
    lab[:, 3:12, 3:12] = 2
    lab[:, 5:10, 5:10] = 1
    s = SliceSet(img, lab, pd.DataFrame({"subject_id": ["p1", "p2", "p3"], "phase": "ED", "slice_index": [0, 1, 2]}))
    shown, contours, legends, titles = [], [], [], []
    imshow, contour, legend, set_title = Axes.imshow, Axes.contour, Figure.legend, Axes.set_title

    def spy_imshow(self, x, *a, **k):
        shown.append(np.asarray(x))
        return imshow(self, x, *a, **k)

    def spy_contour(self, *a, **k):
        contours.append(k)
        return contour(self, *a, **k)

    def spy_legend(self, *a, **k):
        legends.append([h.get_label() for h in k.get("handles", [])])
        return legend(self, *a, **k)

    def spy_title(self, text, *a, **k):
        titles.append(text)
        return set_title(self, text, *a, **k)

    monkeypatch.setattr(Axes, "imshow", spy_imshow)
    monkeypatch.setattr(Axes, "contour", spy_contour)
    monkeypatch.setattr(Figure, "legend", spy_legend)
    monkeypatch.setattr(Axes, "set_title", spy_title)
    path = rp.plot_samples(s, [("gmm", s)], tmp_path / "s.png", n=3)
    assert path.stat().st_size > 0
    assert len(shown) == 6 and all(x.ndim == 2 for x in shown)  # grey images, not a coloured overlay
    assert np.array_equal(shown[0], img[0, 0])  # the pixels themselves, nothing painted over them
    assert len(contours) == 6 * 2 and all(k["linewidths"] < 1.5 for k in contours)  # myo and lv, thin lines
    assert legends == [["lv", "myo"]]
    assert titles[:3] == ["p1 ED z0", "p2 ED z1", "p3 ED z2"]


def test_anomaly_paragraph_and_pixel_map_figure(tmp_path) -> None:
    import numpy as np
    import pandas as pd
    from lge_toys import make_slices

    from medsynth.evaluation.report import anomaly_paragraph, plot_anomaly_maps

    metrics = pd.DataFrame(
        {"method": ["flow", "nsd3", "gmm>0.5"], "slice_auroc": [0.7, 0.8, 0.75], "case_auroc": [0.95, 0.9, 0.7],
         "pixel_dice": [0.3, 0.6, 0.62]}
    )  # fmt: skip
    text = anomaly_paragraph(metrics)
    assert "0.95 (flow)" in text and "flow scores higher" in text and "gmm>0.5 (0.62)" in text
    worse = metrics.assign(case_auroc=[0.5, 0.9, 0.7])
    assert "no learned model scores higher" in anomaly_paragraph(worse)
    test = make_slices(n_subjects=4)
    maps = np.random.default_rng(0).random(test.labels.shape).astype(np.float16)
    out = plot_anomaly_maps(test, [("m1", maps), ("m2", maps)], tmp_path / "maps.png")
    assert out.stat().st_size > 0


def test_rejection_line_names_counts_and_reasons():
    line = rp.rejection_line(
        "ddpm_joint",
        {"n": 40, "rejected": 15, "rejected_fraction": 0.375, "reasons": {"LV islands": 4, "open myocardial ring": 11}},
    )
    assert "40 label maps generated, 15 rejected" in line and "(38 %" in line
    assert line.index("open myocardial ring 11") < line.index("LV islands 4")  # most frequent first
    assert "the 25 that passed" in line
