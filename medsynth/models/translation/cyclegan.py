"""CycleGAN: unpaired image-to-image translation between two domains of a slice set (capability ``translate``).

Domains are values of one manifest column (``domain_key``: ``modality`` for cine → LGE appearance, ``vendor``
for scanner A → B, ``dataset``, …); ``source`` → ``target`` is the forward direction. Two ResNet generators
(:mod:`medsynth.models.translation.networks`) and two MONAI ``PatchDiscriminator`` s are trained with the
least-squares adversarial loss (MONAI ``PatchAdversarialLoss``), the cycle-consistency L1 loss (λ_cycle) and the
identity L1 loss (λ_identity · λ_cycle) of Zhu et al. (ICCV 2017). Differences from the paper, for CPU budgets:
small widths, no history pool of generated images, constant learning rate by default (``lr_schedule: linear``
gives the paper's decay); the discriminators take their step before the generators within each iteration (on
the same generated batch, detached).

Training runs in the one loop of :class:`~medsynth.models.torch_family.TorchFamily` as two optimiser steps per
iteration — ``"discriminator"`` (both PatchGANs, Adam at ``disc_lr``, default ``lr``: TTUR when they differ)
then ``"generator"`` (both generators) — on the fakes made once per iteration by a shared forward. Both
optimisers, both discriminators and (with ``ema_decay``) the generators' EMA are checkpointed; only the
generators (and their EMA) are saved with the model.

Slices are resized to ``image_size`` × ``image_size`` for training and translation and the output is resized
back to the input size, so fine detail above the working resolution is lost; raise ``image_size`` on a GPU.
Arrays: images (N, 1, H, W) float32 on the slice intensity scale. Geometry is kept by the cycle loss, not
guaranteed: the translate flow measures it with a segmentation-consistency check, and ``lambda_seg`` > 0 adds
the segmentation-consistency loss of :mod:`medsynth.models.translation.segconsistency` (a frozen U-Net trained
on the source-domain labels must still segment G_AB(x)); the fit's timing then includes that U-Net's training.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from pydantic import Field, model_validator
from torch import nn

from medsynth.config import KeyProblem, StrictModel
from medsynth.data.slices import SliceSet
from medsynth.models.latent.common import to_size
from medsynth.models.torch_family import TorchConfig
from medsynth.models.translation.common import UnpairedTranslator
from medsynth.models.translation.networks import ResnetGenerator
from medsynth.models.translation.segconsistency import (
    SegConsistencyKeys,
    seg_consistency_loss,
)
from medsynth.utils.seeding import exclusive_global_rng

log = logging.getLogger(__name__)


class UnpairedTranslationConfig(SegConsistencyKeys, TorchConfig):
    """Keys every unpaired translation family (cyclegan, cut, fastcut) shares: the two domains, the ResNet
    generator and PatchGAN discriminator shapes, the TTUR learning rates and the segmentation-consistency keys."""

    domain_key: str = Field("modality", description="slice metadata column whose values name the domains")
    source: str = Field("cine", description="domain translated from (forward direction)")
    target: str = Field("lge", description="domain translated to")
    image_size: int = Field(64, ge=8, description="working size (square); divisible by 2^(len(channels)-1)")
    channels: tuple[int, ...] = Field((16, 32, 64), min_length=1)
    n_res_blocks: int = Field(4, ge=0)
    disc_channels: int = Field(16, ge=1, description="width of the first PatchGAN layer")
    disc_layers: int = Field(3, ge=1)
    steps: int = Field(2000, ge=0)
    lr: float = Field(2e-4, gt=0, description="generator learning rate")
    disc_lr: float | None = Field(None, gt=0, description="discriminator learning rate (TTUR); null = lr")
    #: G(x) = x + correction, zero-initialised head: training starts at the identity (see networks.py); false =
    #: the paper's plain generator, which must first learn to copy its input
    residual: bool = Field(True, description="residual generator starting at the identity")

    @model_validator(mode="after")
    def _check_shape_and_domains(self) -> UnpairedTranslationConfig:
        factor = 2 ** (len(self.channels) - 1)
        if self.image_size % factor:
            raise KeyProblem(
                "image_size", f"image_size: {self.image_size} is not divisible by 2^(len(channels)-1)={factor}"
            )
        if self.source.strip().lower() == self.target.strip().lower():
            raise KeyProblem("target", f"source/target: the two domains must differ (both {self.source!r})")
        return self

    def generator(self) -> ResnetGenerator:
        """The generator these keys describe (every translation family builds its generators here)."""
        return ResnetGenerator(tuple(self.channels), self.n_res_blocks, residual=self.residual)


class CycleGANConfig(UnpairedTranslationConfig):
    """CycleGAN keys plus the shared ones (here steps 2000, batch_size 8, lr 2e-4)."""

    batch_size: int = Field(8, ge=1)
    lambda_cycle: float = Field(10.0, ge=0)
    lambda_identity: float = Field(0.5, ge=0, description="identity loss weight, relative to lambda_cycle")


class CycleGANModel(UnpairedTranslator):
    """Unpaired translation ``source`` ↔ ``target``; ``translate`` maps source-domain slices to the target."""

    family: ClassVar[str] = "cyclegan"
    Config: ClassVar[type[StrictModel]] = CycleGANConfig
    ema_modules: ClassVar[tuple[str, ...] | None] = ("g_ab", "g_ba")

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        # the contract test's tiny slices carry two pathologies, which serve as the two domains
        return {
            "domain_key": "pathology", "source": "normal", "target": "infarct", "image_size": 16,
            "channels": (4, 8), "n_res_blocks": 1, "disc_channels": 4, "disc_layers": 1, "steps": 3,
            "batch_size": 2, "progress": False,
        }  # fmt: skip

    @property
    def g_ab(self) -> nn.Module | None:
        """Source → target generator as used now (EMA weights after training when enabled)."""
        return self.module("g_ab") if self.nets else None

    @property
    def g_ba(self) -> nn.Module | None:
        """Target → source generator as used now."""
        return self.module("g_ba") if self.nets else None

    def build_modules(self) -> dict[str, nn.Module]:
        return {"g_ab": self._generator(), "g_ba": self._generator()}

    def _generator(self) -> nn.Module:
        return self.config.generator()

    # ---- fitting -------------------------------------------------------------------------------------
    @exclusive_global_rng
    def fit(self, train: SliceSet, val: SliceSet | None = None, seed: int = 0) -> dict[str, Any]:
        """Train on the source- and target-domain slices of ``train`` (unpaired; other domains ignored)."""
        cfg = self.config
        is_a, is_b, unet = self.begin_translation_fit(train, seed)  # weight init order: g_ab, g_ba, then d_a, d_b
        g_ab, g_ba = self.nets["g_ab"], self.nets["g_ba"]
        d_a, d_b = self._discriminator().to(self.device), self._discriminator().to(self.device)
        # the i-th domain's batches are seeded by (seed + i, step): a resumed run draws the same pairs
        data = self.translation_data(train, is_a, is_b, unet)
        adv = PatchAdversarialLoss(criterion="least_squares", no_activation_leastsq=True)

        def fakes(batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
            # one generator forward per iteration, shared by both steps (the discriminator sees it detached)
            a, b = batch["a"][:, :1], batch["b"]
            x = {"a": a, "b": b, "fake_b": g_ab(a), "fake_a": g_ba(b)}
            if unet is not None:
                x["labels"] = batch["a"][:, 1]
            return x

        def disc_loss(x: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, float]]:
            loss_d = 0.5 * (
                adv(d_b(x["b"])[-1], target_is_real=True, for_discriminator=True)
                + adv(d_b(x["fake_b"].detach())[-1], target_is_real=False, for_discriminator=True)
                + adv(d_a(x["a"])[-1], target_is_real=True, for_discriminator=True)
                + adv(d_a(x["fake_a"].detach())[-1], target_is_real=False, for_discriminator=True)
            )
            return loss_d, {"disc": float(loss_d.detach())}

        def gen_loss(x: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, float]]:
            a, b, fake_b, fake_a = x["a"], x["b"], x["fake_b"], x["fake_a"]
            loss_adv = adv(d_b(fake_b)[-1], target_is_real=True, for_discriminator=False) + adv(
                d_a(fake_a)[-1], target_is_real=True, for_discriminator=False
            )
            loss_cyc = F.l1_loss(g_ba(fake_b), a) + F.l1_loss(g_ab(fake_a), b)
            loss = loss_adv + cfg.lambda_cycle * loss_cyc
            loss_idt = torch.zeros((), device=a.device)
            if cfg.lambda_identity > 0:
                loss_idt = F.l1_loss(g_ab(b), b) + F.l1_loss(g_ba(a), a)
                loss = loss + cfg.lambda_identity * cfg.lambda_cycle * loss_idt
            logs = {
                "adv": float(loss_adv.detach()),
                "cycle_l1": float(loss_cyc.detach()),
                "identity_l1": float(loss_idt.detach()),
            }
            if unet is not None:
                loss_seg = seg_consistency_loss(unet, fake_b, x["labels"])
                loss = loss + cfg.lambda_seg * loss_seg
                logs["seg_ce"] = float(loss_seg.detach())
            return loss, logs

        betas = (0.5, 0.999)
        d_params = itertools.chain(d_a.parameters(), d_b.parameters())
        g_params = itertools.chain(g_ab.parameters(), g_ba.parameters())
        steps = [
            self.make_step("discriminator", d_params, disc_loss, [d_a, d_b], lr=cfg.disc_lr or cfg.lr, betas=betas),
            self.make_step("generator", g_params, gen_loss, [g_ab, g_ba], betas=betas),
        ]
        discs = {"d_a": d_a, "d_b": d_b}  # trained and checkpointed, not saved with the model
        res = self.train_steps(steps, data, seed, extra_modules=discs, prepare=fakes, main="generator")
        self.fitted = True
        report = self.translation_report(res, is_a, is_b)
        if val is not None and len(val):
            report.update(self.evaluate(val))
        return report

    @torch.no_grad()
    def evaluate(self, slices: SliceSet) -> dict[str, float]:
        """Held-out cycle L1 per direction (source → target → source and back), on the working grid."""
        self._require_fitted()
        out: dict[str, float] = {}
        for name, mask, there, back in (
            ("source", self.domains(slices)[0], self.g_ab, self.g_ba),
            ("target", self.domains(slices)[1], self.g_ba, self.g_ab),
        ):
            if mask.any():
                x = self.tensor(to_size(slices.images[mask], self.config.image_size))
                rec = torch.cat([back(there(b)) for b in x.split(64)])
                out[f"val_cycle_l1_{name}"] = float((rec - x).abs().mean())
        return out

    # ---- contract ------------------------------------------------------------------------------------
    @torch.no_grad()
    def translate(self, images: np.ndarray, seed: int = 0, direction: str = "forward") -> np.ndarray:
        """Source-domain images (N, 1, H, W) → target appearance (``direction="backward"``: target → source),
        returned at the input size. Deterministic (no sampling; ``seed`` is unused)."""
        if direction not in ("forward", "backward"):
            raise ValueError(f"direction: 'forward' or 'backward', got {direction!r}")
        if direction == "forward":
            return self.run_generator(self.g_ab, images, "target")
        return self.run_generator(self.g_ba, images, "source")
