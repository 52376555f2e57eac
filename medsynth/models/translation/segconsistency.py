"""The optional segmentation-consistency loss of the translation families (``lambda_seg`` > 0).

Cardiac cross-vendor translation keeps the anatomy by asking a *frozen* segmenter trained on the source
domain to still segment the translated image into the source labels. Inside ``fit``, before the translation
networks are built, a small U-Net (:func:`medsynth.evaluation.segmentation.train_unet`, whole slice, working
size ``image_size``) is trained on the source-domain training slices and their labels for ``seg_iterations``
batches; it is then frozen (eval mode, no gradients to its weights) and the generator gets
``lambda_seg · CE(U-Net(G(x)), labels(x))`` added to its loss. The U-Net is not saved with the model: it only
shapes training.

Source labels travel with the source images as a second channel of the domain's training tensor (N, 2, s, s),
so a batch draws images and labels with the same indices (and the same indices as without the loss).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from medsynth.config import StrictModel
from medsynth.data.slices import SliceSet
from medsynth.models.latent.common import labels_to_size


class SegConsistencyKeys(StrictModel):
    """Config keys shared by the translation families."""

    lambda_seg: float = Field(0.0, ge=0, description="segmentation-consistency weight (0: off)")
    seg_iterations: int = Field(200, ge=1, description="training batches of the frozen source-domain U-Net")
    seg_channels: tuple[int, ...] = Field((8, 16, 32), min_length=2, description="widths of that U-Net")


def train_source_unet(
    source: SliceSet, image_size: int, iterations: int, channels: tuple[int, ...], seed: int
) -> nn.Module:
    """A U-Net trained on the source-domain slices at ``image_size`` (whole slice), frozen. Images (N, 1, H, W)
    on the slice intensity scale, labels (N, H, W) canonical codes."""
    from medsynth.evaluation.segmentation import SegmentationConfig, train_unet

    factor = 2 ** (len(channels) - 1)
    if image_size % factor:
        raise ValueError(f"seg_channels: image_size {image_size} is not divisible by 2^(len(seg_channels)-1)={factor}")
    cfg = SegmentationConfig(image_size=image_size, iterations=iterations, channels=tuple(channels), progress=False)
    unet, _ = train_unet(source, cfg, seed)
    return unet.eval().requires_grad_(False)


def pack_labels(images: np.ndarray, labels: np.ndarray, size: int) -> np.ndarray:
    """(N, 1, s, s) working-size images and (N, H, W) labels → (N, 2, s, s): labels (nearest) as channel 1."""
    lab = labels_to_size(np.asarray(labels), size).astype(np.float32)[:, None]
    return np.concatenate([images, lab], axis=1)


def seg_consistency_loss(unet: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the frozen U-Net's prediction on translated ``images`` (B, 1, s, s) against the source
    ``labels`` (B, s, s). Inputs are clamped to the range the U-Net was trained on."""
    return F.cross_entropy(unet(images.clamp(-0.5, 3.0)), labels.long())


__all__ = ["SegConsistencyKeys", "pack_labels", "seg_consistency_loss", "train_source_unet"]
