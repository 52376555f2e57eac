"""Anatomical plausibility of a short-axis label map (canonical codes), for filtering generated label maps.

A map (H, W) is plausible when:

1. the LV blood pool is present and is one connected component;
2. the myocardial wall (MYO ∪ SCAR ∪ MVO) is one connected component that closes around the LV: every LV pixel
   lies inside the wall with its holes filled, and no LV pixel touches background or RV (4-neighbourhood);
3. the RV blood pool, when present, is one component beside the ring: no RV pixel lies inside the ring and none
   touches the LV;
4. no islands: components are counted with 8-connectivity, so a stray blob of any class is a second component.
   Components smaller than ``min_island`` pixels (default 2: single pixels) are dropped first: they are
   nearest-neighbour resampling specks (seen in the resampled phantom and in ACDC annotations), below the scale
   at which anatomy is judged.

Basal slices whose ring is open at the outflow tract fail rule 2 on real data too; the check is meant for
generated maps, where it filters broken anatomy (rejected fraction reported by the caller).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from medsynth.labels import LV, MYOCARDIAL_WALL, RV

_EIGHT = np.ones((3, 3), bool)


def _components(mask: np.ndarray) -> int:
    return int(ndimage.label(mask, structure=_EIGHT)[1])


def _touches(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether a pixel of ``a`` is 4-adjacent to a pixel of ``b``."""
    return bool((ndimage.binary_dilation(a) & b).any())


def _despeckle(mask: np.ndarray, min_island: int) -> np.ndarray:
    if min_island <= 1 or not mask.any():
        return mask
    lab, n = ndimage.label(mask, structure=_EIGHT)
    sizes = np.bincount(lab.ravel())
    return mask & (sizes[lab] >= min_island)


def check_label_map(label: np.ndarray, min_island: int = 2) -> str | None:
    """None when the (H, W) canonical label map is plausible, else the first rule it breaks (a short reason)."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label: a 2-D (H, W) map, got shape {label.shape}")
    if min_island < 1:
        raise ValueError(f"min_island: must be >= 1, got {min_island}")
    lv = _despeckle(label == LV, min_island)
    wall = _despeckle(np.isin(label, MYOCARDIAL_WALL), min_island)
    rv = _despeckle(label == RV, min_island)
    background = ~(lv | wall | rv)
    if not lv.any():
        return "no LV"
    if _components(lv) != 1:
        return "LV islands"
    if not wall.any():
        return "no myocardium"
    if _components(wall) != 1:
        return "myocardium islands"
    inside = ndimage.binary_fill_holes(wall) & ~wall
    if (rv & inside).any():
        return "RV inside the ring"
    if not (lv <= inside).all() or _touches(lv, background | rv):
        return "open myocardial ring"
    if rv.any() and _components(rv) != 1:
        return "RV islands"
    return None


@dataclass
class PlausibilityReport:
    """``keep`` (N,) bool; ``reasons``: count of each rejection reason; ``rejected_fraction`` in [0, 1]."""

    keep: np.ndarray
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def rejected_fraction(self) -> float:
        return float(1.0 - self.keep.mean()) if len(self.keep) else 0.0

    def as_dict(self) -> dict:
        return {"n": int(len(self.keep)), "rejected": int((~self.keep).sum()),
                "rejected_fraction": self.rejected_fraction, "reasons": dict(self.reasons)}  # fmt: skip


def check_label_maps(labels: np.ndarray, min_island: int = 2) -> PlausibilityReport:
    """:func:`check_label_map` over (N, H, W) maps."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels: (N, H, W) maps, got shape {labels.shape}")
    reasons = [check_label_map(m, min_island) for m in labels]
    keep = np.array([r is None for r in reasons], bool)
    return PlausibilityReport(keep, dict(sorted(Counter(r for r in reasons if r is not None).items())))


__all__ = ["PlausibilityReport", "check_label_map", "check_label_maps"]
