"""Who counts as healthy and which slices can take a synthetic scar: one definition for every command.

Used by the flows (``fit_on: healthy_train``, scar cases), the CLI (``medsynth scar``), the anomaly protocol
and the scar evaluation. Label codes are the canonical ones of :mod:`medsynth.labels`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from medsynth.data.slices import SliceSet
from medsynth.labels import LV, MVO, MYO, SCAR

#: Pathology values (compared lower-cased, stripped) of healthy subjects; empty = not recorded.
HEALTHY_PATHOLOGY = frozenset({"normal", "nor", "healthy", "none", "", "nan"})
#: A slice needs at least this many healthy-myocardium pixels to take a synthetic scar.
MIN_MYO_PIXELS = 20


def has_scar(labels: np.ndarray) -> np.ndarray:
    """(N,) bool: the (N, H, W) canonical label maps hold scar or MVO."""
    return np.isin(labels, (SCAR, MVO)).any(axis=(1, 2))


def healthy_subjects(slices: SliceSet) -> np.ndarray:
    """(N,) bool slice mask of healthy subjects: the pathology says normal (or nothing) and no slice of the
    subject carries scar / MVO labels."""
    meta = slices.meta
    scarred = pd.Series(has_scar(slices.labels)).groupby(meta["subject_id"].to_numpy()).transform("any")
    path = meta.get("pathology", pd.Series([""] * len(meta))).astype(str).str.strip().str.lower()
    return (path.isin(HEALTHY_PATHOLOGY).to_numpy()) & ~scarred.to_numpy()


def scar_eligible(labels: np.ndarray) -> np.ndarray:
    """(N,) bool: slices with an LV blood pool, at least :data:`MIN_MYO_PIXELS` healthy myocardium and no
    scar / MVO — those a scar can be inserted into."""
    return (labels == LV).any(axis=(1, 2)) & ((labels == MYO).sum(axis=(1, 2)) >= MIN_MYO_PIXELS) & ~has_scar(labels)


def scar_removable(labels: np.ndarray) -> np.ndarray:
    """(N,) bool: slices with an LV blood pool and scar / MVO — those a scar-free counterpart is made of."""
    return (labels == LV).any(axis=(1, 2)) & has_scar(labels)
