"""Glow building blocks (Kingma & Dhariwal 2018) on (N, C, H, W) tensors.

Every layer maps ``x → (y, logdet)`` forward (data → latent) and ``reverse(y) → x`` exactly; ``logdet`` is
(N,) — the log |det ∂y/∂x| summed over the slice.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def squeeze(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) → (N, 4C, H/2, W/2): each 2×2 block becomes 4 channels."""
    n, c, h, w = x.shape
    x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, c * 4, h // 2, w // 2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`squeeze`."""
    n, c, h, w = x.shape
    x = x.view(n, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(n, c // 4, h * 2, w * 2)


class ActNorm(nn.Module):
    """Per-channel affine ``y = (x + b) · exp(s)`` initialised from the first training batch (zero mean, unit
    variance per channel)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def _init(self, x: torch.Tensor) -> None:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True) if x[:, 0].numel() > 1 else torch.ones_like(mean)
        self.bias.data.copy_(-mean)
        self.logs.data.copy_(-torch.log(std.clamp_min(1e-3)))
        self.initialized.fill_(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and not int(self.initialized):
            self._init(x)
        hw = x.shape[2] * x.shape[3]
        return (x + self.bias) * torch.exp(self.logs), (hw * self.logs.sum()).expand(x.shape[0])

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.logs) - self.bias


class InvConv1x1(nn.Module):
    """Invertible 1×1 convolution in LU form: ``W = P L (U + diag(sign · exp(log_s)))``; log-det is
    ``H·W·Σ log_s`` (O(C) instead of a determinant)."""

    def __init__(self, channels: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=generator))
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("p", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("l_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("eye", torch.eye(channels))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(s.abs()))

    def weight(self) -> torch.Tensor:
        lower = self.lower * self.l_mask + self.eye
        upper = self.upper * self.l_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.p @ lower @ upper

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight()
        hw = x.shape[2] * x.shape[3]
        return torch.einsum("ij,njhw->nihw", w, x), (hw * self.log_s.sum()).expand(x.shape[0])

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ij,njhw->nihw", torch.linalg.inv(self.weight()), y)


class ZeroConv(nn.Conv2d):
    """3×3 convolution initialised to zero, so every coupling starts as the identity."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(c_in, c_out, 3, padding=1)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


class AffineCoupling(nn.Module):
    """``y_b = (x_b + t(x_a)) · σ(s(x_a) + 2)``, ``y_a = x_a``; the sigmoid scale (as in Glow) keeps it stable."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.c_a = channels // 2
        self.net = nn.Sequential(
            nn.Conv2d(self.c_a, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1),
            nn.ReLU(),
            ZeroConv(hidden, 2 * (channels - self.c_a)),
        )

    def _shift_scale(self, x_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net(x_a)
        shift, raw = h[:, 0::2], h[:, 1::2]
        return shift, torch.sigmoid(raw + 2.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_a, x_b = x[:, : self.c_a], x[:, self.c_a :]
        shift, scale = self._shift_scale(x_a)
        y_b = (x_b + shift) * scale
        return torch.cat([x_a, y_b], dim=1), torch.log(scale).flatten(1).sum(1)

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        y_a, y_b = y[:, : self.c_a], y[:, self.c_a :]
        shift, scale = self._shift_scale(y_a)
        return torch.cat([y_a, y_b / scale - shift], dim=1)


class FlowStep(nn.Module):
    """ActNorm → invertible 1×1 conv → affine coupling."""

    def __init__(self, channels: int, hidden: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [ActNorm(channels), InvConv1x1(channels, generator), AffineCoupling(channels, hidden)]
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for layer in self.layers:
            x, ld = layer(x)
            total = total + ld
        return x, total

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self.layers):
            y = layer.reverse(y)
        return y


class Glow(nn.Module):
    """Multi-scale flow on (N, C, S, S): ``levels`` × [squeeze, ``depth`` flow steps, split half] (no split after
    the last level).

    The prior of the latents: with ``learned_prior`` (Glow's), each split-off half is normal with a mean and log
    std predicted from the half that goes on (a zero-initialised 3×3 convolution) and the coarsest latent is normal
    with a learned per-position mean and log std; without it, every latent is standard normal. The learned prior
    holds the coarse layout (where the heart and body are) from the first steps, so short fits sample structure
    instead of noise; both start as the standard normal."""

    def __init__(
        self, in_channels: int, size: int, levels: int, depth: int, hidden: int, seed: int = 0,
        learned_prior: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        if size % (2**levels):
            raise ValueError(f"image_size: {size} is not divisible by 2**levels={2**levels}")
        g = torch.Generator().manual_seed(seed)
        self.learned_prior = learned_prior
        self.levels = nn.ModuleList()
        self.split_priors = nn.ModuleList()
        c, s = in_channels, size
        for i in range(levels):
            c, s = c * 4, s // 2
            self.levels.append(nn.ModuleList([FlowStep(c, hidden, g) for _ in range(depth)]))
            if i < levels - 1:
                if learned_prior:
                    self.split_priors.append(ZeroConv(c - c // 2, 2 * (c // 2)))
                c //= 2
        if learned_prior:
            self.top = nn.Parameter(torch.zeros(1, 2 * c, s, s))

    def _prior(self, i: int, rest: torch.Tensor | None, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean, log std) of latent ``i`` given the half that went on (``rest``; None for the coarsest), or None
        for the standard normal."""
        if not self.learned_prior:
            return None
        h = self.top.expand(n, -1, -1, -1) if rest is None else self.split_priors[i](rest)
        return h[:, 0::2], h[:, 1::2]

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        """Data → latents (one per level, coarsest last), log-det (N,) and each latent's elementwise NLL under
        its prior (same shapes as the latents, nats)."""
        logdet = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        zs, nlls = [], []
        for i, steps in enumerate(self.levels):
            x = squeeze(x)
            for step in steps:
                x, ld = step(x)
                logdet = logdet + ld
            if i < len(self.levels) - 1:
                z, x = x.chunk(2, dim=1)
                zs.append(z)
                nlls.append(gaussian_nll(z, self._prior(i, x, len(z))))
        zs.append(x)
        nlls.append(gaussian_nll(x, self._prior(len(self.levels) - 1, None, len(x))))
        return zs, logdet, nlls

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Data → latents (one per level, coarsest last) and log-det (N,)."""
        zs, logdet, _ = self.encode(x)
        return zs, logdet

    def reverse(self, zs: list[torch.Tensor]) -> torch.Tensor:
        """Latents → data, the exact inverse of :meth:`forward`."""
        return self._decode(lambda i, rest: zs[i])

    def sample(self, eps: list[torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
        """Data from standard-normal draws ``eps`` (shapes of :meth:`latent_shapes`): each latent is its prior's
        mean plus ``temperature`` × its std × the draw, coarsest first (a split's prior needs the half above)."""

        def draw(i: int, rest: torch.Tensor | None) -> torch.Tensor:
            prior = self._prior(i, rest, len(eps[i]))
            if prior is None:
                return eps[i] * temperature
            mean, logs = prior
            return mean + torch.exp(logs) * eps[i] * temperature

        return self._decode(draw)

    def _decode(self, latent: Callable[[int, torch.Tensor | None], torch.Tensor]) -> torch.Tensor:
        """Data from ``latent(level, rest)``, called coarsest first with the half that went on at that level's split
        (None for the coarsest latent)."""
        x = latent(len(self.levels) - 1, None)
        for i in reversed(range(len(self.levels))):
            if i < len(self.levels) - 1:
                x = torch.cat([latent(i, x), x], dim=1)
            for step in reversed(self.levels[i]):
                x = step.reverse(x)
            x = unsqueeze(x)
        return x

    def latent_shapes(self, in_channels: int, size: int) -> list[tuple[int, int, int]]:
        """(C, H, W) of each latent returned by :meth:`forward`."""
        shapes, c, s = [], in_channels, size
        for i in range(len(self.levels)):
            c, s = c * 4, s // 2
            if i < len(self.levels) - 1:
                shapes.append((c // 2, s, s))
                c //= 2
        shapes.append((c, s, s))
        return shapes


def gaussian_nll(z: torch.Tensor, prior: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Elementwise normal negative log-density of ``z`` under ``prior`` = (mean, log std), standard if None."""
    if prior is None:
        return 0.5 * z * z + 0.5 * math.log(2 * math.pi)
    mean, logs = prior
    return 0.5 * ((z - mean) * torch.exp(-logs)) ** 2 + logs + 0.5 * math.log(2 * math.pi)
