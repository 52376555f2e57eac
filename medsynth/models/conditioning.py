"""What a label-conditioned network sees: the heart labels alone, or the heart labels plus the surroundings
partition (:mod:`medsynth.synthesis.partition`). Shared by the label → image torch families (pix2pix, SPADE,
the label-mode diffusion ``ddpm``, the latent diffusion ``ldm`` and the ``cvae``), so the config keys, the bank
and the condition tensors have one implementation.

``surroundings`` (config key, :class:`SurroundingsKeys`):

- ``"none"``: the condition is the one-hot canonical label map, ``N_CLASSES`` channels (background, LV, MYO,
  RV, scar, MVO); the network invents everything outside the heart from "background".
- ``"partition"``: every training slice gets its surroundings partition at fit (``surroundings_classes`` = K
  classes: outside the body, then body classes by brightness), the condition is the one-hot *extended* map
  (:func:`~medsynth.synthesis.partition.extend_labels`: heart codes unchanged, surroundings class k at code
  ``N_CLASSES + k - 1``), ``N_CLASSES + K`` channels. A bank of at most ``partition_bank`` training partitions
  (uint8) is saved with the model; a label map to render gets one of the ``partition_match`` bank partitions
  whose heart overlaps its heart best, moved by a small random affine and made consistent with its heart
  (:func:`~medsynth.synthesis.partition.match_bank`, :func:`~medsynth.synthesis.partition.attach_partition`),
  drawn from the sample seed: same seed → same partitions. Classes brighter than the midpoint of the LV blood
  pool and myocardium means are not used to fill the place a bank slice's own heart occupied (as in the GMM),
  so a new heart is not flanked by an unlabelled ventricle-bright region.

Heart pixels of the condition are always the caller's heart labels: the partition only splits background.
A model saved before the key existed has no partition state and loads as ``"none"``.

Layouts: label / condition maps (N, H, W) uint8, images (N, 1, H, W) float, condition tensors (N, C, s, s)
float one-hot on the model's device.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from pydantic import Field

from medsynth.config import StrictModel
from medsynth.labels import LV, MYO, N_CLASSES
from medsynth.models.latent.common import one_hot
from medsynth.synthesis.partition import (
    DEFAULT_CLASSES,
    attach_partition,
    bank_indices,
    extend_labels,
    match_bank,
    partition_slices,
)
from medsynth.utils.seeding import rng as make_rng

log = logging.getLogger(__name__)

Surroundings = Literal["none", "partition"]
#: array name of the saved bank (uint8 (B, H, W) partitions)
BANK_ARRAY = "partition_bank"
C = TypeVar("C", bound="SurroundingsKeys")


class SurroundingsKeys(StrictModel):
    """Config keys of the condition (mixed into the label-conditioned families' configs)."""

    surroundings: Surroundings = Field(
        "none",
        description="none: one-hot heart labels only; partition: heart labels plus the unsupervised surroundings "
        "classes (outside the body, lung, body wall, liver, vessels)",
    )
    surroundings_classes: int = Field(
        DEFAULT_CLASSES, ge=2, le=16, description="surroundings classes K (partition): outside the body + K-1 body"
    )
    partition_bank: int = Field(256, ge=1, description="training partitions kept in the model (uint8)")
    partition_match: int = Field(5, ge=1, description="a new map gets one of the best-matching bank partitions")


def bright_classes(images: np.ndarray, labels: np.ndarray, parts: np.ndarray, k: int) -> tuple[int, ...]:
    """Partition classes (1..k) whose mean intensity over ``images`` (N, 1, H, W) / (N, H, W) is above the
    midpoint of the LV blood pool and myocardium means (``labels`` (N, H, W)); none without LV or MYO pixels."""
    img = np.asarray(images, dtype=np.float64)
    img = img[:, 0] if img.ndim == 4 else img
    lv, myo = labels == LV, labels == MYO
    if not lv.any() or not myo.any():
        return ()
    cut = 0.5 * (img[lv].mean() + img[myo].mean())
    out = []
    for c in range(1, k + 1):
        sel = parts == c
        if sel.any() and img[sel].mean() > cut:
            out.append(c)
    return tuple(out)


class LabelCondition:
    """The condition of a label-conditioned network: channel count, training maps, sampling maps, saved state.

    ``classes`` is K with a partition, else 0: fixed by the config for a new model and by the saved state for
    a loaded one (the state, not the config, decides the networks' input channels)."""

    def __init__(self, config: SurroundingsKeys) -> None:
        self.classes = config.surroundings_classes if config.surroundings == "partition" else 0
        self.bank_size = config.partition_bank
        self.match = config.partition_match
        self.bank: np.ndarray | None = None
        self.exclude: tuple[int, ...] = ()

    @property
    def uses_partition(self) -> bool:
        return self.classes > 0

    @property
    def channels(self) -> int:
        """Channels of the one-hot condition: ``N_CLASSES`` (+ K with a partition)."""
        return N_CLASSES + self.classes

    def one_hot(self, maps: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(N, s, s) condition maps → (N, channels, s, s) float one-hot (tensors stay on their device)."""
        return one_hot(maps, self.channels)

    # ---- maps ------------------------------------------------------------------------------------------
    def fit_maps(self, images: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
        """Condition maps (N, H, W) uint8 of the training slices ``images`` (N, 1, H, W), ``labels`` (N, H, W),
        keeping the bank; without a partition the labels themselves (the same array: nothing changes)."""
        if not self.uses_partition:
            return labels
        parts = partition_slices(images, labels, self.classes, seed)
        self.bank = np.ascontiguousarray(parts[bank_indices(len(parts), self.bank_size)], dtype=np.uint8)
        self.exclude = bright_classes(images, labels, parts, self.classes)
        log.info("surroundings partition: %d classes, bank of %d slices, not filling hearts with classes %s",
                 self.classes, len(self.bank), list(self.exclude))  # fmt: skip
        return extend_labels(labels, parts)

    def maps_for(self, labels: np.ndarray, seed: int, images: np.ndarray | None = None) -> np.ndarray:
        """Condition maps (n, H, W) uint8 for canonical ``labels`` (n, H, W) to render. With a partition: the
        partition of ``images`` (n, 1, H, W) when the real slices are at hand (held-out evaluation, anomaly
        scores), else bank partitions matched to each heart and attached with a generator seeded by ``seed``.
        Without: ``labels`` unchanged."""
        if not self.uses_partition:
            return labels
        if images is not None:
            parts = partition_slices(images, labels, self.classes, seed)
        else:
            if self.bank is None:
                raise ValueError("partition_bank: the model has no partition bank (not fitted with a partition)")
            gen = make_rng(seed)
            index = match_bank(labels, self.bank, gen, top=self.match)
            parts = attach_partition(labels, self.bank, gen, index=index, exclude=self.exclude)
        return extend_labels(labels, parts)

    # ---- state -----------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays and metadata to save beside the weights (none without a partition: unchanged files)."""
        if not self.uses_partition:
            return {}, {}
        if self.bank is None:
            raise ValueError("partition_bank: no bank to save (the model was not fitted)")
        return {BANK_ARRAY: self.bank}, {"surroundings_classes": self.classes, "partition_exclude": list(self.exclude)}

    def load(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Restore :meth:`state`; a model saved without a partition (or before the key existed) loads as none."""
        self.classes = int(meta.get("surroundings_classes", 0)) if BANK_ARRAY in arrays else 0
        self.bank = np.asarray(arrays[BANK_ARRAY], dtype=np.uint8) if self.classes else None
        self.exclude = tuple(int(c) for c in meta.get("partition_exclude", ())) if self.classes else ()

    def restore(self, config: C, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> C:
        """:meth:`load`, then ``config`` made to say what the loaded state is (e.g. ``surroundings: none`` for a
        model saved before the key existed, whatever today's default); returns the config to keep."""
        self.load(arrays, meta)
        if self.uses_partition:
            update = {"surroundings": "partition", "surroundings_classes": self.classes}
        else:
            update = {"surroundings": "none"}
        if all(getattr(config, k) == v for k, v in update.items()):
            return config
        return config.model_copy(update=update)


__all__ = ["BANK_ARRAY", "LabelCondition", "Surroundings", "SurroundingsKeys", "bright_classes"]
