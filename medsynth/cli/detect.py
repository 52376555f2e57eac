"""``medsynth detect``: anomaly scores of a fitted model on a manifest's slices (and metrics when labelled)."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def _detect(args: argparse.Namespace) -> int:
    from medsynth.workflows.commands import detect_manifest

    detect_manifest(args.model, args.manifest, args.out, args.data_root, agg=args.agg, baselines=not args.no_baselines)
    return 0


def register(commands, evaluate) -> None:  # noqa: ARG001 - evaluate is part of the discovery protocol
    p = commands.add_parser(
        "detect",
        help="anomaly scores (slice, subject, pixel) of a fitted model on a manifest",
        description=(
            "Score every slice of MANIFEST with a fitted model that declares 'score' (reconstruction error, "
            "negative log-likelihood or GMM scar posterior). Writes slice_scores.csv and subject_scores.csv; "
            "when the labels hold scar, also anomaly_metrics.csv (AUROC slice/case, pixel AUPRC/Dice) next to "
            "the n-SD / FWHM baselines."
        ),
    )
    p.add_argument("--model", required=True, help="fitted model directory")
    p.add_argument("--manifest", required=True, help="manifest CSV of the slices to score")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--data-root", dest="data_root", default=None, help="data root of the manifest")
    p.add_argument("--agg", choices=("max", "mean"), default="max", help="subject score from slices (default max)")
    p.add_argument("--no-baselines", dest="no_baselines", action="store_true", help="skip n-SD / FWHM rows")
    p.set_defaults(func=_detect)
