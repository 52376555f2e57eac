"""Autoencoder families: AE, denoising AE, VAE / β-VAE and a label-conditioned VAE.

All work on slices resized to ``image_size`` × ``image_size`` (area averaging; default 64 to stay CPU-feasible);
outputs (samples, score maps) are resized back to the native training / input size.

- **AE / DAE / VAE** use MONAI's ``VarAutoEncoder`` (strided conv encoder → dense latent → transposed-conv
  decoder; ``use_sigmoid=False`` because SliceSet intensities are not bounded by 1 — scar is brighter than the
  99th percentile). The AE and DAE use the posterior-mean head only (deterministic code, no KL); the VAE adds the
  reparameterisation trick with our own seeded noise and the analytic Gaussian KL.
- **DAE** corrupts inputs with *coarse* Gaussian noise (drawn at ``noise_res`` × ``noise_res`` and upsampled),
  which Kascenas et al. (MIDL 2022) found better than pixel noise for anomaly detection; ``noise_res: null``
  gives i.i.d. pixel noise.
- **cVAE**: MONAI's VarAutoEncoder has no way to feed the condition to the decoder, so the conditional net is a
  small custom encoder/decoder built from MONAI ``Convolution`` blocks: the encoder sees image + one-hot label
  map, the decoder upsamples ``z`` and concatenates the one-hot label map at every scale (SPADE-lite). It
  generates an image for a given label map (``conditional = True``). With ``surroundings: partition`` the
  label map is the heart labels plus the surroundings partition (:mod:`medsynth.models.conditioning`).

Loss: reconstruction NLL of a fixed-scale decoder — L2: Gaussian with σ = ``recon_scale``; L1: Laplace with
b = ``recon_scale`` — plus ``β``·KL (VAE/cVAE), with β linearly annealed from 0 over ``kl_anneal_steps``; the
sum over pixels is divided by the pixel count for a well-scaled optimiser. With β = 1 the (negated) loss is the
ELBO, which ``fit`` reports on held-out data in nats per slice and bits/dim (1/256 quantisation as the flow).

Unconditional sampling: AE and DAE draw ``z`` from a full-covariance Gaussian fitted to the training codes (an AE
has no prior of its own); the VAE by default too (``sample_from: aggregate``: the moment-matched aggregate
posterior, see :class:`VAEConfig` for why N(0, I) decodes to noise on small training sets), or ``z ~ N(0, I)``
with ``sample_from: prior``; the cVAE likewise.

Units of the logged losses: ``recon_nll`` is −log p(x | z) of the fixed-σ decoder in **nats per slice**, summed
over the ``image_size``² working pixels of a continuous density. It is negative whenever the reconstruction error
is well below σ = ``recon_scale`` (each pixel contributes log(σ√(2π)) + err²/(2σ²), and log(0.1·√(2π)) = −1.38
nats): e.g. −5367 at 64² pixels and σ 0.1 is a reconstruction RMSE of ≈ 0.038, a good fit. ``fit`` also reports
``last_recon_rmse`` (L2; ``last_recon_mae`` for L1; slice intensity units) and the bits/dim of the held-out ELBO.

Training, device, seeding, EMA and state come from :class:`~medsynth.models.torch_family.TorchFamily` (one
optimiser step ``"loss"`` per iteration; the report's ``loss_*`` are that loss per pixel). With ``ema_decay`` set,
sampling, scoring and the AE code Gaussian use the EMA weights.

Arrays: images (N, 1, H, W) float32 on the SliceSet intensity scale (p1 → 0, p99 → 1); labels (N, H, W) uint8
canonical codes; score maps (N, H, W) float32 in intensity units; all returned as CPU numpy whatever ``device``.

Anomaly ``score``: reconstruction error. Pixel map ``|x − x̂|`` (x̂ from the posterior mean); slice score the mean
squared error over the whole slice. Maps are not restricted to the myocardium here; the evaluation
(:mod:`medsynth.evaluation.anomaly`) restricts pixel metrics to the LV wall. The cVAE reconstructs from the
slice's label map with scar/MVO relabelled as healthy myocardium — the healthy counterpart the model expects.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.nets import VarAutoEncoder
from pydantic import Field, model_validator
from torch import nn

from medsynth.config import KeyProblem, StrictModel
from medsynth.data.slices import SliceSet
from medsynth.labels import MVO, MYO, SCAR
from medsynth.models.base import AnomalyScores, Sampler, Samples, Scorer
from medsynth.models.conditioning import LabelCondition, SurroundingsKeys
from medsynth.models.latent.common import labels_to_size, maps_to_size, to_size, validate_label_maps
from medsynth.models.torch_family import TorchConfig, TorchFamily
from medsynth.utils.seeding import exclusive_global_rng

log = logging.getLogger(__name__)
LOG_BIN = math.log(256.0)


class AEConfig(TorchConfig):
    """AE keys plus the shared torch keys (here steps 300, batch_size 32, lr 1e-3; device, EMA, schedule, …).

    CPU-sized default: 300 steps (~1 min on the 2-subject phantom on a 2-core CPU; 40 slices are seen ~240 times).
    On real data raise ``steps`` in the run config (e.g. 800–1500 on EMIDEC; thousands on a GPU)."""

    steps: int = Field(300, ge=0, description="training iterations")
    image_size: int = Field(64, ge=8, description="working size (square), must be divisible by prod(strides)")
    latent_size: int = Field(32, ge=1)
    channels: tuple[int, ...] = Field((16, 32, 64), min_length=1)
    strides: tuple[int, ...] = Field((2, 2, 2), min_length=1)
    recon_loss: Literal["l2", "l1"] = "l2"
    recon_scale: float = Field(0.1, gt=0, description="σ (L2, Gaussian) or b (L1, Laplace) of the decoder")

    @model_validator(mode="after")
    def _check(self) -> AEConfig:
        if len(self.channels) != len(self.strides):
            lengths = f"{len(self.channels)} vs {len(self.strides)}"
            raise KeyProblem("strides", f"channels/strides: lengths differ ({lengths})")
        factor = int(np.prod(self.strides))
        if self.image_size % factor:
            raise KeyProblem("image_size", f"image_size: {self.image_size} is not divisible by prod(strides)={factor}")
        return self


class DAEConfig(AEConfig):
    noise_std: float = Field(0.2, ge=0, description="std of the input corruption")
    noise_res: int | None = Field(16, ge=1, description="grid of the coarse noise; null = per-pixel noise")


class VAEConfig(AEConfig):
    """VAE keys. ``sample_from: aggregate`` (default) draws codes from a Gaussian fitted to the training
    posteriors (mean and covariance of the posterior means plus the mean posterior variance: the moment-matched
    aggregate posterior, "ex-post density estimation", Ghosh et al. ICLR 2020); ``prior`` draws z ~ N(0, I).

    Why not the prior by default: on small training sets (the phantom, a few patients) the fitted aggregate
    posterior stays far from N(0, I). Measured on 2 phantom subjects: posterior means centred up to ±1.8 per
    dimension with posterior SDs of ~0.07, so prior draws fall between the training codes, where the decoder
    was never trained, and decode to blotchy noise without a heart, while the aggregate draws decode to hearts."""

    beta: float = Field(1.0, ge=0, description="KL weight (β-VAE when ≠ 1)")
    kl_anneal_steps: int = Field(0, ge=0, description="linear β warm-up from 0 over this many steps")
    sample_from: Literal["aggregate", "prior"] = Field(
        "aggregate", description="codes for sampling: Gaussian fit of the training posteriors, or N(0, I)"
    )


class CVAEConfig(VAEConfig, SurroundingsKeys):
    """cVAE keys: as the VAE (codes from the aggregate posterior by default: measured on 2 phantom subjects,
    N(0, I) codes gave the right heart from the label map inside blotchy noise, with a weak blood–myocardium
    contrast), here with batch_size 16: its decoder sees the label map at every scale, so a step costs ~2× the
    VAE's."""

    batch_size: int = Field(16, ge=1)


