"""Normalizing-flow family (Glow / RealNVP style) on 2-D slices, with exact log-likelihood.

The family works at ``image_size`` × ``image_size`` (default 32): slices of any size are downsampled inside the
family by area averaging before fitting/scoring, and samples / score maps are resized back to the native
training / input size (bilinear). Architecture: :class:`~medsynth.models.flow.layers.Glow` — ``levels`` scales of
[squeeze, ``depth`` × (ActNorm, invertible 1×1 conv, affine coupling), split], with Glow's learned prior (``prior``).

Likelihood: intensities y = x − 0.5 (SliceSet scale, p1 → 0, p99 → 1, unbounded) are treated as quantised in
bins of 1/256 and dequantised with uniform noise in training. :func:`bits_per_dim` converts the continuous NLL to
the discrete bits/dim, ``(NLL + D·log 256) / (D·log 2)``; ``fit`` reports it on held-out data.

Anomaly ``score``: slice score = NLL in bits/dim (exact, no dequantisation noise). Pixel map: the per-dimension
prior NLL of every latent (``½ ((z − μ)/σ)² + log σ + ½ log 2π`` under its prior; μ = 0, σ = 1 for
``prior: standard``), placed back on the pixel grid — a latent of level l covers a
2^l × 2^l block of pixels (squeezes are reshapes; 1×1 convolutions and couplings act within a block or its
neighbours), so its NLL is spread evenly over that block. The map sums to the prior part of the NLL; the
log-determinant (a global volume term) is left out. Block-accurate, cheaper and less noisy than input
gradients.

Training, device, seeding, EMA and state come from :class:`~medsynth.models.torch_family.TorchFamily` (one
step ``"loss"`` = dequantised bits/dim; gradient norm clipped at ``grad_clip``, formerly ``clip_grad``, which is
still accepted). Arrays: images (N, 1, H, W) float32 on the SliceSet intensity scale, score maps (N, H, W)
float32 in nats per pixel, slice scores in bits/dim; all returned as CPU numpy whatever ``device``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import AliasChoices, Field, model_validator
from torch import nn

from medsynth.config import KeyProblem, StrictModel
from medsynth.data.slices import SliceSet
from medsynth.models.base import AnomalyScores, Sampler, Samples, Scorer
from medsynth.models.flow.layers import Glow
from medsynth.models.latent.common import check_slices, maps_to_size, to_size
from medsynth.models.torch_family import TorchConfig, TorchFamily
from medsynth.utils.seeding import exclusive_global_rng

log = logging.getLogger(__name__)

BINS = 256.0
OFFSET = 0.5  # centre the [0, 1] bulk of the intensities


def bits_per_dim(nll_nats: torch.Tensor | np.ndarray, dims: int) -> torch.Tensor | np.ndarray:
    """Continuous NLL (nats per slice) → discrete bits/dim for data quantised in 1/256 bins."""
    return (nll_nats + dims * math.log(BINS)) / (dims * math.log(2))


class FlowConfig(TorchConfig):
    """Glow keys plus the shared torch keys (here steps 1500, batch_size 32, lr 5e-4, grad_clip 50).

    CPU-sized default, chosen on the 2-subject phantom with :mod:`medsynth.evaluation.recognisable`: 32 px,
    1500 steps and Glow's learned prior (split-off halves conditioned on the half that goes on, a learned
    coarsest prior) pass the check at temperature 0.5-0.8 (fit ~8 min at one thread beside three other jobs):
    a body outline and chest wall with a faint, blurred heart. Scoring with it (EMIDEC, the anomaly flow's split):
    case AUROC 0.90, the n-SD(3) rule's, so it does not beat that rule. The earlier default, 64 px and 400 steps with
    standard-normal latents, gave blotchy noise without a heart at every temperature; so did the learned prior at
    that budget, and doubling the steps to 3000 did not make the heart clearer. The shipped EMIDEC anomaly
    configs keep the earlier setting, which they measured and which scores better there (case AUROC 0.96, 1.00
    restricted to the LV wall): ``image_size: 64, steps: 400, prior: standard``."""

    steps: int = Field(1500, ge=0, description="training iterations")
    image_size: int = Field(32, ge=2, description="working size (square); slices are downsampled to it")
    levels: int = Field(3, ge=1, description="multi-scale levels (squeeze + steps + split)")
    depth: int = Field(4, ge=1, description="flow steps per level")
    hidden: int = Field(64, ge=2, description="channels of the coupling networks")
    lr: float = Field(5e-4, gt=0)
    grad_clip: float | None = Field(
        50.0, gt=0, validation_alias=AliasChoices("grad_clip", "clip_grad"), description="max gradient norm"
    )
    temperature: float = Field(0.8, gt=0, description="latent std when sampling (Glow's reduced temperature)")
    prior: Literal["learned", "standard"] = Field(
        "learned", description="latents' prior: Glow's learned split / top prior, or standard normal"
    )

    @model_validator(mode="after")
    def _check(self) -> FlowConfig:
        if self.image_size % (2**self.levels):
            raise KeyProblem("image_size", f"image_size: {self.image_size} is not divisible by 2**levels")
        return self


class FlowModel(TorchFamily, Sampler, Scorer):
    """Glow-style normalizing flow; unconditional; exact likelihood; scores by NLL."""

    family: ClassVar[str] = "flow"
    Config: ClassVar[type[StrictModel]] = FlowConfig
    conditional: ClassVar[bool] = False

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"image_size": 16, "levels": 2, "depth": 1, "hidden": 8, "steps": 3, "batch_size": 4, "progress": False}

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.native: tuple[int, int] = (self.config.image_size, self.config.image_size)
        #: (min, max) of the centred working-size training intensities: samples are clamped to it
        self.value_range: tuple[float, float] | None = None

    @property
    def net(self) -> Glow | None:
        """The flow as used now: trained weights while training, EMA weights after (when enabled)."""
        return self.module("net") if self.nets else None

    def _build(self, seed: int = 0) -> Glow:
        cfg = self.config
        return Glow(
            1, cfg.image_size, cfg.levels, cfg.depth, cfg.hidden, seed=seed, learned_prior=cfg.prior == "learned"
        )

    def build_modules(self) -> dict[str, nn.Module]:
        return {"net": self._build()}

    def _prep(self, slices: SliceSet) -> torch.Tensor:
        """Centred working-size slices (N, 1, s, s) on the device."""
        return self.tensor(to_size(slices.images, self.config.image_size)) - OFFSET

    def nll(self, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Exact continuous NLL (nats per slice) of centred working-size slices y (N, 1, s, s), and each latent's
        elementwise prior NLL (nats; the latents' shapes)."""
        _, logdet, nlls = self.net.encode(y)
        return sum(e.flatten(1).sum(1) for e in nlls) - logdet, nlls

    # ---- fitting -------------------------------------------------------------------------------------
    @exclusive_global_rng
    def fit(self, train: SliceSet, val: SliceSet | None = None, seed: int = 0) -> dict[str, Any]:
        check_slices(train, self.family)
        cfg = self.config
        self.begin_fit(seed)
        self.set_modules({"net": self._build(seed)})
        self.native = train.image_size
        data = self._prep(train)
        self.value_range = (float(data.min()), float(data.max()))
        dims = data[0].numel()
        # Data-dependent ActNorm init on a fixed batch (before the optimiser touches anything).
        net = self.nets["net"]
        net.train()
        with torch.no_grad():
            net(data[: min(len(data), 256)])

        def loss_fn(batch: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
            y = batch + torch.rand_like(batch) / BINS  # uniform dequantisation
            nll, _ = self.nll(y)
            bpd = bits_per_dim(nll, dims).mean()
            return bpd, {"bits_per_dim": float(bpd.detach())}

        t0 = time.perf_counter()
        res = self.train_steps([self.make_step("loss", net.parameters(), loss_fn, [net])], data, seed)
        elapsed = time.perf_counter() - t0
        self.fitted = True
        report: dict[str, Any] = {
            **self.fit_report(res, len(train), elapsed),
            "image_size": cfg.image_size,
            "train_bits_per_dim": float(np.mean(self.bits_per_dim(train))),
        }
        if val is not None and len(val):
            report["val_bits_per_dim"] = float(np.mean(self.bits_per_dim(val)))
        return report

    @torch.no_grad()
    def bits_per_dim(self, slices: SliceSet) -> np.ndarray:
        """Exact held-out NLL per slice in bits/dim (at the working size)."""
        self._require_fitted()
        y = self._prep(slices)
        return np.concatenate([self.numpy(bits_per_dim(self.nll(b)[0], b[0].numel())) for b in y.split(64)])

    # ---- contract ------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, labels: np.ndarray | None = None, seed: int = 0) -> Samples:
        self._require_fitted()
        if n < 0:
            raise ValueError(f"n: must be >= 0, got {n}")
        if n == 0:
            return Samples(images=np.zeros((0, 1, *self.native), np.float32), labels=None)
        g = torch.Generator().manual_seed(seed)
        shapes = self.net.latent_shapes(1, self.config.image_size)
        # drawn on the CPU generator, then moved: the same latents on any device
        eps = [self.tensor(torch.randn((n, *s), generator=g)) for s in shapes]
        x = self.net.sample(eps, self.config.temperature)
        if self.value_range is not None:
            # an inverse coupling divides by its sigmoid scale, so a draw far in the tails can overflow to inf /
            # NaN: such pixels (and any beyond the training range) are clamped to the training range
            lo, hi = self.value_range
            bad = int((~torch.isfinite(x)).sum())
            if bad:
                log.warning("flow: %d non-finite sample pixels clamped to the training range", bad)
            x = torch.nan_to_num(x, nan=lo, posinf=hi, neginf=lo).clamp(lo, hi)
        x = self.numpy((x + OFFSET)[:, 0])
        return Samples(images=maps_to_size(x, self.native)[:, None].astype(np.float32), labels=None)

    @torch.no_grad()
    def score(self, slices: SliceSet) -> AnomalyScores:
        """Slice score = exact NLL (bits/dim); pixel map = latent prior NLL per pixel (see module docstring)."""
        self._require_fitted()
        y = self._prep(slices)
        s = self.config.image_size
        scores, maps = [], []
        for b in y.split(64):
            nll, nlls = self.nll(b)
            scores.append(self.numpy(bits_per_dim(nll, b[0].numel())))
            m = torch.zeros(len(b), 1, s, s, device=b.device)
            for e in nlls:
                f = s // e.shape[-1]
                m += F.interpolate(e.sum(1, keepdim=True), scale_factor=f, mode="nearest") / (f * f)
            maps.append(self.numpy(m[:, 0]))
        return AnomalyScores(
            slice_scores=np.concatenate(scores).astype(np.float64),
            pixel_maps=maps_to_size(np.concatenate(maps), slices.image_size),
        )

    # ---- state beside the weights (``net.*`` / ``ema.net.*`` come from TorchFamily) -----------------------
    def extra_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        meta: dict[str, Any] = {"native": list(self.native), "prior_key": True}
        if self.value_range is not None:
            meta["value_range"] = list(self.value_range)
        return {}, meta

    def load_extra_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.native = (int(meta["native"][0]), int(meta["native"][1]))
        vr = meta.get("value_range")
        self.value_range = (float(vr[0]), float(vr[1])) if vr else None
        if "prior_key" not in meta:
            # saved before the prior key existed: its latents are standard normal, whatever today's default
            self.config = self.config.model_copy(update={"prior": "standard"})

    def set_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        if arrays and not any(k.startswith("net.") for k in arrays):
            arrays = {f"net.{k}": v for k, v in arrays.items()}  # saved before TorchFamily: unprefixed Glow keys
        super().set_state(arrays, meta)
