"""What pix2pix and SPADE share: the working-size config keys, the intensity scaling between medsynth's slice
scale and the generator's [-1, 1] tanh range, label-map checks, the paired training data and the
resize-back of samples.

Slice intensities are robust-normalised (about [0, 1], not clipped above). The generator works on
``2 (x - lo) / (hi - lo) - 1`` with ``lo`` / ``hi`` from the training images (``hi`` with a ``headroom``
margin above the brightest training pixel, so bright values are not clipped at the training maximum);
samples are mapped back, so they lie in [lo, hi].
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field

from medsynth.data.slices import SliceSet
from medsynth.errors import LabelError
from medsynth.labels import N_CLASSES
from medsynth.models.latent.common import labels_to_size, maps_to_size, one_hot, to_size
from medsynth.models.torch_family import TorchConfig, TorchFamily


class LabelGANConfig(TorchConfig):
    """Keys shared by the label-conditioned GANs (here steps 2000, batch_size 8, lr 2e-4)."""

    image_size: int = Field(64, ge=8, description="working size (square); samples are resized back")
    steps: int = Field(2000, ge=0)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-4, gt=0, description="generator learning rate")
    disc_lr: float | None = Field(None, gt=0, description="discriminator learning rate (TTUR); null = lr")
    headroom: float = Field(0.1, ge=0, description="margin above the training intensity range, as a fraction")


class LabelGAN(TorchFamily):
    """Base of the label → image GAN families (not registered itself)."""

    conditional = True

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.native: tuple[int, int] = (self.config.image_size, self.config.image_size)
        self.lo, self.hi = 0.0, 1.0

    # ---- intensity scale -----------------------------------------------------------------------------
    def set_scale(self, images: np.ndarray) -> None:
        lo, hi = float(np.min(images)), float(np.max(images))
        span = max(hi - lo, 1e-6)
        self.lo, self.hi = lo, hi + self.config.headroom * span

    def to_gen(self, images: np.ndarray) -> np.ndarray:
        """Slice scale → generator scale [-1, 1] (same shape)."""
        return (2.0 * (images - self.lo) / (self.hi - self.lo) - 1.0).astype(np.float32)

    def from_gen(self, y: np.ndarray) -> np.ndarray:
        return ((y + 1.0) * 0.5 * (self.hi - self.lo) + self.lo).astype(np.float32)

    # ---- data ----------------------------------------------------------------------------------------
    def paired(self, slices: SliceSet) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (N, 1, s, s) on the generator scale, labels (N, s, s) int64) on the device."""
        s = self.config.image_size
        x = self.tensor(self.to_gen(to_size(slices.images, s)))
        lab = self.tensor(labels_to_size(slices.labels.astype(np.uint8), s), dtype=torch.long)
        return x, lab

    def check_labels(self, labels: np.ndarray | None, n: int | None = None) -> np.ndarray:
        if labels is None:
            raise LabelError(f"{self.family}: a conditional family needs label maps (labels=(n, H, W))")
        labels = np.asarray(labels)
        if labels.ndim != 3 or (n is not None and len(labels) != n):
            raise LabelError(f"{self.family}: labels must be (n={n}, H, W), got {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= N_CLASSES):
            raise LabelError(f"{self.family}: labels hold codes outside 0..{N_CLASSES - 1}")
        return labels.astype(np.uint8)

    def cond(self, labels: np.ndarray) -> torch.Tensor:
        """(n, H, W) canonical codes → (n, K, s, s) one-hot on the device (nearest-neighbour resize)."""
        return one_hot(self.tensor(labels_to_size(labels, self.config.image_size), dtype=torch.long))

    def back(self, y: torch.Tensor, hw: tuple[int, int]) -> np.ndarray:
        """Generator output (n, 1, s, s) → (n, 1, H, W) float32 on the slice scale."""
        x = self.from_gen(self.numpy(y))
        return maps_to_size(x[:, 0], hw)[:, None].astype(np.float32)

    # ---- state beside the weights ----------------------------------------------------------------------
    def extra_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return {}, {"native": list(self.native), "lo": self.lo, "hi": self.hi}

    def load_extra_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.native = (int(meta["native"][0]), int(meta["native"][1]))
        self.lo, self.hi = float(meta["lo"]), float(meta["hi"])
