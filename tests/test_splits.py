"""Patient-level, stratified, seeded splits; leakage refusal."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medsynth.cli.main import main
from medsynth.data.manifest import COLUMNS, check_split_leakage, load_manifest, write_manifest
from medsynth.data.splits import assign_splits, parse_fractions
from medsynth.errors import ManifestError


def _manifest(n_per_group: dict[str, int], rows_per_subject: int = 2) -> pd.DataFrame:
    rows = []
    for group, n in n_per_group.items():
        for i in range(n):
            for r in range(rows_per_subject):
                row = dict.fromkeys(COLUMNS, "")
                row.update(
                    subject_id=f"{group}{i:03d}",
                    image=f"{group}{i:03d}/{r}.nii.gz",
                    label=f"{group}{i:03d}/{r}_gt.nii.gz",
                    pathology=group,
                )
                rows.append(row)
    return pd.DataFrame(rows)


def test_every_subject_in_exactly_one_split_with_requested_sizes():
    df = _manifest({"normal": 17, "infarct": 33})
    out = assign_splits(df, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=0)
    per_subject = out.groupby("subject_id")["split"].nunique()
    assert (per_subject == 1).all() and len(per_subject) == 50
    sizes = out.groupby("split")["subject_id"].nunique().to_dict()
    assert sizes == {"train": 35, "val": 5, "test": 10}
    check_split_leakage(out)
    assert list(out["image"]) == list(df["image"])  # rows untouched apart from split


def test_stratified_by_pathology():
    df = _manifest({"normal": 20, "infarct": 40})
    out = assign_splits(df, {"train": 0.5, "val": 0.0, "test": 0.5}, seed=1)
    counts = out.groupby(["split", "pathology"])["subject_id"].nunique().unstack()
    assert counts.loc["test", "normal"] == 10 and counts.loc["test", "infarct"] == 20
    assert "val" not in set(out["split"])


def test_small_strata_still_hit_global_totals():
    # Five groups of 6 (ACDC-like): per-group rounding alone would give 20/5/5, not 21/3/6.
    df = _manifest({g: 6 for g in ("dcm", "hcm", "infarct", "normal", "arv")}, rows_per_subject=1)
    out = assign_splits(df, seed=0)
    sizes = out.groupby("split")["subject_id"].nunique().to_dict()
    assert sizes == {"train": 21, "val": 3, "test": 6}
    test_groups = out[out.split == "test"].groupby("pathology")["subject_id"].nunique()
    assert test_groups.max() - test_groups.min() <= 1  # test subjects spread over groups


def test_seeded_and_deterministic():
    df = _manifest({"normal": 10, "infarct": 10})
    a = assign_splits(df, seed=5)
    b = assign_splits(df.sample(frac=1.0, random_state=0), seed=5)  # row order must not matter
    c = assign_splits(df, seed=6)
    key = lambda d: d.groupby("subject_id")["split"].first().to_dict()  # noqa: E731
    assert key(a) == key(b)
    assert key(a) != key(c)


def test_no_stratify_and_tiny_sets():
    df = _manifest({"x": 3}, rows_per_subject=1)
    out = assign_splits(df, seed=0, stratify=None)
    assert sorted(out["split"]) == ["test", "train", "val"]  # each non-zero split gets a subject


def test_bad_fractions_and_columns():
    df = _manifest({"a": 4})
    with pytest.raises(ValueError, match="fractions"):
        assign_splits(df, {"train": 0.5, "test": 0.6})
    with pytest.raises(ValueError, match="fractions"):
        assign_splits(df, {"train": 0.5, "holdout": 0.5})
    with pytest.raises(ManifestError, match="stratify"):
        assign_splits(df, stratify="vendorx")
    assert parse_fractions("0.6,0.2,0.2") == {"train": 0.6, "val": 0.2, "test": 0.2}
    with pytest.raises(ValueError, match="fractions"):
        parse_fractions("0.5,0.5")


def test_leaky_manifest_refused(tmp_path, capsys):
    df = assign_splits(_manifest({"a": 4}), seed=0)
    subject = df.loc[0, "subject_id"]
    rows = df.index[df.subject_id == subject]
    df.loc[rows[0], "split"] = "train"
    df.loc[rows[1], "split"] = "test"
    with pytest.raises(ManifestError, match=subject):
        check_split_leakage(df, "m.csv")
    path = tmp_path / "leaky.csv"
    write_manifest(df, path)
    with pytest.raises(ManifestError, match="more than one split"):
        load_manifest(path, check_files=False)
    rc = main(["split", str(path), "--out", str(tmp_path / "out.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("medsynth: error:") and "leaky.csv" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.csv").exists()


def test_split_cli_bad_fractions(tmp_path, capsys):
    path = tmp_path / "m.csv"
    write_manifest(_manifest({"a": 4}), path)
    rc = main(["split", str(path), "--out", str(tmp_path / "o.csv"), "--fractions", "0.9,0.9,0.1"])
    assert rc == 2 and "fractions" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()


def test_split_fraction_matches_over_many_seeds():
    df = _manifest({"normal": 7, "infarct": 13}, rows_per_subject=1)
    test_counts = [int((assign_splits(df, seed=s)["split"] == "test").sum()) for s in range(10)]
    assert set(test_counts) == {4}
    membership = np.array([(assign_splits(df, seed=s)["split"] == "test").to_numpy() for s in range(10)])
    assert membership.any(axis=0).sum() > 4  # different seeds pick different test subjects
