"""Builders of the MONAI networks the GAN families train (one place, so the families and
``benchmarks/bench_gan.py``'s raw loop build exactly the same networks).

Layouts: label maps enter as (N, K, s, s) one-hot float (K = :data:`medsynth.labels.N_CLASSES`, so scar and MVO
are channels of their own), images as (N, 1, s, s) on the generators' standardised scale (linear heads; see
:mod:`medsynth.models.gan.common`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import MultiScalePatchDiscriminator, PatchDiscriminator, SPADENet, UNet
from torch import nn


def unet_generator(in_channels: int, channels: Sequence[int], num_res_units: int, dropout: float) -> nn.Module:
    """pix2pix generator: a MONAI ``UNet`` (stride-2 levels, instance norm, skip connections, linear head),
    (N, in_channels, s, s) → (N, 1, s, s); ``s`` divisible by 2^(len(channels)-1)."""
    return UNet(
        spatial_dims=2, in_channels=in_channels, out_channels=1, channels=tuple(channels),
        strides=(2,) * (len(channels) - 1), num_res_units=num_res_units, norm="INSTANCE", dropout=dropout,
    )  # fmt: skip


def patch_discriminator(in_channels: int, channels: int, num_layers: int) -> nn.Module:
    """PatchGAN (MONAI ``PatchDiscriminator``, kernel 4; 3 layers give the 70×70 receptive field of Isola et
    al. 2017). Forward returns the list of intermediate features, the last entry being the patch logits."""
    return PatchDiscriminator(
        spatial_dims=2, channels=channels, in_channels=in_channels, num_layers_d=num_layers, norm="INSTANCE"
    )


def multiscale_discriminator(in_channels: int, channels: int, num_d: int, num_layers: int, size: int) -> nn.Module:
    """MONAI ``MultiScalePatchDiscriminator`` (``num_d`` PatchGANs of num_layers, 2·num_layers, … layers);
    forward → (logits per discriminator, intermediate features per discriminator)."""
    return MultiScalePatchDiscriminator(
        num_d=num_d, num_layers_d=num_layers, spatial_dims=2, channels=channels, in_channels=in_channels,
        out_channels=1, norm="INSTANCE", minimum_size_im=size,
    )  # fmt: skip


#: quantiles of the image intensity the style encoder sees directly (besides its pooled conv features)
STYLE_QUANTILES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)

#: initial log-variance of the style posterior (posterior SD exp(-2) ~ 0.14; see :class:`StyleEncoder`)
LOGVAR_INIT = -4.0
#: run-time multiplier of the zero-initialised per-label output head of :class:`StyleSPADENet`: an equalised
#: learning rate (Karras et al. 2018). Adam moves a weight by about ``lr`` per step whatever the loss scale, so
#: an unscaled head moved the tissue levels by at most ~0.2 standardised units in 200 steps at lr 1e-3, less
#: than the scanners' difference; measured on the phantom (32 px, 200 steps): styled myocardium means 0.306 /
#: 0.339 for scanner-A / -B references at scale 1, 0.254 / 0.320 at scale 10 (real 0.264 / 0.363).
TISSUE_HEAD_SCALE = 10.0


class StyleEncoder(nn.Module):
    """Style encoder: (N, 1, s, s) image on the generator's scale → (mu, logvar), each (N, z_dim).

    Stride-2 conv blocks (batch norm, LeakyReLU), then *global average pooling*, concatenated with the image's
    intensity quantiles (:data:`STYLE_QUANTILES`), mean and standard deviation, batch-normalised over images,
    then two linear heads. Why
    pooling: MONAI's ``SPADEEncoder`` flattens the last feature map into its linear heads, so the code can hold
    *where* things are (the layout of the unlabelled surroundings, which lowers the reconstruction L1 most) and
    the scanner's appearance is a small part of it; pooled features and intensity statistics hold appearance
    (intensity levels, contrast, noise, blur) but no layout, as in MUNIT's style encoder (Huang et al. 2018).
    Measured on the phantom (32 px, 200 steps, scanners A/B): the distance between the scanners' mean codes was
    about the within-scanner spread with MONAI's encoder, about 1.2-4 times it with this one. The log-variance
    head starts at :data:`LOGVAR_INIT` so the codes are not drowned in reparameterisation noise (SD ~1 at the
    default init against a scanner difference of ~0.3) while the decoder learns to use them (by that argument,
    not measured separately)."""

    def __init__(self, z_dim: int, channels: Sequence[int]) -> None:
        super().__init__()
        from monai.networks.blocks import Convolution

        blocks, ch = [], 1
        for c in channels:
            blocks.append(Convolution(spatial_dims=2, in_channels=ch, out_channels=c, strides=2, kernel_size=3,
                                      norm="BATCH", act=("leakyrelu", {"negative_slope": 0.2})))  # fmt: skip
            ch = c
        self.blocks = nn.Sequential(*blocks)
        self.register_buffer("q", torch.tensor(STYLE_QUANTILES), persistent=False)
        n_in = ch + len(STYLE_QUANTILES) + 2
        # batch norm over images: the statistics' differences between scanners (a few hundredths of a standard
        # deviation of the pixels) become unit-scale inputs of the heads from the first step
        self.norm = nn.BatchNorm1d(n_in, affine=False)
        self.fc_mu = nn.Linear(n_in, z_dim)
        self.fc_var = nn.Linear(n_in, z_dim)
        # start with informative codes: posterior SD exp(-2) ~ 0.14 rather than ~1 (see the class docstring)
        nn.init.constant_(self.fc_var.bias, LOGVAR_INIT)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.flatten(1)
        stats = torch.cat([torch.quantile(flat, self.q, dim=1).T, flat.mean(1, keepdim=True),
                           flat.std(1, keepdim=True)], dim=1)  # fmt: skip
        h = torch.cat([self.blocks(x).mean(dim=(2, 3)), stats], dim=1)
        if self.training and len(h) == 1:  # one image has no batch statistics (batch_size 1): the running ones
            h = nn.functional.batch_norm(h, self.norm.running_mean, self.norm.running_var, training=False)
        else:
            h = self.norm(h)
        return self.fc_mu(h), self.fc_var(h)

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


class StyleSPADENet(SPADENet):
    """MONAI ``SPADENet`` whose style code ``z`` (N, z_dim) also conditions every SPADE block: ``z`` enters each
    block's modulation network as ``z_dim`` spatially constant channels after the K one-hot label channels, so
    the per-tissue scale and shift of every block can depend on the style. Plain ``SPADENet`` feeds ``z`` only to
    the decoder's first (fully connected) layer; each block then re-normalises the features and re-imposes
    label-driven intensities, and at CPU budgets the decoder learned to ignore the code (the same tissue means
    from scanner-A and scanner-B references; see :mod:`medsynth.models.gan.spade`).

    ``tissue_head``: a zero-initialised linear map z → per-label gain and shift of the output,
    ``y · (1 + Σ_k seg_k g_k(z)) + Σ_k seg_k b_k(z)`` (a 1 × 1 SPADE-like modulation by label and style, scaled
    by :data:`TISSUE_HEAD_SCALE`): the scanners differ mostly in per-tissue levels (contrast curve), which this
    learns as a linear regression instead of through the deep blocks. ``pooled_encoder``: :class:`StyleEncoder`
    instead of MONAI's flattening encoder.

    Same interface as ``SPADENet``: ``forward(seg, x) -> (image, mu, logvar)``, ``decode(seg, z)``,
    ``encoder(x) -> (mu, logvar)``; ``seg`` holds the K label channels only."""

    def __init__(
        self, n_labels: int, z_dim: int, pooled_encoder: bool = False, tissue_head: bool = False, **kwargs
    ) -> None:
        widths = list(kwargs["channels"])  # before SPADENet reverses and extends the list
        super().__init__(label_nc=n_labels + z_dim, z_dim=z_dim, is_vae=True, **kwargs)
        self.n_labels = n_labels
        if pooled_encoder:
            self.encoder = StyleEncoder(z_dim, widths)
        self.tissue_head = nn.Linear(z_dim, 2 * n_labels) if tissue_head else None
        if self.tissue_head is not None:  # zero: a fresh network is the plain decoder
            nn.init.zeros_(self.tissue_head.weight)
            nn.init.zeros_(self.tissue_head.bias)

    def with_style(self, seg: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(N, K, s, s) labels + (N, z_dim) codes → (N, K + z_dim, s, s) modulation input."""
        return torch.cat([seg, z[:, :, None, None].expand(-1, -1, *seg.shape[2:])], dim=1)

    def forward(self, seg: torch.Tensor, x: torch.Tensor | None = None):
        mu, logvar = self.encoder(x)
        z = self.encoder.reparameterize(mu, logvar)
        return self.decode(seg, z), mu, logvar

    def decode(self, seg: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        if z is None:
            raise ValueError("z: the style code is required (SPADENet's own draw fails on CPU and ignores seeds)")
        y = self.decoder(self.with_style(seg, z), z)
        if self.tissue_head is None:
            return y
        gain, shift = (TISSUE_HEAD_SCALE * self.tissue_head(z)).view(len(z), 2, self.n_labels, 1, 1).unbind(1)
        return y * (1 + (seg * gain).sum(1, keepdim=True)) + (seg * shift).sum(1, keepdim=True)


def spade_generator(
    n_labels: int,
    size: int,
    channels: Sequence[int],
    z_dim: int | None,
    hidden: int,
    style_every_block: bool = False,
    pooled_encoder: bool = False,
    tissue_head: bool = False,
) -> nn.Module:
    """MONAI ``SPADENet`` with a linear head. ``z_dim`` set: VAE-GAN (its encoder is the style encoder);
    ``None``: the decoder starts from the downsampled label map and needs no ``z``. ``style_every_block`` (with
    ``z_dim``): :class:`StyleSPADENet`, the code also conditions every block's modulation, with its
    ``pooled_encoder`` and ``tissue_head`` options; otherwise plain ``SPADENet`` (z at the first layer only).

    ``SPADENet`` reverses its ``channels`` list in place (and the decoder appends to it), so it gets a fresh
    list here and the caller's sequence stays as configured."""
    common = dict(
        spatial_dims=2, in_channels=1, out_channels=1, input_shape=(size, size), channels=list(channels),
        spade_intermediate_channels=hidden,
        norm="BATCH", last_act=None,  # batch norm as in Park et al.: instance norm would erase a global style
    )  # fmt: skip
    if z_dim is not None and style_every_block:
        return StyleSPADENet(n_labels, z_dim, pooled_encoder, tissue_head, **common)
    return SPADENet(label_nc=n_labels, z_dim=z_dim, is_vae=z_dim is not None, **common)
