"""CycleGAN: unpaired image-to-image translation between two domains of a slice set (capability ``translate``).

Domains are values of one manifest column (``domain_key``: ``modality`` for cine → LGE appearance, ``vendor``
for scanner A → B, ``dataset``, …); ``source`` → ``target`` is the forward direction. Two ResNet generators
(:mod:`medsynth.models.translation.networks`) and two MONAI ``PatchDiscriminator`` s are trained with the
least-squares adversarial loss (MONAI ``PatchAdversarialLoss``), the cycle-consistency L1 loss (λ_cycle) and the
identity L1 loss (λ_identity · λ_cycle) of Zhu et al. (ICCV 2017). Differences from the paper, for CPU budgets:
small widths, no history pool of generated images, constant learning rate; the discriminators take their step
before the generators within each iteration (on the same generated batch, detached).

Slices are resized to ``image_size`` × ``image_size`` for training and translation and the output is resized
back to the input size, so fine detail above the working resolution is lost; raise ``image_size`` on a GPU.
Arrays: images (N, 1, H, W) float32 on the slice intensity scale. Geometry is kept by the cycle loss, not
guaranteed: the translate flow measures it with a segmentation-consistency check.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import PatchDiscriminator
from pydantic import Field, model_validator
from torch import nn

from medsynth.config import KeyProblem, StrictModel
from medsynth.data.slices import SliceSet
from medsynth.errors import MedsynthError
from medsynth.models.base import GenerativeModel, TranslationDomains, Translator
from medsynth.models.latent.common import check_slices, maps_to_size, to_size
from medsynth.models.training import batch_indices, train_loop
from medsynth.models.translation.networks import ResnetGenerator
from medsynth.utils.seeding import exclusive_global_rng, seed_everything

log = logging.getLogger(__name__)


class CycleGANConfig(StrictModel):
    domain_key: str = Field("modality", description="slice metadata column whose values name the domains")
    source: str = Field("cine", description="domain translated from (forward direction)")
    target: str = Field("lge", description="domain translated to")
    image_size: int = Field(64, ge=8, description="working size (square); divisible by 2^(len(channels)-1)")
    channels: tuple[int, ...] = Field((16, 32, 64), min_length=1)
    n_res_blocks: int = Field(4, ge=0)
    disc_channels: int = Field(16, ge=1, description="width of the first PatchGAN layer")
    disc_layers: int = Field(3, ge=1)
    steps: int = Field(2000, ge=0)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-4, gt=0)
    lambda_cycle: float = Field(10.0, ge=0)
    lambda_identity: float = Field(0.5, ge=0, description="identity loss weight, relative to lambda_cycle")
    checkpoint_dir: str | None = None
    checkpoint_every: int = Field(200, ge=0)
    progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> CycleGANConfig:
        factor = 2 ** (len(self.channels) - 1)
        if self.image_size % factor:
            raise KeyProblem(
                "image_size", f"image_size: {self.image_size} is not divisible by 2^(len(channels)-1)={factor}"
            )
        if self.source.strip().lower() == self.target.strip().lower():
            raise KeyProblem("target", f"source/target: the two domains must differ (both {self.source!r})")
        return self


def _domain_values(slices: SliceSet, key: str) -> np.ndarray:
    if key not in slices.meta.columns:
        raise MedsynthError(f"domain_key: slice metadata has no column {key!r}; columns: {list(slices.meta.columns)}")
    return slices.meta[key].astype(str).str.strip().str.lower().to_numpy()


class CycleGANModel(GenerativeModel, Translator):
    """Unpaired translation ``source`` ↔ ``target``; ``translate`` maps source-domain slices to the target."""

    family: ClassVar[str] = "cyclegan"
    Config: ClassVar[type[StrictModel]] = CycleGANConfig
    conditional: ClassVar[bool] = False

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        # the contract test's tiny slices carry two pathologies, which serve as the two domains
        return {
            "domain_key": "pathology", "source": "normal", "target": "infarct", "image_size": 16,
            "channels": (4, 8), "n_res_blocks": 1, "disc_channels": 4, "disc_layers": 1, "steps": 3,
            "batch_size": 2, "progress": False,
        }  # fmt: skip

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.g_ab: nn.Module | None = None  # source → target
        self.g_ba: nn.Module | None = None  # target → source

    def _generator(self) -> nn.Module:
        return ResnetGenerator(tuple(self.config.channels), self.config.n_res_blocks)

    def _discriminator(self) -> nn.Module:
        cfg = self.config
        return PatchDiscriminator(
            spatial_dims=2, channels=cfg.disc_channels, in_channels=1, num_layers_d=cfg.disc_layers, norm="INSTANCE"
        )

    def domains(self, slices: SliceSet) -> tuple[np.ndarray, np.ndarray]:
        """Boolean masks (N,) of the source- and target-domain slices of ``slices``."""
        values = _domain_values(slices, self.config.domain_key)
        return values == self.config.source.strip().lower(), values == self.config.target.strip().lower()

    def translation_domains(self, slices: SliceSet, direction: str = "forward") -> TranslationDomains:
        cfg = self.config
        src, dst = cfg.source.strip().lower(), cfg.target.strip().lower()
        is_a, is_b = self.domains(slices)
        if direction == "forward":
            return TranslationDomains(cfg.domain_key, src, dst, is_a)
        if direction == "backward":
            return TranslationDomains(cfg.domain_key, dst, src, is_b)
        raise ValueError(f"direction: 'forward' or 'backward', got {direction!r}")

    # ---- fitting -------------------------------------------------------------------------------------
    @exclusive_global_rng
    def fit(self, train: SliceSet, val: SliceSet | None = None, seed: int = 0) -> dict[str, Any]:
        """Train on the source- and target-domain slices of ``train`` (unpaired; other domains ignored)."""
        check_slices(train, self.family)
        cfg = self.config
        is_a, is_b = self.domains(train)
        if not is_a.any() or not is_b.any():
            found = sorted(set(_domain_values(train, cfg.domain_key)))
            raise MedsynthError(
                f"{self.family}: need slices of both domains {cfg.source!r} and {cfg.target!r} in column "
                f"{cfg.domain_key!r}; found {found}"
            )
        seed_everything(seed)
        self.g_ab, self.g_ba = self._generator(), self._generator()
        d_a, d_b = self._discriminator(), self._discriminator()
        nets = nn.ModuleDict({"g_ab": self.g_ab, "g_ba": self.g_ba, "d_a": d_a, "d_b": d_b})
        data_a = torch.from_numpy(to_size(train.images[is_a], cfg.image_size))
        data_b = torch.from_numpy(to_size(train.images[is_b], cfg.image_size))
        betas = (0.5, 0.999)
        opt_g = torch.optim.Adam(itertools.chain(self.g_ab.parameters(), self.g_ba.parameters()), cfg.lr, betas=betas)
        opt_d = torch.optim.Adam(itertools.chain(d_a.parameters(), d_b.parameters()), cfg.lr, betas=betas)
        adv = PatchAdversarialLoss(criterion="least_squares", no_activation_leastsq=True)
        discs = (d_a, d_b)

        def loss_fn(a: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
            # target-domain batch: seeded by (seed, step) like the source batch, so a resumed run matches
            b = data_b[torch.from_numpy(batch_indices(len(data_b), cfg.batch_size, step, seed + 1))]
            fake_b, fake_a = self.g_ab(a), self.g_ba(b)
            # discriminators first, on the detached fakes (their step must precede the generator loss's
            # forward through them, or backward would see weights modified in place)
            for d in discs:
                d.requires_grad_(True)
            loss_d = 0.5 * (
                adv(d_b(b)[-1], target_is_real=True, for_discriminator=True)
                + adv(d_b(fake_b.detach())[-1], target_is_real=False, for_discriminator=True)
                + adv(d_a(a)[-1], target_is_real=True, for_discriminator=True)
                + adv(d_a(fake_a.detach())[-1], target_is_real=False, for_discriminator=True)
            )
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            for d in discs:
                d.requires_grad_(False)
            loss_adv = adv(d_b(fake_b)[-1], target_is_real=True, for_discriminator=False) + adv(
                d_a(fake_a)[-1], target_is_real=True, for_discriminator=False
            )
            loss_cyc = F.l1_loss(self.g_ba(fake_b), a) + F.l1_loss(self.g_ab(fake_a), b)
            loss = loss_adv + cfg.lambda_cycle * loss_cyc
            loss_idt = torch.zeros(())
            if cfg.lambda_identity > 0:
                loss_idt = F.l1_loss(self.g_ab(b), b) + F.l1_loss(self.g_ba(a), a)
                loss = loss + cfg.lambda_identity * cfg.lambda_cycle * loss_idt
            return loss, {
                "adv": float(loss_adv.detach()),
                "cycle_l1": float(loss_cyc.detach()),
                "identity_l1": float(loss_idt.detach()),
                "disc": float(loss_d.detach()),
            }

        t0 = time.perf_counter()
        res = train_loop(
            nets, opt_g, data_a, loss_fn, cfg.steps, cfg.batch_size, seed=seed, checkpoint_dir=cfg.checkpoint_dir,
            checkpoint_every=cfg.checkpoint_every, desc=f"fit {self.family}", progress=cfg.progress,
            extra_state={"opt_d": opt_d},
        )  # fmt: skip
        elapsed = time.perf_counter() - t0
        nets.eval()
        self.fitted = True
        report: dict[str, Any] = {
            "family": self.family,
            "n_source": int(is_a.sum()),
            "n_target": int(is_b.sum()),
            **res.report(int(is_a.sum()), cfg.batch_size, elapsed),
            **{f"last_{k}": v for k, v in res.logs.items()},
        }
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
                x = torch.from_numpy(to_size(slices.images[mask], self.config.image_size))
                rec = torch.cat([back(there(b)) for b in x.split(64)])
                out[f"val_cycle_l1_{name}"] = float((rec - x).abs().mean())
        return out

    # ---- contract ------------------------------------------------------------------------------------
    @torch.no_grad()
    def translate(self, images: np.ndarray, seed: int = 0, direction: str = "forward") -> np.ndarray:
        """Source-domain images (N, 1, H, W) → target appearance (``direction="backward"``: target → source),
        returned at the input size. Deterministic (no sampling; ``seed`` is unused)."""
        self._require_fitted()
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"images: expected (N, 1, H, W), got {images.shape}")
        if not np.all(np.isfinite(images)):
            raise ValueError("images: contain NaN/Inf")
        if direction not in ("forward", "backward"):
            raise ValueError(f"direction: 'forward' or 'backward', got {direction!r}")
        if len(images) == 0:
            return images.copy()
        net = self.g_ab if direction == "forward" else self.g_ba
        x = torch.from_numpy(to_size(images, self.config.image_size))
        y = torch.cat([net(b) for b in x.split(64)]).numpy()
        return maps_to_size(y[:, 0], images.shape[2:])[:, None]

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        self._require_fitted()
        arrays = {}
        for prefix, net in (("g_ab.", self.g_ab), ("g_ba.", self.g_ba)):
            arrays.update({prefix + k: v.detach().cpu().numpy() for k, v in net.state_dict().items()})
        return arrays, {}

    def set_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.g_ab, self.g_ba = self._generator(), self._generator()
        for prefix, net in (("g_ab.", self.g_ab), ("g_ba.", self.g_ba)):
            n = len(prefix)
            net.load_state_dict({k[n:]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k[:n] == prefix})
            net.eval()
        self.fitted = True
