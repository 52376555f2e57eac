"""Model-ready 2-D short-axis slices: the one in-memory dataset every generative family consumes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medsynth.errors import InputFileError
from medsynth.utils.atomic import atomic_file

#: Per-slice metadata columns (``SliceSet.meta``). ``record`` is a JSON string with what is needed to
#: map the slice back into its source volume (see ``medsynth.data.preprocess``).
META_COLUMNS = (
    "subject_id",
    "case",  # manifest row identity: the image path
    "slice_index",  # z index in the source volume (0 for PNG slices)
    "dataset",
    "modality",
    "vendor",
    "phase",
    "pathology",
    "split",
    "record",
)


@dataclass
class SliceSet:
    """Slices with canonical labels.

    ``images``: (N, 1, H, W) float32, robustly normalised (1st→0, 99th percentile→1 of the source
    volume's intensities, not clipped above so bright scar keeps its contrast); ``labels``: (N, H, W)
    uint8 canonical codes (see :mod:`medsynth.labels`); ``meta``: N rows, :data:`META_COLUMNS`.
    """

    images: np.ndarray
    labels: np.ndarray
    meta: pd.DataFrame

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[1] != 1:
            raise ValueError(f"images: expected (N, 1, H, W), got {self.images.shape}")
        if self.labels.shape != (self.images.shape[0], *self.images.shape[2:]):
            raise ValueError(f"labels: shape {self.labels.shape} does not match images {self.images.shape}")
        if len(self.meta) != len(self.images):
            raise ValueError(f"meta: {len(self.meta)} rows for {len(self.images)} slices")
        self.meta = self.meta.reset_index(drop=True)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def subset(self, mask: np.ndarray | pd.Series | list[int]) -> SliceSet:
        """Rows selected by a boolean mask or integer indices."""
        idx = np.asarray(mask)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return SliceSet(self.images[idx], self.labels[idx], self.meta.iloc[idx].reset_index(drop=True))

    def split(self, name: str) -> SliceSet:
        """Slices whose subject belongs to split ``name`` (train / val / test)."""
        return self.subset(self.meta["split"].to_numpy() == name)

    @staticmethod
    def concat(parts: list[SliceSet]) -> SliceSet:
        return SliceSet(
            np.concatenate([p.images for p in parts]),
            np.concatenate([p.labels for p in parts]),
            pd.concat([p.meta for p in parts], ignore_index=True),
        )

    def save(self, path: str | Path) -> Path:
        """Write an ``.npz`` (no pickle): images, labels and the metadata as JSON."""
        path = Path(path)
        meta_json = self.meta.to_json(orient="records")
        with atomic_file(path) as tmp:
            np.savez_compressed(tmp, images=self.images, labels=self.labels, meta=np.array(meta_json))
        return path

    @classmethod
    def load(cls, path: str | Path) -> SliceSet:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                images, labels, meta_json = z["images"], z["labels"], str(z["meta"])
        except (OSError, ValueError, KeyError) as err:
            raise InputFileError(f"{path}: not a readable slice set: {err}") from None
        meta = pd.DataFrame(json.loads(meta_json)) if meta_json != "[]" else pd.DataFrame(columns=META_COLUMNS)
        for col in META_COLUMNS:
            if col in meta.columns:
                meta[col] = meta[col].astype(str)
        return cls(images.astype(np.float32), labels.astype(np.uint8), meta)