class CondVAENet(nn.Module):
    """Conditional VAE on (1, s, s) images and (K, s, s) one-hot label maps; the decoder sees the labels at
    every scale."""

    def __init__(self, size: int, latent: int, channels: tuple[int, ...], strides: tuple[int, ...], k: int) -> None:
        super().__init__()
        self.k, self.channels = k, channels
        self.final = size // int(np.prod(strides))
        enc, c_in = [], 1 + k
        for c, s in zip(channels, strides, strict=True):
            enc.append(Convolution(2, c_in, c, strides=s, kernel_size=3, act="PRELU", norm="INSTANCE"))
            c_in = c
        self.encoder = nn.Sequential(*enc)
        flat = channels[-1] * self.final**2
        self.mu, self.logvar = nn.Linear(flat, latent), nn.Linear(flat, latent)
        self.from_z = nn.Linear(latent, flat)
        self.ups = nn.ModuleList()
        rev = list(channels[::-1]) + [channels[0]]
        for i, s in enumerate(strides[::-1]):
            self.ups.append(
                nn.Sequential(
                    Convolution(2, rev[i] + k, rev[i + 1], strides=s, kernel_size=3, is_transposed=True, act="PRELU"),
                    Convolution(2, rev[i + 1], rev[i + 1], kernel_size=3, act="PRELU", norm="INSTANCE"),
                )
            )
        self.head = Convolution(2, rev[-1] + k, 1, kernel_size=3, conv_only=True)

    def encode_forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(torch.cat([x, cond], dim=1)).flatten(1)
        return self.mu(h), self.logvar(h)

    def decode_forward(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.from_z(z)).view(len(z), self.channels[-1], self.final, self.final)
        for up in self.ups:
            h = up(torch.cat([h, F.interpolate(cond, size=h.shape[-2:], mode="area")], dim=1))
        return self.head(torch.cat([h, cond], dim=1))


