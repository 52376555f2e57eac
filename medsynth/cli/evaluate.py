"""``medsynth evaluate fidelity`` and ``medsynth evaluate segmentation``: thin wrappers over the operations
the flows run (:func:`medsynth.workflows.ops.fidelity_table`) and :mod:`medsynth.evaluation`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from medsynth.errors import ConfigError, ManifestError

log = logging.getLogger(__name__)


def register(commands: argparse._SubParsersAction, evaluate: argparse._SubParsersAction) -> None:
    f = evaluate.add_parser(
        "fidelity",
        help="FD / relative FD / KID / precision-recall-density-coverage / MS-SSIM diversity / memorisation",
        description="Compare a synthetic manifest with a real one on features of an offline extractor. Writes "
        "DIR/fidelity.csv (one row per metric: value, ci_low, ci_high, extractor, extractor_hash, n_real, "
        "n_synthetic), figures and DIR/report.md and DIR/memorisation.csv "
        "(synthetic vs the real train split, baseline: real test split; a seeded patient-level 70/30 split is "
        "assigned when the manifest has none).",
    )
    f.add_argument("--real", required=True, metavar="M.csv", help="real manifest")
    f.add_argument("--synthetic", required=True, metavar="M.csv", help="synthetic manifest")
    f.add_argument("--out", required=True, metavar="DIR", help="output directory (replaced atomically)")
    f.add_argument("--data-root", default=None, metavar="DIR", help="root of the real manifest's paths")
    f.add_argument("--synthetic-data-root", default=None, metavar="DIR", help="root of the synthetic manifest")
    f.add_argument(
        "--extractor",
        default="random_cnn",
        metavar="SPEC",
        help="'random_cnn' (fixed seed, default), 'domain' (train an encoder on the real training split and "
        "save it under DIR/extractor) or a saved extractor folder",
    )
    f.add_argument("--config", default=None, metavar="FILE", help="YAML with FidelityConfig keys")
    f.add_argument("--size", type=int, default=128, metavar="PX", help="slice size for preprocessing (128)")
    # memorisation needs real train/test subjects; a manifest without a split gets a seeded 70/30 one
    f.set_defaults(func=run_fidelity)

    s = evaluate.add_parser(
        "segmentation",
        help="downstream U-Net: real-only vs real+synthetic vs synthetic-only, per-patient 3-D Dice / HD95",
        description="Train a 2-D U-Net per arm and seed, evaluate on the real test split per patient volume. "
        "Writes DIR/segmentation.csv (arm x seed x class: dice, hd95), DIR/summary.csv (mean, std, paired "
        "difference to real-only with CI), DIR/segmentation_per_case.csv, DIR/dice_boxes.png, DIR/report.md.",
    )
    s.add_argument("--real", required=True, metavar="M.csv", help="real manifest (split column: train/test)")
    s.add_argument("--synthetic", default=None, metavar="M.csv", help="synthetic manifest (optional)")
    s.add_argument("--out", required=True, metavar="DIR", help="output directory (replaced atomically)")
    s.add_argument("--config", default=None, metavar="FILE", help="YAML with SegmentationConfig keys")
    s.add_argument("--data-root", default=None, metavar="DIR", help="root of the real manifest's paths")
    s.add_argument("--synthetic-data-root", default=None, metavar="DIR", help="root of the synthetic manifest")
    s.add_argument("--size", type=int, default=128, metavar="PX", help="slice size for preprocessing (128)")
    s.set_defaults(func=run_segmentation)


def _load(manifest: str, data_root: str | None, size: int):
    from medsynth.data.preprocess import PreprocessConfig, load_slices

    return load_slices(manifest, data_root=data_root, cfg=PreprocessConfig(size=size))


def ensure_split(slices, test_fraction: float, seed: int):
    """Keep the manifest's train/test split; when no slice has one, assign a seeded patient-level split."""
    import pandas as pd

    split = slices.meta["split"].fillna("").astype(str)
    if (split == "").all():
        from medsynth.data.splits import assign_splits

        subj = slices.meta[["subject_id", "pathology"]].astype(str).drop_duplicates("subject_id")
        fr = {"train": 1.0 - test_fraction, "val": 0.0, "test": test_fraction}
        strat = "pathology" if subj["pathology"].nunique() > 1 else None
        assigned = assign_splits(pd.DataFrame(subj), fr, seed=seed, stratify=strat)
        mapping = dict(zip(assigned["subject_id"], assigned["split"], strict=True))
        slices.meta["split"] = slices.meta["subject_id"].astype(str).map(mapping)
        log.info("no split in the manifest: seeded patient-level split (seed %d, test %.2f)", seed, test_fraction)
    return slices


def run_fidelity(args: argparse.Namespace) -> int:
    from medsynth.config import load_config
    from medsynth.evaluation.features import get_extractor, train_domain_encoder
    from medsynth.evaluation.fidelity import FidelityConfig
    from medsynth.evaluation.report import write_csv, write_fidelity_report
    from medsynth.utils.atomic import atomic_dir
    from medsynth.workflows import ops

    cfg = load_config(FidelityConfig, args.config) if args.config else FidelityConfig()
    real = _load(args.real, args.data_root, args.size)
    syn = _load(args.synthetic, args.synthetic_data_root, args.size)
    if len(real) < 4 or len(syn) < 2:
        raise ManifestError(f"need >= 4 real and >= 2 synthetic slices, got {len(real)} and {len(syn)}")
    real = ensure_split(real, 0.3, cfg.seed)
    splits = set(real.meta["split"].astype(str))
    with atomic_dir(args.out) as tmp:
        if args.extractor == "domain":
            train = real.split("train") if "train" in splits else real
            extractor = train_domain_encoder(train.images, train.labels, seed=cfg.seed)
            extractor.save(Path(tmp) / "extractor")
        else:
            try:
                extractor = get_extractor(args.extractor, seed=cfg.seed)
            except ValueError as err:
                raise ConfigError(f"--extractor: {err}") from None
        both = {"train", "test"} <= splits
        table, mem = ops.fidelity_table(
            real, syn, extractor, cfg, real.split("train") if both else None, real.split("test") if both else None
        )
        mem_summary = None
        if mem is not None:
            write_csv(mem.per_sample, Path(tmp) / "memorisation.csv")
            mem_summary = mem.summary
        write_fidelity_report(tmp, table, real.images, syn.images, mem_summary)
    log.info("fidelity written to %s", args.out)
    return 0


def run_segmentation(args: argparse.Namespace) -> int:
    from medsynth.config import load_config
    from medsynth.evaluation.report import write_segmentation_report
    from medsynth.evaluation.segmentation import (
        SegmentationConfig,
        per_seed_table,
        run_segmentation_protocol,
        summarise,
    )
    from medsynth.utils.atomic import atomic_dir

    cfg = load_config(SegmentationConfig, args.config) if args.config else SegmentationConfig()
    real = ensure_split(_load(args.real, args.data_root, args.size), cfg.test_fraction, cfg.split_seed)
    train, test = real.split("train"), real.split("test")
    if len(train) == 0 or len(test) == 0:
        raise ManifestError(f"{args.real}: needs subjects in both the train and the test split")
    syn = _load(args.synthetic, args.synthetic_data_root, args.size) if args.synthetic else None
    try:
        per_case = run_segmentation_protocol(train, test, syn, cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    with atomic_dir(args.out) as tmp:
        write_segmentation_report(
            tmp, per_case, per_seed_table(per_case), summarise(per_case, cfg.n_bootstrap, cfg.ci), cfg.model_dump()
        )
    log.info("segmentation written to %s", args.out)
    return 0
