"""Tiny synthetic LGE-like slices (discs and rings with optional bright scar) for tests and benchmarks.

Not a phantom: just enough anatomy to exercise the families quickly. LV blood pool bright, healthy myocardium
dark, RV crescent, smooth background, Gaussian noise; "scar" is a bright transmural sector of the ring (code 4).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from medsynth.data.slices import META_COLUMNS, SliceSet
from medsynth.labels import LV, MYO, RV, SCAR
from medsynth.utils.seeding import rng


def toy_slices(
    n_subjects: int, slices_per_subject: int = 2, size: int = 32, scar: bool = False, seed: int = 0,
    split: str = "train", prefix: str = "toy",
) -> SliceSet:  # fmt: skip
    """``n_subjects × slices_per_subject`` slices (N, 1, size, size); infarct subjects (``scar=True``) carry a
    bright transmural sector labelled SCAR in every slice."""
    g = rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images, labels, rows = [], [], []
    for s in range(n_subjects):
        sid = f"{prefix}{'P' if scar else 'N'}{seed:03d}{s:03d}"
        cx, cy = 0.5 + g.normal(0, 0.03), 0.5 + g.normal(0, 0.03)
        for k in range(slices_per_subject):
            r_in = 0.14 + g.normal(0, 0.015) - 0.02 * k
            wall = 0.07 + g.normal(0, 0.008)
            r = np.hypot(xx - cx, yy - cy)
            lab = np.zeros((size, size), np.uint8)
            lab[r < r_in + wall] = MYO
            lab[r < r_in] = LV
            rv = (np.hypot(xx - cx + r_in + wall + 0.06, yy - cy) < 0.13) & (lab == 0)
            lab[rv] = RV
            if scar:
                ang = np.arctan2(yy - cy, xx - cx)
                centre = g.uniform(-np.pi, np.pi)
                sector = np.abs(np.angle(np.exp(1j * (ang - centre)))) < g.uniform(0.6, 1.0)
                lab[(lab == MYO) & sector] = SCAR
            img = 0.3 + 0.1 * np.sin(6 * xx + g.uniform(0, 6)) * np.cos(5 * yy)
            img = np.where(lab == LV, 0.85, img)
            img = np.where(lab == RV, 0.75, img)
            img = np.where(lab == MYO, 0.1, img)
            img = np.where(lab == SCAR, 1.1, img)
            img = img + g.normal(0, 0.04, img.shape)
            images.append(img.astype(np.float32)[None])
            labels.append(lab)
            rows.append(
                {
                    "subject_id": sid,
                    "case": f"{sid}.png",
                    "slice_index": str(k),
                    "dataset": "toy",
                    "modality": "lge",
                    "vendor": "toy",
                    "phase": "",
                    "pathology": "infarct" if scar else "normal",
                    "split": split,
                    "record": "{}",
                }  # fmt: skip
            )
    return SliceSet(np.stack(images), np.stack(labels), pd.DataFrame(rows, columns=list(META_COLUMNS)))
