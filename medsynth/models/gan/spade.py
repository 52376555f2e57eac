"""SPADE: label map → image with spatially-adaptive normalisation (Park et al., CVPR 2019), with an optional VAE
style encoder (VAE-GAN) for random styles and for the style of a reference image (capability ``style``).

Generator: MONAI ``SPADENet`` (:func:`~medsynth.models.gan.networks.spade_generator`; one-hot canonical label
maps, K = 6 channels, modulate every residual block). With ``style_encoder`` (default) an encoder maps an
image to a Gaussian style code ``z`` (``z_dim``): training encodes the real image, reparameterises and
reconstructs it from (label map, z), with a KL term (``lambda_kl``) pulling the codes towards N(0, I).
:meth:`SpadeModel.sample` then draws ``z`` ~ N(0, I) from ``seed`` (a random style);
:meth:`SpadeModel.sample_with_style` uses the posterior-mean code of a reference image (the reference's
scanner / contrast appearance, not its anatomy). Without the encoder the decoder starts from the downsampled
label map and is deterministic per label map, and ``supports("style")`` is false.

Reference styles, what was wrong and what was measured (phantom scanners A and B, the same hearts by both,
32 px, 200 steps at lr 1e-3, 6 training + 2 held-out subjects, one seed). With MONAI's VAE-GAN as it is, the
codes were *not* collapsed (KL 4.6 nats; the A and B codes differed), but the decoder ignored them: decoding
the mean code of the A images or of the B images gave the same tissue means to 0.001, while z = ±3 moved them
by 0.2-0.3. A held-out label map rendered with a scanner-A or a scanner-B reference got the same myocardium
mean, 0.37 / 0.38 (real 0.26 / 0.36). Causes and fixes, with the myocardium means for A / B references
at this budget:

- ``z`` reached only the decoder's first layer, whose features every SPADE block re-normalises and overwrites
  with label-driven levels. ``style_every_block``: ``z`` also enters every block's modulation network
  (alone: still the same means for both scanners, 4 subjects), and ``style_tissue_head`` adds a per-label
  output gain and shift from ``z`` (:class:`~medsynth.models.gan.networks.StyleSPADENet`).
- MONAI's encoder flattens its last feature map, so its code holds layout (the unlabelled surroundings)
  as much as appearance. ``style_pooling``: a pooled encoder on intensity quantiles and features
  (:class:`~medsynth.models.gan.networks.StyleEncoder`). With both: 0.25 / 0.32 (0.30 / 0.34 without
  pooling; 0.31 / 0.34 without the head's learning-rate scale).
- The L1 reconstruction fits per-tissue medians, and B's blur skews its tissue distributions, so B-styled
  myocardium stayed too dark (our reading of 0.32 against 0.36). ``lambda_tissue``: an L1 between the
  per-label mean intensities of the generated and the real image. With it and batch-normalised encoder
  statistics: 0.26 / 0.35.

The intensity scale was checked too: the generators standardise with the training set's mean and SD (one
affine map for all slices, see :mod:`~medsynth.models.gan.common`), so scanner differences reach the encoder.
Preprocessing maps each volume's 1st / 99th percentiles to 0 / 1, so what is left of the scanner is the
contrast curve, blur, noise and bias: mostly the myocardium (per-subject means 0.24-0.33 for A and 0.29-0.41
for B). LV and RV vary more between subjects than between scanners. With all fixes, the per-tissue means
(background, LV, myocardium, RV) of held-out label maps rendered with held-out references were closer to the
reference's than to the other scanner's image of the same heart for 83 % of A and 83 % of B references
(25 % / 88 % before: every output was B-like). The distance between the scanners' mean codes went from 0.7
times the within-scanner spread to 1.6 times it. One seed, so these are indications, not estimates. Results
at 64 px are in the README (families table, ``spade`` row).

Discriminator: MONAI ``MultiScalePatchDiscriminator`` (``num_d`` PatchGANs of ``disc_layers``,
2·``disc_layers``, … layers; ``disc_layers`` 2 at 64–128 px) on (one-hot label, image) pairs. Losses: hinge
adversarial (MONAI ``PatchAdversarialLoss``; ``adversarial`` can select vanilla / lsgan), discriminator feature
matching (``lambda_fm``, L1 over every intermediate feature of every discriminator), an L1 reconstruction term
(``lambda_l1``; stands in for the paper's VGG perceptual loss, whose pretrained weights medsynth does not
download) and the KL term. TTUR: the discriminator learns at ``disc_lr`` (4e-4), the generator at ``lr``
(1e-4), both Adam(0, 0.999) as in the paper. Training runs in the one loop of
:class:`~medsynth.models.torch_family.TorchFamily` (discriminator step, then generator step, on one shared
generator forward per iteration); the discriminator is checkpointed, not saved.

Arrays: images (N, 1, H, W) float32 on the slice intensity scale, labels (N, H, W) uint8 canonical codes; the
working size is ``image_size`` and samples are resized back to the label size.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from medsynth.config import KeyProblem, StrictModel
from medsynth.data.slices import SliceSet
from medsynth.errors import GeometryError
from medsynth.models.base import Sampler, Samples, StyleTransfer
from medsynth.models.gan.common import LabelGAN, LabelGANConfig
from medsynth.models.gan.losses import Adversarial, AdversarialKind, feature_matching, kl_normal, tissue_mean_l1
from medsynth.models.gan.networks import multiscale_discriminator, spade_generator
from medsynth.models.latent.common import one_hot, to_size
from medsynth.utils.seeding import exclusive_global_rng

log = logging.getLogger(__name__)


class SpadeConfig(LabelGANConfig):
    """SPADE keys plus the shared GAN / torch keys (here steps 300, lr 2e-4, disc_lr 8e-4: TTUR).

    CPU-sized defaults, the settings of the shipped ACDC / EMIDEC GAN configs: widths (16, 32, 64, 64), 300 steps
    (17 min on the 2-subject phantom on a 2-core CPU shared with other jobs, measured before the style
    changes; they added about 27 % to a fit's time on the phantom). GPU budgets: widths
    (64, 128, 256, 256), lr 1e-4 / disc_lr 4e-4, image_size 128, tens of thousands of steps."""

    steps: int = Field(300, ge=0)
    channels: tuple[int, ...] = Field(
        (16, 32, 64, 64), min_length=1, description="encoder widths per level (the decoder mirrors them)"
    )
    spade_hidden: int = Field(32, ge=1, description="width of the SPADE modulation layers")
    style_encoder: bool = Field(True, description="VAE style encoder (random / reference-image styles)")
    z_dim: int = Field(16, ge=1, description="style code size")
    style_every_block: bool = Field(
        True, description="the style code also conditions every SPADE block (not only the decoder's first layer)"
    )
    style_tissue_head: bool = Field(
        True, description="per-label gain and shift of the output from the style code (with style_every_block)"
    )
    style_pooling: bool = Field(
        True, description="style encoder on pooled features + intensity quantiles (with style_every_block)"
    )
    disc_channels: int = Field(32, ge=1)
    num_d: int = Field(2, ge=1, description="discriminators of the multi-scale PatchGAN")
    disc_layers: int = Field(2, ge=1, description="layers of the first discriminator (2 at 64-128 px)")
    adversarial: AdversarialKind = Field("hinge", description="hinge (SPADE), vanilla (BCE) or lsgan")
    lambda_fm: float = Field(10.0, ge=0, description="discriminator feature-matching weight")
    lambda_l1: float = Field(10.0, ge=0, description="L1 reconstruction weight")
    lambda_kl: float = Field(0.05, ge=0, description="KL weight of the style encoder")
    lambda_tissue: float = Field(
        10.0, ge=0, description="weight of the L1 between per-label mean intensities of generated and real images"
    )
    lr: float = Field(2e-4, gt=0, description="generator (and encoder) learning rate")
    disc_lr: float | None = Field(8e-4, gt=0, description="discriminator learning rate (TTUR); null = lr")

    @model_validator(mode="after")
    def _check(self) -> SpadeConfig:
        factor = 2 ** len(self.channels)
        if self.image_size % factor:
            raise KeyProblem(
                "image_size", f"image_size: {self.image_size} is not divisible by 2^len(channels)={factor}"
            )
        if self.image_size / 2 ** (self.disc_layers * self.num_d) < 1:
            raise KeyProblem(
                "num_d", f"num_d/disc_layers: {self.num_d} discriminators of up to {self.disc_layers * self.num_d} "
                f"layers do not fit image_size {self.image_size}"
            )  # fmt: skip
        return self


class SpadeModel(LabelGAN, Sampler, StyleTransfer):
    """SPADE generator from label maps; with the style encoder, a random style per seed or the style of a
    reference image (capability ``style``)."""

    family: ClassVar[str] = "spade"
    Config: ClassVar[type[StrictModel]] = SpadeConfig
    conditional: ClassVar[bool] = True
    ema_modules: ClassVar[tuple[str, ...] | None] = ("gen",)

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {
            "image_size": 16, "channels": (4, 8), "spade_hidden": 4, "z_dim": 4, "disc_channels": 4, "num_d": 2,
            "disc_layers": 1, "steps": 3, "batch_size": 2, "progress": False,
        }  # fmt: skip

    def build_modules(self) -> dict[str, nn.Module]:
        cfg = self.config
        z_dim = cfg.z_dim if cfg.style_encoder else None
        style = (cfg.style_every_block, cfg.style_pooling, cfg.style_tissue_head)
        return {
            "gen": spade_generator(self.cond_channels, cfg.image_size, cfg.channels, z_dim, cfg.spade_hidden, *style)
        }

    def _discriminator(self) -> nn.Module:
        cfg = self.config
        n_in = self.cond_channels + 1
        return multiscale_discriminator(n_in, cfg.disc_channels, cfg.num_d, cfg.disc_layers, cfg.image_size)

    # ---- fitting -------------------------------------------------------------------------------------
    @exclusive_global_rng
    def fit(self, train: SliceSet, val: SliceSet | None = None, seed: int = 0) -> dict[str, Any]:
        """Train on the (image, label map) pairs of ``train``."""
        cfg = self.config
        gen, disc = self.begin_gan_fit(train, seed)  # weight init order: generator, then discriminator
        adv = Adversarial(cfg.adversarial)
        zero = torch.zeros((), device=self.device)

        def forward(batch: tuple[torch.Tensor, torch.Tensor], step: int) -> tuple[torch.Tensor, ...]:
            # one generator forward per iteration, shared by both steps (the discriminator sees it detached)
            x, lab = batch
            cond = one_hot(lab, self.cond_channels)
            if cfg.style_encoder:
                fake, mu, logvar = gen(cond, x)  # reparameterised with torch's global RNG (seeded by the loop)
                return x, cond, fake, kl_normal(mu, logvar)
            return x, cond, gen.decode(cond), zero

        def disc_loss(b: tuple[torch.Tensor, ...], step: int) -> tuple[torch.Tensor, dict[str, float]]:
            x, cond, fake, _ = b
            real_out, _ = disc(torch.cat([cond, x], dim=1))
            fake_out, _ = disc(torch.cat([cond, fake.detach()], dim=1))
            loss = adv.d_loss(real_out, fake_out)
            return loss, {"disc": float(loss.detach())}

        def gen_loss(b: tuple[torch.Tensor, ...], step: int) -> tuple[torch.Tensor, dict[str, float]]:
            x, cond, fake, kl = b
            fake_out, fake_feats = disc(torch.cat([cond, fake], dim=1))
            with torch.no_grad():
                _, real_feats = disc(torch.cat([cond, x], dim=1))
            loss_adv = adv.g_loss(fake_out)
            loss_fm = feature_matching(real_feats, fake_feats)
            loss_l1 = F.l1_loss(fake, x)
            loss = loss_adv + cfg.lambda_fm * loss_fm + cfg.lambda_l1 * loss_l1 + cfg.lambda_kl * kl
            loss_tissue = tissue_mean_l1(fake, x, cond)
            loss = loss + cfg.lambda_tissue * loss_tissue
            return loss, {
                "adv": float(loss_adv.detach()), "feature_matching": float(loss_fm.detach()),
                "l1": float(loss_l1.detach()), "kl": float(kl.detach()), "tissue_mean": float(loss_tissue.detach()),
            }  # fmt: skip

        return self.train_gan(gen, disc, (disc_loss, gen_loss), forward, train, val, seed, betas=(0.0, 0.999))

    @torch.no_grad()
    def evaluate(self, slices: SliceSet) -> dict[str, float]:
        """Held-out L1 on the generator's standardised scale: random style (seed 0), and with the style encoder the
        reconstruction from each slice's own style code."""
        self._require_fitted()
        x, _ = self.paired(slices)
        labels = self.condition_maps(self.check_labels(slices.labels), 0, slices.images)
        out = {"val_l1": float((self._run(labels, None, seed=0) - x).abs().mean())}
        if self.config.style_encoder:
            out["val_recon_l1"] = float((self._run(labels, slices.images, seed=0) - x).abs().mean())
        return out

    # ---- state ---------------------------------------------------------------------------------------
    #: the generator of a model saved before the style keys existed (code only at the decoder's first layer)
    LEGACY_STYLE: ClassVar[dict[str, Any]] = {
        "style_every_block": False, "style_pooling": False, "style_tissue_head": False, "lambda_tissue": 0.0,
    }  # fmt: skip

    def extra_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays, meta = super().extra_state()
        return arrays, {**meta, "style_keys": True}

    def load_extra_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        super().load_extra_state(arrays, meta)
        if "style_keys" not in meta:
            # saved before the style keys existed: its weights are the plain SPADENet's, whatever today's defaults
            self.config = self.config.model_copy(update=self.LEGACY_STYLE)

    # ---- contract ------------------------------------------------------------------------------------
    def supports(self, capability: str) -> bool:
        # reference-image styles need the style encoder
        if capability == "style" and not self.config.style_encoder:
            return False
        return super().supports(capability)

    @torch.no_grad()
    def style_codes(self, references: np.ndarray) -> torch.Tensor:
        """Posterior-mean style codes (m, z_dim) of reference images (m, 1, H, W) on the slice scale (resized to
        the working size, standardised like the training images; batch norm in eval mode, so a reference's code
        does not depend on the others)."""
        ref = self.tensor(self.to_gen(to_size(references, self.config.image_size)))
        gen = self.module("gen")
        return torch.cat([gen.encoder(r)[0] for r in ref.split(64)])

    @torch.no_grad()
    def _run(self, labels: np.ndarray, references: np.ndarray | None, seed: int) -> torch.Tensor:
        """Generator output (n, 1, s, s) for condition maps ``labels``; style codes from ``references`` (their
        posterior means; one reference is used for every map) or drawn from N(0, I) on the CPU with ``seed``
        (the same codes on any device)."""
        cfg = self.config
        gen = self.module("gen")
        z = None
        if cfg.style_encoder:
            if references is None:
                g = torch.Generator().manual_seed(seed)
                z = self.tensor(torch.randn((len(labels), cfg.z_dim), generator=g))
            else:
                z = self.style_codes(references)
                if len(z) == 1 and len(labels) > 1:  # one reference for every map: encoded once
                    z = z.expand(len(labels), -1)
        outs, start = [], 0
        for chunk in np.array_split(labels, max(1, int(np.ceil(len(labels) / 64)))):
            zc = z[start : start + len(chunk)] if z is not None else None
            # decode gets z explicitly: SPADENet's own draw without z fails on CPU and ignores the seed
            outs.append(gen.decode(self.cond(chunk), zc))
            start += len(chunk)
        return torch.cat(outs)

    def sample(self, n: int, labels: np.ndarray | None = None, seed: int = 0) -> Samples:
        """One image per label map ``labels`` (n, H, W) → images (n, 1, H, W) on the slice scale, each in a
        random style drawn from ``seed`` (with the style encoder); same seed and state → identical output."""
        self._require_fitted()
        labels = self.check_labels(labels, n)
        if n == 0:
            return Samples(np.zeros((0, 1, *labels.shape[1:]), np.float32), labels)
        maps = self.condition_maps(labels, seed)
        return Samples(images=self.back(self._run(maps, None, seed), labels.shape[1:]), labels=labels)

    def sample_with_style(self, labels: np.ndarray, reference_images: np.ndarray, seed: int = 0) -> Samples:
        """One image per label map ``labels`` (n, H, W) in the appearance of ``reference_images``: (n, 1, H', W')
        one reference per map, or (1, 1, H', W') / (H', W') one reference for every map, on the slice intensity
        scale (any size; resized to the working size). Each map is rendered with its reference's posterior-mean
        style code, so the output is deterministic in the style; ``seed`` draws only the bank partitions of a
        ``surroundings: partition`` model.
        Returns images (n, 1, H, W) on the slice scale and ``labels``. Raises CapabilityError without the style
        encoder, :class:`~medsynth.errors.LabelError` for bad label maps, GeometryError / ValueError
        naming ``reference_images`` for a bad shape / non-finite values."""
        from medsynth.models.base import require

        require(self, "style", "the model was fitted with style_encoder: false")
        self._require_fitted()
        labels = self.check_labels(labels)
        refs = check_references(reference_images, len(labels))
        n = len(labels)
        if n == 0:
            return Samples(np.zeros((0, 1, *labels.shape[1:]), np.float32), labels)
        maps = self.condition_maps(labels, seed)  # with a partition: bank partitions drawn from the seed
        return Samples(images=self.back(self._run(maps, refs, seed), labels.shape[1:]), labels=labels)


def check_references(reference_images: np.ndarray, n: int) -> np.ndarray:
    """``reference_images`` as (m, 1, H', W') float32 with m = ``n`` or 1 (a (H', W') image is one reference).
    A wrong rank or channel count, a count that is neither 1 nor ``n`` or images under 2 × 2 pixels raise
    :class:`~medsynth.errors.GeometryError`, non-finite or non-numeric values ValueError, both naming the
    argument."""
    refs = np.asarray(reference_images)
    if refs.ndim == 2:
        refs = refs[None, None]
    if refs.ndim != 4 or refs.shape[1] != 1:
        raise GeometryError(f"reference_images: expected (n, 1, H, W) or (H, W) images, got shape {refs.shape}")
    if refs.shape[0] not in (1, n):
        raise GeometryError(
            f"reference_images: expected one reference per label map ({n}) or a single one, got {refs.shape[0]}"
        )
    if min(refs.shape[2:]) < 2:
        raise GeometryError(f"reference_images: images of at least 2 x 2 pixels needed, got shape {refs.shape}")
    if not np.issubdtype(refs.dtype, np.number) or not np.isfinite(refs).all():
        raise ValueError("reference_images: NaN, Inf or non-numeric values")
    return refs.astype(np.float32, copy=False)
