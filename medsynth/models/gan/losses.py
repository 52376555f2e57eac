"""GAN losses shared by pix2pix and SPADE: the adversarial criteria (MONAI ``PatchAdversarialLoss``), the
discriminator feature-matching loss (Wang et al. 2018, pix2pixHD) and the VAE KL term."""

from __future__ import annotations

from typing import Literal

import torch
from monai.losses import PatchAdversarialLoss

#: config name → MONAI criterion
CRITERIA: dict[str, str] = {"vanilla": "bce", "lsgan": "least_squares", "hinge": "hinge"}
AdversarialKind = Literal["vanilla", "lsgan", "hinge"]


class Adversarial:
    """``d_loss(real_logits, fake_logits)`` and ``g_loss(fake_logits)`` for one criterion; logits are a tensor
    or a list of tensors (one per discriminator of a multi-scale PatchGAN), averaged over all of them.

    ``vanilla``: BCE on sigmoid outputs; ``lsgan``: least squares on the raw logits; ``hinge``: MONAI's hinge
    (tanh-squashed logits)."""

    def __init__(self, kind: str) -> None:
        if kind not in CRITERIA:
            raise ValueError(f"adversarial: one of {sorted(CRITERIA)}, got {kind!r}")
        self.kind = kind
        self.loss = PatchAdversarialLoss(criterion=CRITERIA[kind], no_activation_leastsq=True)

    def d_loss(self, real, fake) -> torch.Tensor:
        return 0.5 * (
            self.loss(real, target_is_real=True, for_discriminator=True)
            + self.loss(fake, target_is_real=False, for_discriminator=True)
        )

    def g_loss(self, fake) -> torch.Tensor:
        return self.loss(fake, target_is_real=True, for_discriminator=False)


def feature_matching(real_feats: list[list[torch.Tensor]], fake_feats: list[list[torch.Tensor]]) -> torch.Tensor:
    """Mean L1 between the discriminators' intermediate features of real (detached) and generated pairs,
    averaged over layers and discriminators."""
    terms = [
        torch.nn.functional.l1_loss(f, r.detach())
        for rs, fs in zip(real_feats, fake_feats, strict=True)
        for r, f in zip(rs, fs, strict=True)
    ]
    return torch.stack(terms).mean()


def kl_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) ‖ N(0, I)) per sample (nats), averaged over the batch."""
    return (0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)).mean()


def tissue_mean_l1(fake: torch.Tensor, real: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between the per-label mean intensities of ``fake`` and ``real`` (N, 1, s, s)
    under the one-hot labels ``cond`` (N, K, s, s), over the (image, label) pairs present."""
    area = cond.sum(dim=(2, 3))
    present = area > 0
    m_fake = (cond * fake).sum(dim=(2, 3)) / area.clamp(min=1)
    m_real = (cond * real).sum(dim=(2, 3)) / area.clamp(min=1)
    return (m_fake - m_real).abs()[present].mean()
