"""``medsynth phantom``: write a built-in phantom dataset (NIfTI images, labels, manifest, ground truth)."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def _shape(text: str) -> tuple[int, int, int]:
    try:
        vals = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected XxYxZ integers, got {text!r}") from None
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"expected XxYxZ, got {text!r}")
    return vals  # type: ignore[return-value]


def _spacing(text: str) -> tuple[float, float, float]:
    try:
        vals = tuple(float(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected XxYxZ millimetres, got {text!r}") from None
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"expected XxYxZ, got {text!r}")
    return vals  # type: ignore[return-value]


def register(commands, evaluate) -> None:  # noqa: ARG001 - evaluate: no phantom evaluation command
    p = commands.add_parser(
        "phantom",
        help="write a procedural cardiac MR phantom dataset",
        description="Procedural short-axis cine/LGE stacks (ED and ES) with canonical labels, a manifest and "
        "phantom_params.json with the ground truth. Same arguments give byte-identical files.",
    )
    p.add_argument("--out", required=True, help="output folder (replaced atomically)")
    p.add_argument("--subjects", type=int, default=4, help="number of subjects (default 4)")
    p.add_argument("--contrast", choices=("cine", "lge"), default="cine")
    p.add_argument("--scanner", choices=("A", "B"), default="A", help="scanner style (contrast, bias, noise, blur)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=_shape, default=(128, 128, 10), help="XxYxZ voxels (default 128x128x10)")
    p.add_argument("--spacing", type=_spacing, default=(1.5, 1.5, 8.0), help="XxYxZ mm (default 1.5x1.5x8)")
    p.add_argument(
        "--scar-prob", type=float, default=None, help="fraction of infarct subjects (default: cine 0.2, LGE 0.75)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medsynth.errors import ConfigError
    from medsynth.phantom import generate_dataset

    try:
        manifest = generate_dataset(
            args.out,
            subjects=args.subjects,
            contrast=args.contrast,
            scanner=args.scanner,
            seed=args.seed,
            shape=args.shape,
            spacing=args.spacing,
            scar_prob=args.scar_prob,
        )
    except ValueError as err:
        raise ConfigError(f"phantom: {err}") from None
    print(manifest)
    return 0
