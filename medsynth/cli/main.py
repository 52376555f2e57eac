"""Entry point of the ``medsynth`` console script.

Each command module in this package exposes ``register(commands, evaluate)`` adding its subcommands to the top-level
parser group and to the ``medsynth evaluate`` group; handlers are stored as ``func`` and get the parsed
namespace. User-facing errors (:class:`~medsynth.errors.MedsynthError`) become one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

import medsynth.cli
from medsynth.errors import MedsynthError

log = logging.getLogger("medsynth")


def command_modules() -> list[str]:
    """Every module in ``medsynth.cli`` that defines ``register(commands, evaluate)``, in name order."""
    return sorted(m.name for m in pkgutil.iter_modules(medsynth.cli.__path__) if m.name != "main")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsynth", description="Synthetic-data pipeline for cardiac MR.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    evaluate_parser = commands.add_parser("evaluate", help="evaluate synthetic data, scar methods, segmentation")
    evaluate = evaluate_parser.add_subparsers(dest="evaluate_command", metavar="WHAT", required=True)
    for name in command_modules():
        module = importlib.import_module(f"medsynth.cli.{name}")
        if hasattr(module, "register"):
            module.register(commands, evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verbose < 2:
        # every call to the Prefect API server would otherwise log a line
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        rc = args.func(args)
    except MedsynthError as err:
        print(f"medsynth: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medsynth: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
