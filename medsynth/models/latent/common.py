"""Helpers shared by the latent and flow families: resizing slices to a model's working size and back."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medsynth.data.slices import SliceSet
from medsynth.errors import InputFileError
from medsynth.labels import N_CLASSES


def to_size(images: np.ndarray, size: int | None) -> np.ndarray:
    """Resize (N, C, H, W) float images to (N, C, size, size) by area averaging (bilinear when upsampling)."""
    if size is None or images.shape[-2:] == (size, size):
        return np.ascontiguousarray(images, dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    mode = "area" if size <= min(images.shape[-2:]) else "bilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(t, size=(size, size), mode=mode, **kwargs).numpy()


def labels_to_size(labels: np.ndarray, size: int | None) -> np.ndarray:
    """Resize (N, H, W) label maps by nearest neighbour."""
    if size is None or labels.shape[-2:] == (size, size):
        return labels
    t = torch.from_numpy(labels.astype(np.float32))[:, None]
    return F.interpolate(t, size=(size, size), mode="nearest")[:, 0].numpy().astype(np.uint8)


def maps_to_size(maps: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Resize (N, h, w) score maps back to the caller's (H, W) bilinearly."""
    if maps.shape[-2:] == tuple(hw):
        return maps.astype(np.float32)
    t = torch.from_numpy(maps.astype(np.float32))[:, None]
    return F.interpolate(t, size=tuple(hw), mode="bilinear", align_corners=False)[:, 0].numpy()


def one_hot(labels: np.ndarray | torch.Tensor, n_classes: int = N_CLASSES) -> torch.Tensor:
    """(N, H, W) canonical codes → (N, K, H, W) float one-hot."""
    # tensors stay on their device (the cVAE conditions on label channels of a CUDA batch)
    t = labels.long() if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return F.one_hot(t.clamp(0, n_classes - 1), n_classes).permute(0, 3, 1, 2).float()


def check_slices(slices: SliceSet, family: str, image_size: int | None = None) -> None:
    """Refuse empty or non-finite inputs with a message naming the family."""
    if len(slices) == 0:
        raise InputFileError(f"{family}: the slice set is empty")
    if not np.all(np.isfinite(slices.images)):
        raise InputFileError(f"{family}: the slice set contains NaN/Inf intensities")
