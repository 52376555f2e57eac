"""``medsynth`` subcommands: run."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction, evaluate: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the top-level and evaluate groups."""
