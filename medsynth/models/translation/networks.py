"""Networks of the translation families: a ResNet-style image-to-image generator built from MONAI blocks.

The generator follows CycleGAN's (Zhu et al., ICCV 2017): a 7×7 stem, strided downsampling, residual blocks at
the coarsest scale, transposed-conv upsampling and a 7×7 head, instance norm throughout. The output is linear
(no tanh): slice intensities are normalised to about [0, 1] but scar and fat exceed 1. Fully convolutional, so
any (N, 1, H, W) with H, W divisible by 2^(len(channels) - 1) works. The discriminator is MONAI's
``PatchDiscriminator`` (70×70-style PatchGAN), built by the family.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn


class ResnetGenerator(nn.Module):
    """(N, 1, H, W) → (N, 1, H, W). ``channels``: widths from the stem down to the bottleneck."""

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64), n_res_blocks: int = 4) -> None:
        super().__init__()
        if len(channels) < 1 or min(channels) < 1:
            raise ValueError(f"channels: need at least one positive width, got {channels}")
        if n_res_blocks < 0:
            raise ValueError(f"n_res_blocks: must be >= 0, got {n_res_blocks}")
        norm, act = "INSTANCE", "RELU"
        layers: list[nn.Module] = [Convolution(2, 1, channels[0], kernel_size=7, norm=norm, act=act)]
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            layers.append(Convolution(2, c_in, c_out, strides=2, kernel_size=3, norm=norm, act=act))
        layers += [
            ResidualUnit(2, channels[-1], channels[-1], subunits=2, norm=norm, act=act) for _ in range(n_res_blocks)
        ]
        rev = channels[::-1]
        for c_in, c_out in zip(rev[:-1], rev[1:], strict=True):
            layers.append(Convolution(2, c_in, c_out, strides=2, kernel_size=3, is_transposed=True, norm=norm, act=act))
        layers.append(Convolution(2, channels[0], 1, kernel_size=7, conv_only=True))
        self.net = nn.Sequential(*layers)
        self.factor = 2 ** (len(channels) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by {self.factor}")
        return self.net(x)
