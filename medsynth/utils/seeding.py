"""Explicit seeding: every random draw in medsynth comes from a generator built here."""

from __future__ import annotations

import random

import numpy as np
import torch


def rng(seed: int | None) -> np.random.Generator:
    """A NumPy generator; ``None`` is refused so results never depend on hidden global state."""
    if seed is None:
        raise ValueError("seed: an explicit integer seed is required")
    return np.random.default_rng(seed)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU determinism) and return a torch generator for sampling."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    g = torch.Generator()
    g.manual_seed(seed)
    return g
