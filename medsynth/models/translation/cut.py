"""CUT and FastCUT: one-sided unpaired image-to-image translation with PatchNCE (capability ``translate``).

Written from Park et al., "Contrastive Learning for Unpaired Image-to-Image Translation" (ECCV 2020). One
generator G (the ResNet generator of :mod:`medsynth.models.translation.networks`, whose encoder also serves as
the feature extractor) and one MONAI ``PatchDiscriminator`` trained with the least-squares adversarial loss
(MONAI ``PatchAdversarialLoss``), plus PatchNCE (:mod:`medsynth.models.translation.patchnce`) between the
encoder features of each input x and of G(x) re-encoded, at ``nce_layers``, ``num_patches`` locations per
layer, temperature ``nce_tau``, a 2-layer MLP head per layer with L2 normalisation, negatives from the same
image. The generator's loss is

    λ_GAN · L_GAN(G(x)) + λ_NCE · PatchNCE(x, G(x)) [+ λ_NCE · PatchNCE(y, G(y))  (identity, CUT)]
    [+ λ_seg · CE(U-Net_source(G(x)), labels(x))  (optional, :mod:`.segconsistency`)]

- ``cut``: λ_GAN = 1, λ_NCE = 1, identity PatchNCE on target-domain images y;
- ``fastcut``: λ_NCE = 10, no identity term, flip-equivariance augmentation: on a random half of the
  iterations the generator's inputs are mirrored left-right and the query features of its outputs are mirrored
  back before PatchNCE, so G must commute with the flip.

Differences from the paper, for CPU budgets and this package's contract: small widths, batches of
``batch_size`` (the paper uses 1), PatchNCE averaged (not summed) over layers, constant LR by default; the
projection heads are built at construction from the known feature widths (the paper builds them lazily), so
they are initialised in a fixed order and saved with the generator; the discriminator takes its step before
the generator within each iteration, on the same generated batch (detached). Only G (and its EMA) and the heads
are saved; the discriminator is trained and checkpointed but not saved.

CUT maps one way: ``translate(direction="backward")`` raises; fit a second model with ``source`` and
``target`` swapped for the other direction. ``translation_domains`` answers both directions (the evaluation
asks it which slices are target-domain).

Arrays: images (N, 1, H, W) float32 on the slice intensity scale, resized to ``image_size`` × ``image_size``
for training and translation and back to the input size afterwards.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np
import torch
from monai.losses import PatchAdversarialLoss
from pydantic import Field, model_validator
from torch import nn

from medsynth.config import KeyProblem, StrictModel
from medsynth.data.slices import SliceSet
from medsynth.errors import MedsynthError
from medsynth.models.translation.common import UnpairedTranslator
from medsynth.models.translation.cyclegan import UnpairedTranslationConfig
from medsynth.models.translation.patchnce import PatchProjection, patch_nce_loss
from medsynth.models.translation.segconsistency import (
    seg_consistency_loss,
)
from medsynth.utils.seeding import exclusive_global_rng

log = logging.getLogger(__name__)


class CUTConfig(UnpairedTranslationConfig):
    """CUT keys plus the shared translation keys (here steps 2000, batch_size 4, lr 2e-4, which also trains
    the projection heads)."""

    batch_size: int = Field(4, ge=1)
    lambda_gan: float = Field(1.0, ge=0)
    lambda_nce: float = Field(1.0, ge=0)
    nce_identity: bool = Field(True, description="identity PatchNCE on target-domain images (CUT)")
    flip_equivariance: bool = Field(False, description="mirror inputs on half the iterations (FastCUT)")
    #: encoder layers for PatchNCE (0 = input, 1 = stem, then downsamplings, then residual blocks);
    #: null = the input, the stem, every downsampling and the middle residual block
    nce_layers: tuple[int, ...] | None = None
    num_patches: int = Field(256, ge=1, description="sampled locations per layer and image")
    nce_tau: float = Field(0.07, gt=0, description="temperature")
    nce_dim: int = Field(256, ge=1, description="projection head width (both layers)")

    @model_validator(mode="after")
    def _check_nce_layers(self) -> CUTConfig:
        if self.nce_layers is not None:
            top = len(self.channels) + self.n_res_blocks
            bad = [k for k in self.nce_layers if not 0 <= k <= top]
            if not self.nce_layers or bad or len(set(self.nce_layers)) != len(self.nce_layers):
                raise KeyProblem(
                    "nce_layers", f"nce_layers: distinct encoder layers in 0..{top} needed, got {self.nce_layers}"
                )
        return self

    def layers(self) -> tuple[int, ...]:
        """The PatchNCE layers (the configured ones, or the default set)."""
        if self.nce_layers is not None:
            return tuple(self.nce_layers)
        base = tuple(range(len(self.channels) + 1))  # input, stem, downsamplings
        return base + ((len(self.channels) + (self.n_res_blocks + 1) // 2,) if self.n_res_blocks else ())


class FastCUTConfig(CUTConfig):
    """FastCUT: λ_NCE = 10, no identity PatchNCE, flip-equivariance augmentation."""

    lambda_nce: float = Field(10.0, ge=0)
    nce_identity: bool = Field(False, description="identity PatchNCE on target-domain images (CUT)")
    flip_equivariance: bool = Field(True, description="mirror inputs on half the iterations (FastCUT)")


class CUTModel(UnpairedTranslator):
    """Unpaired one-way translation ``source`` → ``target`` with PatchNCE."""

    family: ClassVar[str] = "cut"
    Config: ClassVar[type[StrictModel]] = CUTConfig
    ema_modules: ClassVar[tuple[str, ...] | None] = ("g",)
    directions: ClassVar[tuple[str, ...]] = ("forward",)

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        # the contract test's tiny slices carry two pathologies, which serve as the two domains
        return {
            "domain_key": "pathology", "source": "normal", "target": "infarct", "image_size": 16,
            "channels": (4, 8), "n_res_blocks": 1, "disc_channels": 4, "disc_layers": 1, "steps": 3,
            "batch_size": 2, "num_patches": 16, "nce_dim": 8, "progress": False,
        }  # fmt: skip

    def build_modules(self) -> dict[str, nn.Module]:
        cfg = self.config
        g = cfg.generator()  # built first: weight init order g, h, d
        h = PatchProjection(g.feature_channels(cfg.layers()), cfg.nce_dim)
        return {"g": g, "h": h}

    # ---- fitting -------------------------------------------------------------------------------------
    @exclusive_global_rng
    def fit(self, train: SliceSet, val: SliceSet | None = None, seed: int = 0) -> dict[str, Any]:
        """Train on the source- and target-domain slices of ``train`` (unpaired; other domains ignored; ``val``
        is not used)."""
        cfg = self.config
        is_a, is_b, unet = self.begin_translation_fit(train, seed)
        g, h = self.nets["g"], self.nets["h"]
        d = self._discriminator().to(self.device)
        data = self.translation_data(train, is_a, is_b, unet)
        adv = PatchAdversarialLoss(criterion="least_squares", no_activation_leastsq=True)
        layers = cfg.layers()

        def fakes(batch: dict[str, torch.Tensor], step: int) -> dict[str, Any]:
            # one generator forward per iteration, shared by both steps (the discriminator sees it detached)
            a, b = batch["a"][:, :1], batch["b"]
            real = torch.cat([a, b]) if cfg.nce_identity else a  # instance norm: per image, so batching is exact
            flip = bool(cfg.flip_equivariance and torch.rand(()) < 0.5)  # global RNG: seeded + checkpointed
            out = g(real.flip(-1) if flip else real)
            x = {"a": a, "b": b, "fake_b": out[: len(a)], "flip": flip}
            if cfg.nce_identity:
                x["idt_b"] = out[len(a) :]
            if unet is not None:
                x["labels"] = batch["a"][:, 1]
            return x

        def nce(src: torch.Tensor, out: torch.Tensor, flip: bool) -> torch.Tensor:
            feat_q = g.encode(out, layers)
            if flip:  # G saw the mirrored input: mirror its features back onto the input's grid
                feat_q = [f.flip(-1) for f in feat_q]
            return patch_nce_loss(feat_q, g.encode(src, layers), h, cfg.num_patches, cfg.nce_tau)

        def disc_loss(x: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
            loss_d = 0.5 * (
                adv(d(x["b"])[-1], target_is_real=True, for_discriminator=True)
                + adv(d(x["fake_b"].detach())[-1], target_is_real=False, for_discriminator=True)
            )
            return loss_d, {"disc": float(loss_d.detach())}

        def gen_loss(x: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
            loss_adv = adv(d(x["fake_b"])[-1], target_is_real=True, for_discriminator=False)
            loss_nce = nce(x["a"], x["fake_b"], x["flip"])
            loss = cfg.lambda_gan * loss_adv + cfg.lambda_nce * loss_nce
            logs = {"adv": float(loss_adv.detach()), "nce": float(loss_nce.detach())}
            if cfg.nce_identity:
                loss_idt = nce(x["b"], x["idt_b"], x["flip"])
                loss = loss + cfg.lambda_nce * loss_idt
                logs["nce_identity"] = float(loss_idt.detach())
            if unet is not None:
                fake = x["fake_b"].flip(-1) if x["flip"] else x["fake_b"]
                loss_seg = seg_consistency_loss(unet, fake, x["labels"])
                loss = loss + cfg.lambda_seg * loss_seg
                logs["seg_ce"] = float(loss_seg.detach())
            return loss, logs

        betas = (0.5, 0.999)
        gh_params = [*g.parameters(), *h.parameters()]
        steps = [
            self.make_step("discriminator", d.parameters(), disc_loss, [d], lr=cfg.disc_lr or cfg.lr, betas=betas),
            self.make_step("generator", gh_params, gen_loss, [g, h], betas=betas),
        ]
        res = self.train_steps(steps, data, seed, extra_modules={"d": d}, prepare=fakes, main="generator")
        self.fitted = True
        return self.translation_report(res, is_a, is_b)

    # ---- contract ------------------------------------------------------------------------------------
    @torch.no_grad()
    def translate(self, images: np.ndarray, seed: int = 0, direction: str = "forward") -> np.ndarray:
        """Source-domain images (N, 1, H, W) → target appearance at the input size. Deterministic (``seed`` is
        unused). ``direction`` must be ``"forward"``: CUT is one-sided."""
        self._require_fitted()
        if direction == "backward":
            raise MedsynthError(
                f"direction: {self.family} translates one way only ({self.config.source} -> {self.config.target}); "
                f"fit another {self.family} model with source and target swapped for 'backward'"
            )
        if direction != "forward":
            raise ValueError(f"direction: 'forward' or 'backward', got {direction!r}")
        return self.run_generator(self.module("g"), images, "target")


class FastCUTModel(CUTModel):
    """FastCUT: CUT with λ_NCE = 10, no identity PatchNCE and flip equivariance (see :class:`FastCUTConfig`)."""

    family: ClassVar[str] = "fastcut"
    Config: ClassVar[type[StrictModel]] = FastCUTConfig


__all__ = ["CUTConfig", "CUTModel", "FastCUTConfig", "FastCUTModel"]
