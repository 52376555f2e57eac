"""What pix2pix and SPADE share: the working-size config keys, the intensity scaling between medsynth's slice
scale and the generators' standardised scale, label-map checks, the condition (heart labels alone, or plus the
surroundings partition: ``surroundings``, :mod:`medsynth.models.conditioning`), the paired training data and the
resize-back of samples.

Slice intensities are robust-normalised (about [0, 1], not clipped above). The generators have a linear head
and work on standardised intensities ``(x - center) / scale`` (mean and standard deviation of the training
pixels): a fresh generator's output (about 0) is then the training mean, so it learns tissue levels from
there. An image-range tanh head (pix2pix's [-1, 1]) was tried first: with ACDC's bright outliers (max about
4× the robust range) the background sat in the saturated tail and the L1 had barely fallen after 300 steps.
Samples are mapped back and bounded to the training range widened by ``headroom`` at both ends, so values
above 1 are produced where the training data has them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn

from medsynth.data.slices import SliceSet
from medsynth.models.conditioning import LabelCondition, Surroundings, SurroundingsKeys
from medsynth.models.latent.common import (
    check_slices,
    labels_to_size,
    maps_to_size,
    to_size,
    validate_label_maps,
)
from medsynth.models.torch_family import TorchConfig, TorchFamily

#: a step's loss: (prepared batch, step) -> (scalar loss, logged floats)
LossFn = Callable[[Any, int], tuple[torch.Tensor, dict[str, float]]]


class LabelGANConfig(TorchConfig, SurroundingsKeys):
    """Keys shared by the label-conditioned GANs (here steps 2000, batch_size 8, lr 2e-4), with the condition's
    ``surroundings`` keys; ``surroundings: partition`` by default, chosen by downstream Dice on ACDC
    (configs/acdc_learning_curve.yaml, 6 training patients, 3 seeds): SPADE with the partition +2.2 [+0.7, +3.6]
    Dice points over real-only with all 6 patients and +3.4 with 4, heart labels alone +0.9 [-1.2, +3.0] and
    +1.0; synthetic-only -2.2 against -15.1 points (rFD 0.97 against 2.21). pix2pix was not separable at 2, 4
    or 6 patients (within 1.5 points, CIs overlapping) but its synthetic-only arm gained 14 points with it."""

    surroundings: Surroundings = Field(
        "partition",
        description="partition (default): heart labels plus the unsupervised surroundings classes (outside the "
        "body, lung, body wall, liver, vessels); none: one-hot heart labels only, the generator invents the rest",
    )

    image_size: int = Field(64, ge=8, description="working size (square); samples are resized back")
    steps: int = Field(2000, ge=0)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-4, gt=0, description="generator learning rate")
    disc_lr: float | None = Field(None, gt=0, description="discriminator learning rate (TTUR); null = lr")
    headroom: float = Field(
        0.1, ge=0, description="margin beyond the training intensity range at both ends, as a fraction of it"
    )


class LabelGAN(TorchFamily):
    """Base of the label → image GAN families (not registered itself)."""

    conditional = True

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.native: tuple[int, int] = (self.config.image_size, self.config.image_size)
        self.lo, self.hi = 0.0, 1.0
        self.center, self.scale = 0.0, 1.0
        self.condition = LabelCondition(self.config)

    @property
    def cond_channels(self) -> int:
        """Channels of the one-hot condition the networks see (``N_CLASSES``, + K with a partition)."""
        return self.condition.channels

    # ---- intensity scale -----------------------------------------------------------------------------
    def set_scale(self, images: np.ndarray) -> None:
        lo, hi = float(np.min(images)), float(np.max(images))
        span = max(hi - lo, 1e-6)
        self.lo, self.hi = lo - self.config.headroom * span, hi + self.config.headroom * span
        self.center = float(np.mean(images, dtype=np.float64))
        self.scale = max(float(np.std(images, dtype=np.float64)), 1e-6)

    def to_gen(self, images: np.ndarray) -> np.ndarray:
        """Slice scale → the generator's standardised scale (same shape)."""
        return ((images - self.center) / self.scale).astype(np.float32)

    def from_gen(self, y: np.ndarray) -> np.ndarray:
        """Generator scale → slice scale, bounded to the widened training range [lo, hi]."""
        return np.clip(y * self.scale + self.center, self.lo, self.hi).astype(np.float32)

    # ---- data ----------------------------------------------------------------------------------------
    def paired(self, slices: SliceSet, maps: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (N, 1, s, s) on the generator's scale, condition maps (N, s, s) int64) on the device;
        ``maps`` (N, H, W) default to the slices' canonical labels."""
        s = self.config.image_size
        x = self.tensor(self.to_gen(to_size(slices.images, s)))
        maps = slices.labels if maps is None else maps
        lab = self.tensor(labels_to_size(maps.astype(np.uint8), s), dtype=torch.long)
        return x, lab

    def check_labels(self, labels: np.ndarray | None, n: int | None = None) -> np.ndarray:
        return validate_label_maps(labels, self.family, n)

    def condition_maps(self, labels: np.ndarray, seed: int, images: np.ndarray | None = None) -> np.ndarray:
        """Condition maps (n, H, W) for canonical ``labels`` (n, H, W) to render: the labels themselves, or with
        a partition the extended maps (bank partitions drawn from ``seed``, or the partition of the real
        ``images`` (n, 1, H, W) when given); see :meth:`LabelCondition.maps_for`."""
        return self.condition.maps_for(labels, seed, images)

    def one_hot(self, maps: torch.Tensor) -> torch.Tensor:
        """(n, s, s) condition maps at the working size → (n, cond_channels, s, s) one-hot on their device."""
        return self.condition.one_hot(maps)

    def cond(self, maps: np.ndarray) -> torch.Tensor:
        """(n, H, W) condition maps (:meth:`condition_maps`) → (n, cond_channels, s, s) one-hot on the device
        (nearest-neighbour resize)."""
        return self.one_hot(self.tensor(labels_to_size(maps, self.config.image_size), dtype=torch.long))

    def back(self, y: torch.Tensor, hw: tuple[int, int]) -> np.ndarray:
        """Generator output (n, 1, s, s) → (n, 1, H, W) float32 on the slice scale."""
        x = self.from_gen(self.numpy(y))
        return maps_to_size(x[:, 0], hw)[:, None].astype(np.float32)

    # ---- fitting -------------------------------------------------------------------------------------
    def _discriminator(self) -> nn.Module:
        """A fresh discriminator on (one-hot labels, image) channels (the family's own)."""
        raise NotImplementedError(f"{type(self).__name__}._discriminator")

    def begin_gan_fit(self, train: SliceSet, seed: int) -> tuple[nn.Module, nn.Module]:
        """Check ``train``'s pairs, seed the fit, record the native size and intensity scale, build the
        generator (persistent) and then the discriminator (trained, checkpointed, not saved): that weight init
        order is part of what a seed means. Returns (generator, discriminator) on the device."""
        check_slices(train, self.family)
        self.check_labels(train.labels)
        self.begin_fit(seed)
        self.native = train.image_size
        self.set_scale(train.images)
        self.condition = LabelCondition(self.config)  # the config decides a new fit's condition channels
        self.set_modules(self.build_modules())
        return self.nets["gen"], self._discriminator().to(self.device)

    def train_gan(
        self,
        gen: nn.Module,
        disc: nn.Module,
        losses: tuple[LossFn, LossFn],
        forward: Any,
        train: SliceSet,
        val: SliceSet | None,
        seed: int,
        betas: tuple[float, float],
    ) -> dict[str, Any]:
        """The loop of every label GAN: a discriminator step (at ``disc_lr``, default ``lr``: TTUR when they
        differ) then a generator step per iteration on the generator output ``forward`` makes once; ``losses``
        = (discriminator loss, generator loss). Returns the fit report (+ held-out metrics on ``val``)."""
        disc_loss, gen_loss = losses
        steps = [
            self.make_step(
                "discriminator", disc.parameters(), disc_loss, [disc], lr=self.config.disc_lr or self.config.lr,
                betas=betas,
            ),
            self.make_step("generator", gen.parameters(), gen_loss, [gen], betas=betas),
        ]  # fmt: skip
        t0 = time.perf_counter()
        # the condition maps of the training slices (with a partition: extended maps, and the bank is kept)
        data = self.paired(train, self.condition.fit_maps(train.images, train.labels, seed))
        res = self.train_steps(steps, data, seed, extra_modules={"disc": disc}, prepare=forward, main="generator")
        elapsed = time.perf_counter() - t0
        self.fitted = True
        report = self.fit_report(res, len(train), elapsed)
        if val is not None and len(val):
            report.update(self.evaluate(val))
        return report

    # ---- state beside the weights ----------------------------------------------------------------------
    def extra_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        meta = {"native": list(self.native), "lo": self.lo, "hi": self.hi, "center": self.center, "scale": self.scale}
        arrays, cond_meta = self.condition.state()
        return arrays, {**meta, **cond_meta}

    def load_extra_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.native = (int(meta["native"][0]), int(meta["native"][1]))
        self.lo, self.hi = float(meta["lo"]), float(meta["hi"])
        self.center, self.scale = float(meta["center"]), float(meta["scale"])
        # the saved state decides the condition (and so the networks' input channels), not today's defaults
        self.config = self.condition.restore(self.config, arrays, meta)
