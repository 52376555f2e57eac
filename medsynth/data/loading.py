"""Loading a manifest's slices for the model commands: the preprocessing config, slices, train/val split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medsynth.config import validate
from medsynth.data.slices import SliceSet


def preprocess_config(preprocess: Any):
    """A :class:`~medsynth.data.preprocess.PreprocessConfig` from a config, a dict (validated) or None."""
    from medsynth.data.preprocess import PreprocessConfig

    if preprocess is None:
        return PreprocessConfig()
    if isinstance(preprocess, PreprocessConfig):
        return preprocess
    return validate(PreprocessConfig, preprocess, source="preprocess config")


def load_manifest_slices(manifest: str | Path, data_root: str | Path | None = None, preprocess: Any = None) -> SliceSet:
    """Slices of a manifest through the project's preprocessing (``preprocess``: config, dict or None)."""
    from medsynth.data.preprocess import load_slices

    return load_slices(manifest, data_root=data_root, cfg=preprocess_config(preprocess))


def split_train_val(slices: SliceSet) -> tuple[SliceSet, SliceSet | None]:
    """``train`` / ``val`` by the manifest split; every slice is training data when no row says ``train``."""
    splits = slices.meta["split"].astype(str)
    if (splits == "train").any():
        val = slices.split("val")
        return slices.split("train"), (val if len(val) else None)
    return slices, None
