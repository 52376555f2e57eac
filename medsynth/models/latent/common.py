"""Helpers shared by the latent and flow families: resizing slices to a model's working size and back."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medsynth.data.slices import SliceSet
from medsynth.errors import InputFileError, LabelError
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
    """(N, H, W) codes 0..n_classes-1 → (N, n_classes, H, W) float one-hot (canonical codes by default; the
    extended maps of :mod:`medsynth.models.conditioning` pass their own ``n_classes``)."""
    # tensors stay on their device (the cVAE conditions on label channels of a CUDA batch)
    t = labels.long() if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return F.one_hot(t.clamp(0, n_classes - 1), n_classes).permute(0, 3, 1, 2).float()


def validate_label_maps(labels: np.ndarray | None, family: str, n: int | None = None) -> np.ndarray:
    """The label maps a conditional family is asked to render: (n, H, W) canonical codes 0..N_CLASSES-1 (any
    ``n`` when None), as a uint8 copy; a :class:`LabelError` naming ``family`` otherwise."""
    if labels is None:
        raise LabelError(f"{family}: a conditional family needs label maps (labels=(n, H, W))")
    labels = np.asarray(labels)
    if labels.ndim != 3 or (n is not None and len(labels) != n):
        raise LabelError(f"{family}: labels must be (n={n}, H, W), got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= N_CLASSES):
        raise LabelError(f"{family}: labels hold codes outside 0..{N_CLASSES - 1}")
    return labels.astype(np.uint8)


def check_slices(slices: SliceSet, family: str, image_size: int | None = None) -> None:
    """Refuse empty or non-finite inputs with a message naming the family."""
    if len(slices) == 0:
        raise InputFileError(f"{family}: the slice set is empty")
    if not np.all(np.isfinite(slices.images)):
        raise InputFileError(f"{family}: the slice set contains NaN/Inf intensities")
