"""HD95 through MONAI's edge/surface functions: the metric's numbers, without its FutureWarning."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import ndimage

from medsynth.evaluation.segmentation import hd95


def test_hd95_matches_monai_metric_and_warns_nothing() -> None:
    from monai.metrics import HausdorffDistanceMetric

    rng = np.random.default_rng(0)
    metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    for spacing in ((1.5, 1.5, 8.0), None):
        for _ in range(3):
            p = ndimage.gaussian_filter(rng.random((32, 32, 6)), 2) > 0.5
            g = ndimage.gaussian_filter(rng.random((32, 32, 6)), 2) > 0.5
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the reference itself raises the FutureWarning
                args = (torch.from_numpy(p)[None, None].float(), torch.from_numpy(g)[None, None].float())
                ref = metric(*args, spacing=spacing) if spacing else metric(*args)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # ours must not warn at all
                got = hd95(p, g, spacing)
            assert got == np.float32(ref[0, 0].item()) or abs(got - ref[0, 0].item()) < 1e-4
    assert np.isnan(hd95(np.zeros((4, 4, 2), bool), np.ones((4, 4, 2), bool)))
