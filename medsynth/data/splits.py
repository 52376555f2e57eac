"""Patient-level, stratified, seeded train / val / test splits of a manifest."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pandas as pd

from medsynth.data.manifest import check_split_leakage
from medsynth.errors import ManifestError
from medsynth.utils.seeding import rng

log = logging.getLogger(__name__)

DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.7, "val": 0.1, "test": 0.2}
SPLIT_NAMES = ("train", "val", "test")


def parse_fractions(text: str) -> dict[str, float]:
    """``'0.7,0.1,0.2'`` → ``{'train': 0.7, 'val': 0.1, 'test': 0.2}`` (validated)."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 3:
        raise ValueError(f"fractions: expected three comma-separated numbers train,val,test, got {text!r}")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"fractions: {text!r} is not three numbers") from None
    return check_fractions(dict(zip(SPLIT_NAMES, values, strict=True)))


def check_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    """Validate split fractions: keys among train/val/test, non-negative, summing to 1, train > 0."""
    unknown = [k for k in fractions if k not in SPLIT_NAMES]
    if unknown:
        raise ValueError(f"fractions: unknown split(s) {unknown}; allowed {list(SPLIT_NAMES)}")
    out = {k: float(fractions.get(k, 0.0)) for k in SPLIT_NAMES}
    if any(not np.isfinite(v) or v < 0 for v in out.values()):
        raise ValueError(f"fractions: must be finite and non-negative, got {out}")
    if abs(sum(out.values()) - 1.0) > 1e-6:
        raise ValueError(f"fractions: must sum to 1, got {sum(out.values()):.6g} ({out})")
    if out["train"] <= 0:
        raise ValueError("fractions: train fraction must be > 0")
    return out


def _largest_remainder(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """Integer counts summing to ``n``, closest to ``n * fraction``; every non-zero split gets ≥ 1 when possible."""
    ideal = {k: n * f for k, f in fractions.items()}
    counts = {k: int(np.floor(v)) for k, v in ideal.items()}
    rest = n - sum(counts.values())
    for k in sorted(ideal, key=lambda k: (-(ideal[k] - counts[k]), SPLIT_NAMES.index(k)))[:rest]:
        counts[k] += 1
    nonzero = [k for k, f in fractions.items() if f > 0]
    if n >= len(nonzero):
        for k in nonzero:
            if counts[k] == 0:
                donor = max(counts, key=lambda d: counts[d])
                counts[donor] -= 1
                counts[k] += 1
    return counts


def assign_splits(
    df: pd.DataFrame,
    fractions: Mapping[str, float] | None = None,
    seed: int = 0,
    stratify: str | None = "pathology",
) -> pd.DataFrame:
    """Return a copy of ``df`` with its ``split`` column set per subject (all rows of a subject share one split).

    Subjects are grouped by the ``stratify`` column (the most frequent value per subject; ``None`` = no
    strata). Global split sizes are the largest-remainder rounding of ``n_subjects × fraction``; within that
    total each stratum gets its proportional share, remainders going to the cells with the largest
    fractional parts (ties broken by the seeded generator). Subjects are shuffled by ``seed`` inside each
    stratum, so the same manifest and seed give the same split. Existing splits are overwritten.
    """
    fr = check_fractions(DEFAULT_FRACTIONS if fractions is None else fractions)
    if "subject_id" not in df.columns:
        raise ManifestError("manifest: no subject_id column; cannot split by patient")
    if stratify is not None and stratify not in df.columns:
        raise ManifestError(f"manifest: stratify column {stratify!r} not found; columns are {list(df.columns)}")
    if len(df) == 0:
        raise ManifestError("manifest: no rows to split")
    gen = rng(seed)
    subjects = sorted(df["subject_id"].astype(str).unique())
    if stratify is None:
        stratum = dict.fromkeys(subjects, "")
    else:
        per = df.astype({stratify: str}).groupby(df["subject_id"].astype(str))[stratify]
        stratum = {s: str(v.value_counts().sort_index().idxmax()) for s, v in per}
    strata = sorted(set(stratum.values()))
    members = {st: [s for s in subjects if stratum[s] == st] for st in strata}
    totals = _largest_remainder(len(subjects), fr)

    # Proportional allocation of the global totals over strata (a small transportation problem, solved greedily).
    names = [k for k in SPLIT_NAMES]
    alloc = {st: {k: int(np.floor(len(members[st]) * fr[k])) for k in names} for st in strata}
    row_left = {st: len(members[st]) - sum(alloc[st].values()) for st in strata}
    col_left = {k: totals[k] - sum(alloc[st][k] for st in strata) for k in names}
    cells = [(st, k, len(members[st]) * fr[k] - alloc[st][k], gen.random()) for st in strata for k in names]
    cells.sort(key=lambda c: (-c[2], c[3]))
    for allow_any in (False, True):
        for st, k, frac, _ in cells:
            # First pass: one extra per cell with a fractional claim; second: fill whatever balances the totals.
            while row_left[st] > 0 and col_left[k] > 0 and (allow_any or frac > 0):
                alloc[st][k] += 1
                row_left[st] -= 1
                col_left[k] -= 1
                if not allow_any:
                    break
    # Flooring can exceed a split's global total (rare); move the excess to splits still short.
    for k in names:
        while col_left[k] < 0:
            st = max(strata, key=lambda s: alloc[s][k])
            other = max(names, key=lambda o: col_left[o])
            alloc[st][k] -= 1
            alloc[st][other] += 1
            col_left[k] += 1
            col_left[other] -= 1

    assignment: dict[str, str] = {}
    for st in strata:
        order = list(members[st])
        gen.shuffle(order)
        pos = 0
        for k in names:
            for s in order[pos : pos + alloc[st][k]]:
                assignment[s] = k
            pos += alloc[st][k]
    out = df.copy()
    out["split"] = out["subject_id"].astype(str).map(assignment)
    if out["split"].isna().any():  # defensive: the allocation above always covers every subject
        raise ManifestError("manifest: internal error, some subjects got no split")
    check_split_leakage(out)
    counts = {k: sum(1 for v in assignment.values() if v == k) for k in names}
    log.info("split %d subjects (seed %d, stratified by %s): %s", len(subjects), seed, stratify, counts)
    return out