class AEModel(TorchFamily, Sampler, Scorer):
    """Deterministic autoencoder (MONAI VarAutoEncoder, mean head only); scores by reconstruction error."""

    family: ClassVar[str] = "ae"
    Config: ClassVar[type[StrictModel]] = AEConfig
    conditional: ClassVar[bool] = False
    variational: ClassVar[bool] = False
    ema_modules: ClassVar[tuple[str, ...] | None] = ("net",)

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {
            "image_size": 16, "latent_size": 4, "channels": (4, 8), "strides": (2, 2), "steps": 3, "batch_size": 4,
            "progress": False,
        }  # fmt: skip

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        cfg = self.config
        self.native: tuple[int, int] = (cfg.image_size, cfg.image_size)
        self.code_mean: np.ndarray | None = None  # AE/DAE: Gaussian over training codes
        self.code_chol: np.ndarray | None = None

    # ---- network -------------------------------------------------------------------------------------
    @property
    def net(self) -> nn.Module | None:
        """The network as used now: trained weights while training, EMA weights after (when enabled)."""
        return self.module("net") if self.nets else None

    def build_modules(self) -> dict[str, nn.Module]:
        return {"net": self._build()}

    def _build(self) -> nn.Module:
        cfg = self.config
        return VarAutoEncoder(
            spatial_dims=2,
            in_shape=(1, cfg.image_size, cfg.image_size),
            out_channels=1,
            latent_size=cfg.latent_size,
            channels=cfg.channels,
            strides=cfg.strides,
            use_sigmoid=False,
        )

    def _inputs(self, slices: SliceSet) -> torch.Tensor:
        """(N, 1[+1], s, s) tensor on the device; the cVAE appends its label map as a second channel."""
        return self.tensor(to_size(slices.images, self.config.image_size))

    def _fit_inputs(self, train: SliceSet, seed: int) -> torch.Tensor:
        """The training tensor (:meth:`_inputs` of ``train``; the cVAE's carries the training condition maps)."""
        return self._inputs(train)

    def _encode(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.encode_forward(batch[:, :1])

    def _decode(self, z: torch.Tensor, batch: torch.Tensor | None) -> torch.Tensor:
        return self.net.decode_forward(z, use_sigmoid=False)

    def _corrupt(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _recon_nll(self, x: torch.Tensor, xhat: torch.Tensor) -> torch.Tensor:
        """Per-slice reconstruction NLL (nats) of the fixed-scale Gaussian (L2) / Laplace (L1) decoder."""
        b = self.config.recon_scale
        d = x[0].numel()
        if self.config.recon_loss == "l2":
            return ((x - xhat) ** 2).flatten(1).sum(1) / (2 * b * b) + d * (math.log(b) + 0.5 * math.log(2 * math.pi))
        return (x - xhat).abs().flatten(1).sum(1) / b + d * math.log(2 * b)

    # ---- fitting -------------------------------------------------------------------------------------
    @exclusive_global_rng
    def fit(self, train: SliceSet, val: SliceSet | None = None, seed: int = 0) -> dict[str, Any]:
        cfg = self.config
        self.begin_slice_fit(train, seed)
        data = self._fit_inputs(train, seed)
        d = cfg.image_size**2

        def loss_fn(batch: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
            x = batch[:, :1]
            inp = torch.cat([self._corrupt(x), batch[:, 1:]], dim=1)
            mu, logvar = self._encode(inp)
            if self.variational:
                z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
                kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
                beta = cfg.beta * (min(1.0, (step + 1) / cfg.kl_anneal_steps) if cfg.kl_anneal_steps else 1.0)
            else:
                z, kl, beta = mu, torch.zeros(len(mu), device=mu.device), 0.0
            rec = self._recon_nll(x, self._decode(z, batch))
            loss = (rec + beta * kl).mean() / d
            return loss, {"recon_nll": float(rec.detach().mean()), "kl": float(kl.detach().mean()), "beta": beta}

        net = self.nets["net"]
        step = self.make_step("loss", net.parameters(), loss_fn, [net])
        t0 = time.perf_counter()
        res = self.train_steps([step], data, seed)
        elapsed = time.perf_counter() - t0
        rmse = self._rmse_from_nll(res.logs.get("recon_nll"), d)
        if rmse is not None:
            log.info(
                "%s: last recon_nll %.1f nats per slice (−log p(x|z), continuous density over %d pixels, "
                "scale %g): reconstruction %s %.4f", self.family, res.logs["recon_nll"], d, cfg.recon_scale,
                "RMSE" if cfg.recon_loss == "l2" else "MAE", rmse,
            )  # fmt: skip
        if self._samples_codes:
            self._fit_code_gaussian(data)
        self.fitted = True
        report = self.fit_report(res, len(train), elapsed)
        if rmse is not None:
            report["last_recon_rmse" if cfg.recon_loss == "l2" else "last_recon_mae"] = rmse
            report["recon_nll_unit"] = "nats per slice (continuous density summed over image_size² pixels)"
        if val is not None and len(val):
            report.update(self.evaluate(val))
        return report

    def _rmse_from_nll(self, nll: float | None, d: int) -> float | None:
        """Invert the per-slice NLL of :meth:`_recon_nll` to an RMSE (L2) or mean absolute error (L1)."""
        if nll is None:
            return None
        b = self.config.recon_scale
        if self.config.recon_loss == "l2":
            sq = (nll - d * (math.log(b) + 0.5 * math.log(2 * math.pi))) * 2 * b * b / d
            return float(math.sqrt(max(sq, 0.0)))
        return float(max((nll - d * math.log(2 * b)) * b / d, 0.0))

    @property
    def _samples_codes(self) -> bool:
        """Whether sampling draws from a Gaussian over the training codes (AE / DAE; VAE with
        ``sample_from: aggregate``) rather than from N(0, I)."""
        return not self.variational or self.config.sample_from == "aggregate"

    def _fit_code_gaussian(self, data: torch.Tensor) -> None:
        """Full-covariance Gaussian over the training codes: the posterior means; for a VAE plus the mean
        posterior variance on the diagonal (the moments of the aggregate posterior)."""
        mu, var = self._codes(data)
        codes = mu.astype(np.float64)
        self.code_mean = codes.mean(0).astype(np.float32)
        cov = np.cov(codes, rowvar=False).reshape(len(self.code_mean), -1) if len(codes) > 1 else np.eye(1)
        if self.variational:
            cov = cov + np.diag(var.astype(np.float64).mean(0))
        cov = cov + 1e-4 * np.eye(len(cov))
        self.code_chol = np.linalg.cholesky(cov).astype(np.float32)

    @torch.no_grad()
    def _codes(self, data: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Posterior means (N, latent) and variances (N, latent; zeros for a deterministic AE)."""
        mus, variances = [], []
        for b in data.split(64):
            mu, logvar = self._encode(b)
            mus.append(mu)
            variances.append(logvar.exp() if self.variational else torch.zeros_like(mu))
        return self.numpy(torch.cat(mus)), self.numpy(torch.cat(variances))

    @torch.no_grad()
    def _reconstruct(self, data: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._decode(self._encode(b)[0], b) for b in data.split(64)])

    @torch.no_grad()
    def evaluate(self, slices: SliceSet) -> dict[str, float]:
        """Held-out reconstruction MSE, and for variational families the ELBO (nats/slice and bits/dim).

        The ELBO is estimated with one posterior sample per slice from a fixed seed."""
        self._require_fitted()
        data = self._inputs(slices)
        x = data[:, :1]
        out = {"val_recon_mse": float(((self._reconstruct(data) - x) ** 2).mean())}
        if self.variational:
            g = torch.Generator().manual_seed(0)
            elbos = []
            for b in data.split(64):
                mu, logvar = self._encode(b)
                z = mu + torch.randn(mu.shape, generator=g).to(mu.device) * torch.exp(0.5 * logvar)
                kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
                elbos.append(-(self._recon_nll(b[:, :1], self._decode(z, b)) + kl))
            elbo = torch.cat(elbos)
            d = x[0].numel()
            out["val_elbo_nats"] = float(elbo.mean())
            out["val_elbo_bits_per_dim"] = float(((-elbo + d * LOG_BIN) / (d * math.log(2))).mean())
        return out

    def _score_inputs(self, slices: SliceSet) -> torch.Tensor:
        return self._inputs(slices)

    # ---- contract ------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, labels: np.ndarray | None = None, seed: int = 0) -> Samples:
        self._require_fitted()
        if n < 0:
            raise ValueError(f"n: must be >= 0, got {n}")
        g = torch.Generator().manual_seed(seed)
        eps = self._latent_draws(n, g)
        x = self.numpy(self._decode(eps, None)) if n else np.zeros((0, 1, *self.native), np.float32)
        images = maps_to_size(x[:, 0], self.native)[:, None] if n else x
        return Samples(images=images.astype(np.float32), labels=None)

    def _latent_draws(self, n: int, g: torch.Generator) -> torch.Tensor:
        """(n, latent) codes on the device: N(0, I) drawn on the CPU (the same on any device), mapped through the
        training-code Gaussian when the family samples from it."""
        eps = self.tensor(torch.randn((n, self.config.latent_size), generator=g))
        if self._samples_codes:
            if self.code_mean is None:  # a model saved before the code Gaussian was kept: no choice but the prior
                log.warning("%s: no training-code Gaussian in this model; sampling from N(0, I)", self.family)
                return eps
            eps = self.tensor(self.code_mean) + eps @ self.tensor(self.code_chol).T
        return eps

    @torch.no_grad()
    def score(self, slices: SliceSet) -> AnomalyScores:
        """Reconstruction error: slice score = MSE over the slice; pixel map = |x − x̂| at the input size."""
        self._require_fitted()
        data = self._score_inputs(slices)
        err = self.numpy((self._reconstruct(data) - data[:, :1])[:, 0])
        return AnomalyScores(
            slice_scores=(err**2).reshape(len(err), -1).mean(1).astype(np.float64),
            pixel_maps=maps_to_size(np.abs(err), slices.image_size),
        )

    # ---- state beside the weights (``net.*`` / ``ema.net.*`` come from TorchFamily) -----------------------
    def extra_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {}
        if self.code_mean is not None:
            arrays["code_mean"], arrays["code_chol"] = self.code_mean, self.code_chol
        return arrays, {"native": list(self.native)}

    def load_extra_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.code_mean = arrays.get("code_mean")
        self.code_chol = arrays.get("code_chol")
        self.native = (int(meta["native"][0]), int(meta["native"][1]))


class DAEModel(AEModel):
    """Denoising autoencoder: trained to reconstruct clean slices from coarse-noise-corrupted inputs."""

    family: ClassVar[str] = "dae"
    Config: ClassVar[type[StrictModel]] = DAEConfig

    def _corrupt(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.noise_std == 0:
            return x
        if cfg.noise_res is None:
            return x + cfg.noise_std * torch.randn_like(x)
        noise = torch.randn((len(x), 1, cfg.noise_res, cfg.noise_res), device=x.device)
        return x + cfg.noise_std * F.interpolate(noise, size=x.shape[-2:], mode="bilinear", align_corners=False)


class VAEModel(AEModel):
    """Variational autoencoder / β-VAE (MONAI VarAutoEncoder), analytic KL, optional KL annealing."""

    family: ClassVar[str] = "vae"
    Config: ClassVar[type[StrictModel]] = VAEConfig
    variational: ClassVar[bool] = True


class CVAEModel(VAEModel):
    """Conditional VAE: generates an image for a given canonical label map (n, H, W)."""

    family: ClassVar[str] = "cvae"
    Config: ClassVar[type[StrictModel]] = CVAEConfig
    conditional: ClassVar[bool] = True

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.condition = LabelCondition(self.config)

    def begin_slice_fit(self, train: SliceSet, seed: int) -> None:
        self.condition = LabelCondition(self.config)  # the config decides a new fit's condition channels
        super().begin_slice_fit(train, seed)

    def _build(self) -> nn.Module:
        cfg = self.config
        return CondVAENet(cfg.image_size, cfg.latent_size, cfg.channels, cfg.strides, self.condition.channels)

    def _inputs(self, slices: SliceSet, maps: np.ndarray | None = None) -> torch.Tensor:
        """(N, 2, s, s): image and condition map (codes as floats); ``maps`` default to the condition of the
        slices themselves (with a partition: their own partition)."""
        maps = self.condition.maps_for(slices.labels, 0, slices.images) if maps is None else maps
        x = self.tensor(to_size(slices.images, self.config.image_size))
        lab = self.tensor(labels_to_size(maps, self.config.image_size).astype(np.float32))[:, None]
        return torch.cat([x, lab], dim=1)

    def _fit_inputs(self, train: SliceSet, seed: int) -> torch.Tensor:
        # with a partition: extended maps of the training slices, and the bank is kept
        return self._inputs(train, self.condition.fit_maps(train.images, train.labels, seed))

    def _score_inputs(self, slices: SliceSet) -> torch.Tensor:
        # Score against the healthy counterpart: scar / MVO conditioned as healthy myocardium.
        lab = slices.labels.copy()
        lab[np.isin(lab, (SCAR, MVO))] = MYO
        return self._inputs(SliceSet(slices.images, lab, slices.meta))

    def _cond(self, batch: torch.Tensor) -> torch.Tensor:
        return self.condition.one_hot(batch[:, 1].round().long())

    def _encode(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.encode_forward(batch[:, :1], self._cond(batch))

    def _decode(self, z: torch.Tensor, batch: torch.Tensor | None) -> torch.Tensor:
        return self.net.decode_forward(z, self._cond(batch))

    @torch.no_grad()
    def sample(self, n: int, labels: np.ndarray | None = None, seed: int = 0) -> Samples:
        """One image per label map: ``labels`` (n, H, W) canonical codes → images (n, 1, H, W)."""
        self._require_fitted()
        labels = validate_label_maps(labels, self.family, n)
        g = torch.Generator().manual_seed(seed)
        z = self._latent_draws(n, g)
        maps = self.condition.maps_for(labels, seed)  # with a partition: bank surroundings drawn from the seed
        small = labels_to_size(maps, self.config.image_size)
        batch = self.tensor(small.astype(np.float32))[:, None]
        batch = torch.cat([torch.zeros_like(batch), batch], dim=1)
        x = self.numpy(self._decode(z, batch)) if n else np.zeros((0, 1, *labels.shape[1:]), np.float32)
        images = maps_to_size(x[:, 0], labels.shape[1:])[:, None] if n else x
        return Samples(images=images.astype(np.float32), labels=labels.astype(np.uint8))

    # ---- state beside the weights: the autoencoders' plus the condition's (partition bank) ------------------
    def extra_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays, meta = super().extra_state()
        cond_arrays, cond_meta = self.condition.state()
        return {**arrays, **cond_arrays}, {**meta, **cond_meta}

    def load_extra_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        super().load_extra_state(arrays, meta)
        # the saved state decides the condition (and so the network's input channels), not today's defaults
        self.config = self.condition.restore(self.config, arrays, meta)
