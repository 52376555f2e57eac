"""Networks of the translation families: a ResNet-style image-to-image generator built from MONAI blocks.

The generator follows CycleGAN's (Zhu et al., ICCV 2017): a 7×7 stem, strided downsampling, residual blocks at
the coarsest scale, transposed-conv upsampling and a 7×7 head, instance norm throughout. The output is linear
(no tanh): slice intensities are normalised to about [0, 1] but scar and fat exceed 1. Fully convolutional, so
any (N, 1, H, W) with H, W divisible by 2^(len(channels) - 1) works.

With ``residual=True`` (the translation families' default) the network predicts a correction that is added to
its input, G(x) = x + net(x), and the 7×7 head is zero-initialised, so an untrained generator is exactly the
identity. Why: two domains of one anatomy differ mostly in appearance (contrast curve, blur, bias, noise), and
a generator trained from a random start spends a short CPU budget re-learning to copy the anatomy; on the
phantom's paired scanners 200 such steps left every family *below* the untranslated baseline on paired SSIM.
Started at the identity, training moves away from the input only where the losses ask it to.

The discriminator is MONAI's ``PatchDiscriminator`` (70×70-style PatchGAN), built by the family.

:meth:`ResnetGenerator.encode` exposes the encoder's feature maps (the input, the stem, each downsampling
stage and each residual block) for CUT's PatchNCE loss; :meth:`ResnetGenerator.feature_channels` gives their
widths without running the network, so projection heads can be built before any data is seen.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn


class ResnetGenerator(nn.Module):
    """(N, 1, H, W) → (N, 1, H, W). ``channels``: widths from the stem down to the bottleneck; ``residual``:
    output = input + a learned correction whose last layer starts at zero (the identity before training)."""

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64), n_res_blocks: int = 4, residual: bool = False) -> None:
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
        head = Convolution(2, channels[0], 1, kernel_size=7, conv_only=True)
        if residual:  # zero correction at the start: G is the identity until the losses move it
            for p in head.parameters():
                nn.init.zeros_(p)
        layers.append(head)
        self.net = nn.Sequential(*layers)
        self.residual = bool(residual)
        self.factor = 2 ** (len(channels) - 1)
        self.channels = tuple(channels)
        self.n_res_blocks = n_res_blocks
        #: encoder layers: 0 = the input, k = output of the k-th module (stem, downsamplings, residual blocks)
        self.n_encoder_layers = len(channels) + n_res_blocks

    def feature_channels(self, layers: tuple[int, ...]) -> tuple[int, ...]:
        """Widths of the encoder feature maps ``layers`` (indices as in :meth:`encode`)."""
        widths = (1, *self.channels, *(self.channels[-1],) * self.n_res_blocks)
        for k in layers:
            if not 0 <= k <= self.n_encoder_layers:
                raise ValueError(f"nce_layers: layer {k} outside the encoder's 0..{self.n_encoder_layers}")
        return tuple(widths[k] for k in layers)

    def encode(self, x: torch.Tensor, layers: tuple[int, ...]) -> list[torch.Tensor]:
        """Encoder feature maps (N, C_k, H_k, W_k) at ``layers``: 0 is the input itself, k >= 1 the output of the
        k-th module (1 = the 7×7 stem, then the strided convolutions, then the residual blocks). Runs only as
        far as the deepest requested layer."""
        self.feature_channels(layers)  # validates
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by {self.factor}")
        wanted, feats, h = set(layers), {}, x
        if 0 in wanted:
            feats[0] = h
        for k in range(1, max(layers, default=0) + 1):
            h = self.net[k - 1](h)
            if k in wanted:
                feats[k] = h
        return [feats[k] for k in layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by {self.factor}")
        out = self.net(x)
        return x + out if self.residual else out
