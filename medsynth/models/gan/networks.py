"""Builders of the MONAI networks the GAN families train (one place, so the families and
``benchmarks/bench_gan.py``'s raw loop build exactly the same networks).

Layouts: label maps enter as (N, K, s, s) one-hot float (K = :data:`medsynth.labels.N_CLASSES`, so scar and MVO
are channels of their own), images as (N, 1, s, s) on the generators' standardised scale (linear heads; see
:mod:`medsynth.models.gan.common`).
"""

from __future__ import annotations

from collections.abc import Sequence

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


def spade_generator(n_labels: int, size: int, channels: Sequence[int], z_dim: int | None, hidden: int) -> nn.Module:
    """MONAI ``SPADENet`` with a linear head. ``z_dim`` set: VAE-GAN (its encoder is the style encoder);
    ``None``: the decoder starts from the downsampled label map and needs no ``z``.

    ``SPADENet`` reverses its ``channels`` list in place (and the decoder appends to it), so it gets a fresh
    list here and the caller's sequence stays as configured."""
    net = SPADENet(
        spatial_dims=2, in_channels=1, out_channels=1, label_nc=n_labels, input_shape=(size, size),
        channels=list(channels), z_dim=z_dim, is_vae=z_dim is not None, spade_intermediate_channels=hidden,
        norm="BATCH", last_act=None,  # batch norm as in Park et al.: instance norm would erase a global style
    )  # fmt: skip
    return net
