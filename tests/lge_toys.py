"""Tiny seeded LGE-like slice sets shared by the GMM and scar tests (not a test module)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from medsynth.data.slices import META_COLUMNS, SliceSet
from medsynth.labels import LV, MYO, RV, SCAR

TRUE_MEANS = {0: 0.2, LV: 0.8, MYO: 0.3, RV: 0.75, SCAR: 0.95}


def ring_labels(h: int, w: int, cx: float, cy: float, r_in: float, r_out: float, scar: bool) -> np.ndarray:
    """Canonical (H, W) map: LV disk, MYO ring, RV crescent, optional anterior scar in the ring."""
    yy, xx = np.indices((h, w))
    r = np.hypot(yy - cy, xx - cx)
    lab = np.zeros((h, w), np.uint8)
    lab[np.hypot(yy - cy, xx - (cx - r_out - 4)) < r_out] = RV
    lab[r < r_out] = MYO
    lab[r < r_in] = LV
    if scar:
        theta = np.arctan2(-(yy - cy), xx - cx)
        lab[(lab == MYO) & (np.abs(theta - np.pi / 2) < 0.8) & (r < r_in + 0.6 * (r_out - r_in))] = SCAR
    return lab


def make_slices(n_subjects: int = 8, per: int = 2, size: int = 48, seed: int = 0, spread: float = 0.05) -> SliceSet:
    """Tiny LGE-like SliceSet: per-subject tissue means = TRUE_MEANS + N(0, spread), noise SD 0.04."""
    rng = np.random.default_rng(seed)
    imgs, labs, rows = [], [], []
    for s in range(n_subjects):
        offset = {c: m + rng.normal(0, spread) for c, m in TRUE_MEANS.items()}
        for k in range(per):
            lab = ring_labels(size, size, size / 2 + rng.uniform(-2, 2), size / 2, 7, 11, scar=s % 2 == 1)
            img = np.zeros((size, size), np.float32)
            for c, m in offset.items():
                img[lab == c] = m
            img += rng.normal(0, 0.04, img.shape).astype(np.float32)
            imgs.append(img)
            labs.append(lab)
            meta = {"subject_id": f"s{s}", "modality": "lge", "slice_index": str(k)}
            rows.append({c: "" for c in META_COLUMNS} | meta)
    return SliceSet(np.stack(imgs)[:, None], np.stack(labs), pd.DataFrame(rows))
