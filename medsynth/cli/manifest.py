"""``medsynth manifest`` (dataset layout → manifest CSV) and ``medsynth split`` (patient-level splits)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from medsynth.errors import ConfigError

log = logging.getLogger(__name__)


def _fractions(text: str) -> dict[str, float]:
    from medsynth.data.splits import parse_fractions

    try:
        return parse_fractions(text)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def run_manifest(args: argparse.Namespace) -> int:
    from medsynth.data.layouts import build_manifest
    from medsynth.data.manifest import write_manifest
    from medsynth.data.splits import assign_splits

    fractions = _fractions(args.fractions)  # validate before the (possibly long) scan
    df = build_manifest(
        args.layout,
        Path(args.root),
        lenient=args.lenient,
        label_map=args.label_map,
        modality=args.modality,
        dataset=args.dataset,
        verify=not args.no_verify,
    )
    if args.split:
        df = assign_splits(df, fractions, seed=args.seed, stratify=args.stratify or None)
    write_manifest(df, args.out, data_root=Path(args.root))
    log.info("wrote %s: %d rows, %d subjects", args.out, len(df), df["subject_id"].nunique())
    return 0


def run_split(args: argparse.Namespace) -> int:
    from medsynth.data.manifest import load_manifest, write_manifest
    from medsynth.data.splits import assign_splits

    fractions = _fractions(args.fractions)
    df, root = load_manifest(args.manifest, data_root=args.data_root, check_files=False)
    df = assign_splits(df, fractions, seed=args.seed, stratify=args.stratify or None)
    write_manifest(df, args.out, data_root=root)
    counts = df.groupby("split")["subject_id"].nunique().to_dict()
    log.info("wrote %s: subjects per split %s", args.out, counts)
    return 0


def register(commands, evaluate) -> None:  # noqa: ARG001 - evaluate is part of the discovery protocol
    from medsynth.data.layouts import LAYOUTS
    from medsynth.data.manifest import MODALITIES

    p = commands.add_parser(
        "manifest",
        help="scan a dataset folder and write its manifest CSV",
        description="Scan DIR with a dataset layout and write one manifest row per image-label pair.",
    )
    p.add_argument("--layout", required=True, choices=sorted(LAYOUTS), help="dataset layout")
    p.add_argument("--root", required=True, help="dataset folder; becomes the manifest's data root")
    p.add_argument("--out", required=True, help="manifest CSV to write")
    p.add_argument("--split", action="store_true", help="also assign patient-level train/val/test splits")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--fractions", default="0.7,0.1,0.2", help="train,val,test fractions (default 0.7,0.1,0.2)")
    p.add_argument("--stratify", default="pathology", help="column to stratify splits by ('' for none)")
    p.add_argument("--lenient", action="store_true", help="skip bad entries with a warning instead of failing")
    p.add_argument("--label-map", dest="label_map", default=None, help="override the layout's label map")
    p.add_argument("--modality", default=None, choices=MODALITIES, help="override the layout's modality")
    p.add_argument("--dataset", default=None, help="override the dataset name")
    p.add_argument("--no-verify", action="store_true", help="read headers only (faster; skips voxel checks)")
    # a single-file output: an existing file is replaced only when medsynth wrote it, and with --overwrite
    p.set_defaults(func=run_manifest, out_kind="file")

    s = commands.add_parser(
        "split",
        help="assign patient-level, stratified, seeded splits to a manifest",
        description="Assign train/val/test per subject (stratified, seeded) and write a new manifest.",
    )
    s.add_argument("manifest", help="input manifest CSV")
    s.add_argument("--out", required=True, help="manifest CSV to write")
    s.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    s.add_argument("--fractions", default="0.7,0.1,0.2", help="train,val,test fractions (default 0.7,0.1,0.2)")
    s.add_argument("--stratify", default="pathology", help="column to stratify by ('' for none)")
    s.add_argument("--data-root", dest="data_root", default=None, help="data root of the input manifest")
    s.set_defaults(func=run_split, out_kind="file")
