"""Memorisation check: is any synthetic sample a (near-)copy of a real training image?

Each synthetic sample's distance to its nearest real *training* image is compared with the baseline of
real *held-out* images' nearest-training distances: a held-out real image is, by construction, not a copy,
so a synthetic sample far closer to the training set than held-out data ever gets is flagged.

Distances are computed in a copy-sensitive space (``space="pixels"``): images are downsampled to
``size``² (area averaging, so sub-pixel shifts and light noise barely move them) and z-scored per image
(so global brightness / contrast changes do not hide a copy); distance = RMS difference. Features of an
extractor can be used instead (``space="features"``).

A sample is flagged when ``d_nn < threshold``, ``threshold = factor × quantile_q(held-out baseline)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from medsynth.config import StrictModel

if TYPE_CHECKING:
    from medsynth.data.slices import SliceSet
    from medsynth.evaluation.features import FeatureExtractor


class MemorisationConfig(StrictModel):
    """Settings of :func:`check_memorisation`."""

    space: str = "pixels"  # pixels | features
    size: int = 32
    quantile: float = 0.05
    factor: float = 0.5


@dataclass
class MemorisationResult:
    """``per_sample``: one row per synthetic sample (nn_index, distance, ratio to the baseline median,
    flagged); ``baseline``: held-out real nearest-training distances; ``threshold``; ``summary`` dict."""

    per_sample: pd.DataFrame
    baseline: np.ndarray
    threshold: float
    summary: dict


def _images(x) -> np.ndarray:
    from medsynth.data.slices import SliceSet

    arr = x.images if isinstance(x, SliceSet) else np.asarray(x, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4 or arr.shape[1] != 1:
        raise ValueError(f"images: expected (N, 1, H, W), got {arr.shape}")
    return arr.astype(np.float32)


def pixel_embedding(images: np.ndarray, size: int = 32) -> np.ndarray:
    """Images (N, 1, H, W) → (N, size²): area-downsampled, z-scored per image, scaled to unit RMS."""
    x = torch.from_numpy(_images(images)).clamp(-0.5, 2.0)
    if len(x) == 0:
        return np.zeros((0, size * size))
    x = F.adaptive_avg_pool2d(x, (size, size)).reshape(len(x), -1).double()
    x = x - x.mean(dim=1, keepdim=True)
    x = x / x.std(dim=1, keepdim=True).clamp_min(1e-6)
    return x.numpy()


def _nn(query: np.ndarray, ref: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Nearest neighbour index and RMS distance of each query row in ``ref``."""
    r2 = (ref * ref).sum(1)
    idx = np.empty(len(query), dtype=np.int64)
    dist = np.empty(len(query))
    d = query.shape[1]
    for s in range(0, len(query), chunk):
        q = query[s : s + chunk]
        d2 = (q * q).sum(1)[:, None] + r2[None, :] - 2.0 * q @ ref.T
        j = d2.argmin(axis=1)
        idx[s : s + chunk] = j
        dist[s : s + chunk] = np.sqrt(np.clip(d2[np.arange(len(q)), j], 0.0, None) / d)
    return idx, dist


def check_memorisation(
    synthetic: SliceSet | np.ndarray,
    real_train: SliceSet | np.ndarray,
    real_test: SliceSet | np.ndarray,
    config: MemorisationConfig | None = None,
    extractor: FeatureExtractor | None = None,
) -> MemorisationResult:
    """Flag synthetic samples that are near-copies of real training images (see module docstring)."""
    cfg = config or MemorisationConfig()
    if cfg.space not in ("pixels", "features"):
        raise ValueError(f"space: expected 'pixels' or 'features', got {cfg.space!r}")
    if cfg.space == "features" and extractor is None:
        raise ValueError("extractor: required when space='features'")

    def embed(x) -> np.ndarray:
        if cfg.space == "pixels":
            return pixel_embedding(x, cfg.size)
        return extractor(_images(x))

    e_train, e_test, e_syn = embed(real_train), embed(real_test), embed(synthetic)
    if len(e_train) == 0 or len(e_test) == 0:
        raise ValueError("real_train / real_test: both must be non-empty")
    _, baseline = _nn(e_test, e_train)
    threshold = cfg.factor * float(np.quantile(baseline, cfg.quantile))
    idx, dist = _nn(e_syn, e_train)
    median = float(np.median(baseline))
    per = pd.DataFrame(
        {
            "nn_index": idx,
            "distance": dist,
            "ratio": dist / max(median, 1e-12),
            "flagged": dist < threshold,
        }
    )
    summary = {
        "n_synthetic": len(per),
        "n_flagged": int(per["flagged"].sum()),
        "fraction_flagged": float(per["flagged"].mean()) if len(per) else 0.0,
        "median_ratio": float(per["ratio"].median()) if len(per) else float("nan"),
        "baseline_median": median,
        "threshold": threshold,
        "space": cfg.space,
        # names the embedding (and extractor hash) so the number is traceable like every metric row
        "method": (f"pixels-{cfg.size}px" if cfg.space == "pixels" else f"features-{extractor.hash}")
        + f"-q{cfg.quantile}-x{cfg.factor}",
    }
    return MemorisationResult(per, baseline, threshold, summary)
