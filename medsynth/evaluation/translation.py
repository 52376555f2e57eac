"""How well a translation model does its job, on held-out slices of both domains.

Two questions, each against the untranslated baseline:

- **Appearance**: is the translated source closer to the real target domain? Fréchet distance (offline
  fixed-seed random CNN features, :mod:`medsynth.evaluation.features`) of source → target and of
  translated source → target, with bootstrap CIs.
- **Anatomy (segmentation consistency)**: a U-Net trained on the target domain's *real* labelled training
  slices segments the source test slices before and after translation; per-patient 3-D Dice against the
  source labels, for the classes labelled in both domains. A translation that keeps the anatomy and
  produces target appearance raises this Dice; one that hallucinates or erases structures lowers it.
- **Paired fidelity** (when the test slices hold pairs: the same subject, phase and slice acquired in both
  domains, as the phantom's scanner A / B renderings of one heart are): PSNR and SSIM of each translated
  slice against its true target-domain slice, next to the untranslated source against the same slice, with
  a bootstrap CI of the paired difference over subjects (:func:`paired_similarity`, :func:`pair_index`).

Arrays stay in :class:`~medsynth.data.slices.SliceSet` (images (N, 1, H, W), labels (N, H, W)).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
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
from medsynth.utils.hashing import sha256_arrays, sha256_json

log = logging.getLogger(__name__)

#: metadata columns that identify one acquisition of a slice across domains (a pair shares all three)
PAIR_KEYS = ("subject_id", "phase", "slice_index")


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
    rows: list[dict[str, Any]] = paired_rows(source, translated, target, cfg.bootstrap, seed)

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
    unet, info = _target_unet(target_train, seg_cfg, seed)
    log.info("target-domain U-Net: %d slices, %.0f s", len(target_train), info["train_seconds"])
    per_case = {
        name: evaluate_cases(unet, s, seg_cfg, in_both).assign(stage=name)
        for name, s in (("before", source), ("after", translated))
    }
    both = pd.concat(per_case.values(), ignore_index=True)
    for c in [CANONICAL[c] for c in in_both] + ["mean"]:
        sel = both if c == "mean" else both[both["class"] == c]
        by = sel.groupby(["stage", "case"])["dice"].mean().unstack("stage").dropna()
        rows.append(_paired_row(by, "target_unet_dice", c, "Dice", cfg.bootstrap, seed))
    table = pd.DataFrame(rows)
    table.insert(0, "direction", f"{src}->{dst}")
    return table, translated


#: target-domain U-Nets already trained in this process, by (data, config, seed): a run that compares several
#: translation models scores them all against the same target domain, and training is deterministic, so the
#: 2nd..nth model reuse the first one's U-Net instead of training identical copies (on a 2-core machine that is
#: most of the evaluation's time). Bounded: only the latest few are kept.
_UNETS: OrderedDict[str, tuple[Any, dict]] = OrderedDict()
_UNETS_LOCK = threading.Lock()
_UNETS_MAX = 2


def _target_unet(target_train: SliceSet, cfg: SegmentationConfig, seed: int) -> tuple[Any, dict]:
    """:func:`train_unet` on ``target_train``, memoised per process (concurrent callers with the same key wait
    for one training)."""
    key = sha256_json(
        {
            "data": sha256_arrays({"images": target_train.images, "labels": target_train.labels}),
            "cfg": cfg.model_dump(mode="json"),
            "seed": seed,
        }
    )
    with _UNETS_LOCK:  # held while training: the callers that share a key would otherwise train it in parallel
        if key in _UNETS:
            _UNETS.move_to_end(key)
            log.info("target-domain U-Net: reusing the one trained for an earlier model of this run")
            return _UNETS[key]
        unet, info = train_unet(target_train, cfg, seed)
        _UNETS[key] = (unet, info)
        while len(_UNETS) > _UNETS_MAX:
            _UNETS.popitem(last=False)
        return unet, info


# ---- paired fidelity ------------------------------------------------------------------------------------
def pair_index(source: SliceSet, target: SliceSet, keys: tuple[str, ...] = PAIR_KEYS) -> np.ndarray:
    """(N_source,) int: for each source slice, the index of the target slice with the same ``keys`` values
    (same subject, phase and slice position), or -1 when there is none or the match is ambiguous (two target
    slices share the keys) or the slice shapes differ."""
    out = np.full(len(source), -1, dtype=np.int64)
    if not len(source) or not len(target) or any(k not in source.meta or k not in target.meta for k in keys):
        return out
    if source.images.shape[1:] != target.images.shape[1:]:
        return out
    tkey = target.meta[list(keys)].astype(str).agg("|".join, axis=1).to_numpy()
    uniq, counts = np.unique(tkey, return_counts=True)
    where = {k: i for i, k in enumerate(tkey) if counts[np.searchsorted(uniq, k)] == 1}
    skey = source.meta[list(keys)].astype(str).agg("|".join, axis=1).to_numpy()
    for i, k in enumerate(skey):
        out[i] = where.get(k, -1)
    return out


def paired_similarity(
    images: np.ndarray, reference: np.ndarray, data_range: float | None = None
) -> dict[str, np.ndarray]:
    """Per-slice PSNR (dB) and SSIM of ``images`` against ``reference`` (both (N, 1, H, W) or (N, H, W)).

    ``data_range``: the dynamic range L of PSNR (10·log10(L²/MSE)) and of SSIM's constants; ``None`` = each
    reference slice's max − min (so a pair's score does not depend on what it is compared with). SSIM is
    Wang et al. (2004): Gaussian window σ = 1.5 px, K1 = 0.01, K2 = 0.03, population statistics
    (scikit-image's ``structural_similarity`` with those settings). Identical slices give PSNR = inf, SSIM = 1.
    """
    from skimage.metrics import structural_similarity

    x = np.asarray(images, dtype=np.float64)
    y = np.asarray(reference, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"images/reference: shapes differ, {x.shape} vs {y.shape}")
    if x.ndim == 4:
        if x.shape[1] != 1:
            raise ValueError(f"images: expected (N, 1, H, W), got {x.shape}")
        x, y = x[:, 0], y[:, 0]
    if x.ndim != 3:
        raise ValueError(f"images: expected (N, H, W) or (N, 1, H, W), got {x.shape}")
    if data_range is not None and not data_range > 0:
        raise ValueError(f"data_range: must be > 0, got {data_range}")
    psnr = np.empty(len(x))
    ssim = np.empty(len(x))
    for i in range(len(x)):
        rng = float(data_range) if data_range is not None else float(y[i].max() - y[i].min()) or 1.0
        mse = float(np.mean((x[i] - y[i]) ** 2))
        psnr[i] = np.inf if mse == 0 else 10.0 * np.log10(rng**2 / mse)
        ssim[i] = structural_similarity(
            x[i], y[i], data_range=rng, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
    return {"psnr": psnr, "ssim": ssim}


def _paired_row(by: pd.DataFrame, metric: str, cls: str, unit: str, bootstrap: int, seed: int) -> dict[str, Any]:
    """One before/after row from per-case means ``by`` (columns "before", "after"): the means, their paired
    difference and its percentile bootstrap CI over cases (NaN without bootstrap)."""
    diff = (by["after"] - by["before"]).to_numpy()
    gen = np.random.default_rng(seed)
    boot = [diff[gen.integers(0, len(diff), len(diff))].mean() for _ in range(max(bootstrap, 1))]
    lo, hi = percentile_ci(np.asarray(boot)) if bootstrap else (np.nan, np.nan)
    return {
        "metric": metric, "class": cls, "unit": unit,
        "before": float(by["before"].mean()), "after": float(by["after"].mean()), "diff": float(diff.mean()),
        "diff_ci_low": lo, "diff_ci_high": hi, "n_cases": len(by),
    }  # fmt: skip


def paired_rows(
    source: SliceSet, translated: SliceSet, target: SliceSet, bootstrap: int = 100, seed: int = 0
) -> list[dict[str, Any]]:
    """``paired_psnr`` / ``paired_ssim`` rows (before = untranslated source vs its true target slice, after =
    translated vs the same slice; means over subjects of per-subject means, bootstrap CI of the paired
    difference over subjects); no rows when ``source`` and ``target`` hold no pairs."""
    idx = pair_index(source, target)
    ok = idx >= 0
    if not ok.any():
        return []
    truth = target.images[idx[ok]]
    before = paired_similarity(source.images[ok], truth)
    after = paired_similarity(translated.images[ok], truth)
    subjects = source.meta["subject_id"].astype(str).to_numpy()[ok]
    log.info("paired fidelity: %d of %d source slices have a true target slice", int(ok.sum()), len(source))
    rows = []
    for metric, unit in (("psnr", "dB"), ("ssim", "SSIM")):
        per = pd.DataFrame({"case": subjects, "before": before[metric], "after": after[metric]})
        by = per.groupby("case")[["before", "after"]].mean()
        rows.append({**_paired_row(by, f"paired_{metric}", "all", unit, bootstrap, seed), "n_slices": int(ok.sum())})
    return rows


def paired_targets(source: SliceSet, candidates: SliceSet) -> SliceSet | None:
    """The true target-domain slice of every ``source`` slice, in order, from ``candidates`` (e.g. the same
    split's slices of the other domain); ``None`` unless every source slice has one."""
    idx = pair_index(source, candidates)
    if not len(idx) or (idx < 0).any():
        return None
    return candidates.subset(idx)
