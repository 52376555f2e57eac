"""PatchNCE, the contrastive loss of CUT (Park et al., "Contrastive Learning for Unpaired Image-to-Image
Translation", ECCV 2020), written from the paper.

A patch of the translated image should be more like the patch *at the same place* of its input than like any
other patch of that input. For each of several encoder layers of the generator, the same ``num_patches``
locations are sampled from the feature maps of the input (keys) and of the output re-encoded by the same
encoder (queries); a per-layer 2-layer MLP projection head with L2 normalisation maps both to an embedding;
each query is classified among the keys of the *same image* (its own location = positive, the other
``num_patches - 1`` locations = negatives) with a temperature-scaled softmax cross-entropy (InfoNCE, τ = 0.07):

    ℓ(q, k⁺, k⁻) = −log  exp(q·k⁺/τ) / (exp(q·k⁺/τ) + Σₙ exp(q·kₙ⁻/τ))

averaged over locations and images, then over layers. Keys are detached (they are the "dictionary" that the
queries are scored against; gradients flow through the queries into the generator and the heads).

The paper creates the heads lazily at the first forward pass; here they are built up front from the known
feature widths (:meth:`~medsynth.models.translation.networks.ResnetGenerator.feature_channels`), so their
weights are initialised in a fixed order and save / load works without a forward pass.

Arrays: feature maps (B, C, H, W); embeddings (B, P, D) with P sampled locations per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class PatchProjection(nn.Module):
    """One 2-layer MLP head (Linear → ReLU → Linear) per encoder layer, output L2-normalised."""

    def __init__(self, in_channels: Sequence[int], dim: int = 256) -> None:
        super().__init__()
        if not in_channels or min(in_channels) < 1:
            raise ValueError(f"in_channels: need at least one positive width, got {tuple(in_channels)}")
        if dim < 1:
            raise ValueError(f"dim: must be >= 1, got {dim}")
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(c, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim)) for c in in_channels
        )

    def forward(self, patches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per layer (B, P, C_k) sampled feature vectors → (B, P, dim) unit-norm embeddings."""
        if len(patches) != len(self.heads):
            raise ValueError(f"patches: {len(patches)} layers given, the projection has {len(self.heads)} heads")
        return [F.normalize(h(p), dim=-1) for h, p in zip(self.heads, patches, strict=True)]


def sample_locations(feats: Sequence[torch.Tensor], num_patches: int) -> list[torch.Tensor]:
    """Per layer, ``min(num_patches, H·W)`` distinct flat locations drawn from torch's global RNG (seeded and
    checkpointed by the training loop); the same locations serve every image of the batch and both the keys
    and the queries."""
    if num_patches < 1:
        raise ValueError(f"num_patches: must be >= 1, got {num_patches}")
    out = []
    for f in feats:
        hw = f.shape[-2] * f.shape[-1]
        out.append(torch.randperm(hw)[: min(num_patches, hw)].to(f.device))  # CPU draw: the same on any device
    return out


def gather_patches(feats: Sequence[torch.Tensor], locations: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """(B, C, H, W) maps and flat locations (P,) → (B, P, C) feature vectors."""
    return [f.flatten(2)[:, :, idx].transpose(1, 2) for f, idx in zip(feats, locations, strict=True)]


def info_nce(queries: torch.Tensor, keys: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    """Mean InfoNCE of unit-norm ``queries`` against ``keys`` (both (B, P, D)): query p of image b has key p of
    image b as its positive and the other P − 1 keys of the same image as negatives. Keys are detached."""
    if queries.shape != keys.shape or queries.ndim != 3:
        raise ValueError(f"queries/keys: need equal (B, P, D) shapes, got {tuple(queries.shape)}, {tuple(keys.shape)}")
    if not tau > 0:
        raise ValueError(f"tau: must be > 0, got {tau}")
    # row p of the (P, P) similarity matrix: the positive sits on the diagonal, the negatives off it
    logits = torch.bmm(queries, keys.detach().transpose(1, 2)) / tau
    b, p, _ = logits.shape
    target = torch.arange(p, device=logits.device).expand(b, p)
    return F.cross_entropy(logits.reshape(b * p, p), target.reshape(b * p))


def patch_nce_loss(
    feat_q: Sequence[torch.Tensor],
    feat_k: Sequence[torch.Tensor],
    projection: PatchProjection,
    num_patches: int = 256,
    tau: float = 0.07,
) -> torch.Tensor:
    """PatchNCE averaged over layers: ``feat_q`` are the encoder maps of the translated images, ``feat_k`` those
    of their inputs (same layers, same shapes)."""
    if len(feat_q) != len(feat_k):
        raise ValueError(f"feat_q/feat_k: {len(feat_q)} and {len(feat_k)} layers")
    locations = sample_locations(feat_k, num_patches)
    q = projection(gather_patches(feat_q, locations))
    k = projection(gather_patches(feat_k, locations))
    return torch.stack([info_nce(a, b, tau) for a, b in zip(q, k, strict=True)]).mean()


__all__ = ["PatchProjection", "gather_patches", "info_nce", "patch_nce_loss", "sample_locations"]
