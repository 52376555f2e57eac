"""How well a translation model does its job, on held-out slices of both domains.

Two questions, each against the untranslated baseline:

- **Appearance**: is the translated source closer to the real target domain? Fréchet distance (offline
  fixed-seed random CNN features, :mod:`medsynth.evaluation.features`) of source → target and of
  translated source → target, with bootstrap CIs.
- **Anatomy (segmentation consistency)**: a U-Net trained on the target domain's *real* labelled training
  slices segments the source test slices before and after translation; per-patient 3-D Dice against the
  source labels, for the classes labelled in both domains. A translation that keeps the anatomy and
  produces target appearance raises this Dice; one that hallucinates or erases structures lowers it.

Arrays stay in :class:`~medsynth.data.slices.SliceSet` (images (N, 1, H, W), labels (N, H, W)).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from medsynth.config import StrictModel, nested
from medsynth.data.slices import SliceSet
from medsynth.errors import MedsynthError
from medsynth.evaluation.features import get_extractor
from medsynth.evaluation.fidelity import bootstrap_fd, frechet_distance, percentile_ci
from medsynth.evaluation.segmentation import SegmentationConfig, evaluate_cases, train_unet
from medsynth.labels import CANONICAL, N_CLASSES
from medsynth.models.base import GenerativeModel, require

log = logging.getLogger(__name__)


class TranslationEvalConfig(StrictModel):
    extractor: str = "random_cnn"
    bootstrap: int = Field(100, ge=0)
    #: SegmentationConfig keys for the target-domain U-Net (validated with the config)
    segmentation: nested("medsynth.evaluation.segmentation:SegmentationConfig") = {}
    direction: Literal["forward", "backward"] = "forward"


def evaluate_translation(
    model: GenerativeModel, train: SliceSet, test: SliceSet, config: TranslationEvalConfig | None = None, seed: int = 0
) -> tuple[pd.DataFrame, SliceSet]:
    """Metrics table (one row per metric: ``metric, class, before, after, ci_*``) and the translated test
    slices. ``train`` supplies the target domain's real labelled slices for the U-Net, ``test`` both domains'
    held-out slices (patient-level split)."""
    cfg = config or TranslationEvalConfig()
    require(model, "translate")
    key, src, dst, from_test = model.translation_domains(test, cfg.direction)
    to_test = model.translation_domains(test, "backward" if cfg.direction == "forward" else "forward")[3]
    to_train = model.translation_domains(train, "backward" if cfg.direction == "forward" else "forward")[3]
    for name, mask in (("test", from_test), ("test", to_test), ("train", to_train)):
        if not mask.any():
            raise MedsynthError(f"{name}: no slices of the domain needed ({key} in {src!r}/{dst!r})")
    source, target, target_train = test.subset(from_test), test.subset(to_test), train.subset(to_train)
    translated = SliceSet(
        model.translate(source.images, seed=seed, direction=cfg.direction), source.labels, source.meta.copy()
    )
    rows: list[dict[str, Any]] = []

    extractor = get_extractor(cfg.extractor, seed=0)
    f_target, f_source, f_trans = extractor(target.images), extractor(source.images), extractor(translated.images)
    for name, feats in (("before", f_source), ("after", f_trans)):
        log.info("FD %s -> %s (%s translation): %.4g", src, dst, name, frechet_distance(feats, f_target))
    row: dict[str, Any] = {"metric": f"fd_{cfg.extractor}", "class": "all", "unit": "feature units"}
    for name, feats in (("before", f_source), ("after", f_trans)):
        row[name] = frechet_distance(feats, f_target)
        if cfg.bootstrap:
            lo, hi = percentile_ci(bootstrap_fd(feats, f_target, cfg.bootstrap, seed=seed))
            row[f"{name}_ci_low"], row[f"{name}_ci_high"] = lo, hi
    rows.append(row)

    seg_cfg = SegmentationConfig(**{"progress": False, **cfg.segmentation})
    in_both = [c for c in range(1, N_CLASSES) if (source.labels == c).any() and (target_train.labels == c).any()]
    if not in_both:
        raise MedsynthError(f"labels: no foreground class is labelled in both domains ({src!r}, {dst!r})")
    unet, info = train_unet(target_train, seg_cfg, seed)
    log.info("target-domain U-Net: %d slices, %.0f s", len(target_train), info["train_seconds"])
    per_case = {
        name: evaluate_cases(unet, s, seg_cfg, in_both).assign(stage=name)
        for name, s in (("before", source), ("after", translated))
    }
    both = pd.concat(per_case.values(), ignore_index=True)
    for c in [CANONICAL[c] for c in in_both] + ["mean"]:
        sel = both if c == "mean" else both[both["class"] == c]
        by = sel.groupby(["stage", "case"])["dice"].mean().unstack("stage").dropna()
        diff = (by["after"] - by["before"]).to_numpy()
        gen = np.random.default_rng(seed)
        boot = [diff[gen.integers(0, len(diff), len(diff))].mean() for _ in range(max(cfg.bootstrap, 1))]
        lo, hi = percentile_ci(np.asarray(boot)) if cfg.bootstrap else (np.nan, np.nan)
        rows.append(
            {
                "metric": "target_unet_dice",
                "class": c,
                "unit": "Dice",
                "before": float(by["before"].mean()),
                "after": float(by["after"].mean()),
                "diff": float(diff.mean()),
                "diff_ci_low": lo,
                "diff_ci_high": hi,
                "n_cases": len(by),
            }
        )
    table = pd.DataFrame(rows)
    table.insert(0, "direction", f"{src}->{dst}")
    return table, translated
