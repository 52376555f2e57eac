"""``medsynth inspect FILE.csv --out DIR``: per-pair label volumes and a montage with label overlays."""

from __future__ import annotations

import argparse

from medsynth.errors import ConfigError


def register(commands: argparse._SubParsersAction, evaluate: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "inspect",
        help="summarise a manifest: label volumes per pair (summary.csv) and a slice montage (montage.png)",
        description="Read every image-label pair of a manifest; write DIR/summary.csv (volume of each canonical "
        "label in ml, or pixel count for spacing-less PNG) and DIR/montage.png (mid-ventricular slices with "
        "label overlays).",
    )
    p.add_argument("manifest", metavar="FILE.csv", help="manifest CSV")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (replaced atomically)")
    p.add_argument("--data-root", metavar="DIR", default=None, help="root of the manifest's relative paths")
    p.add_argument("--lenient", action="store_true", help="skip bad rows with a warning instead of failing")
    p.add_argument("--max-panels", type=int, default=24, metavar="N", help="montage panels (default 24)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medsynth.data.inspect import inspect

    if args.max_panels < 1:
        raise ConfigError(f"--max-panels: must be >= 1, got {args.max_panels}")
    inspect(args.manifest, args.out, data_root=args.data_root, lenient=args.lenient, max_panels=args.max_panels)
    return 0
