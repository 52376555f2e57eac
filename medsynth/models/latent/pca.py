"""PCA and probabilistic PCA (Tipping & Bishop 1999) on slice images.

Slices are resized to ``image_size`` × ``image_size`` (area averaging; ``None`` keeps the native size) and
flattened to D = image_size² dimensions. Both models are fitted in closed form from the economy SVD of the
centred (N, D) data matrix, so N ≪ D is cheap.

- :class:`PCAModel` samples ``x = μ + U z``, ``z ~ N(0, diag λ)`` and scores a slice by its reconstruction error
  after projection onto the q principal components (pixel map ``|x − x̂|``).
- :class:`PPCAModel` is the Gaussian ``N(μ, W Wᵀ + σ² I)`` with ``W = U (Λ − σ² I)^½`` and ``σ²`` the mean
  discarded variance (the maximum-likelihood solution). Samples include the isotropic noise. ``score`` is the
  exact negative log-likelihood in bits/dim; its pixel map is the per-pixel share of the Mahalanobis term that
  lies outside the principal subspace, ``(x − x̂)² / (2σ²)`` — the part of the NLL that localises (the in-subspace
  part is a global code cost). ``fit`` reports held-out NLL (bits/dim) on ``val``.

Images on the SliceSet scale (p1 → 0, p99 → 1; not clipped above) are modelled as continuous values; bits/dim
assume the intensities are quantised in bins of 1/256 (see :func:`medsynth.models.flow.model.bits_per_dim`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from medsynth.config import StrictModel
from medsynth.data.slices import SliceSet
from medsynth.errors import TrainingError
from medsynth.models.base import AnomalyScores, GenerativeModel, Sampler, Samples, Scorer
from medsynth.models.latent.common import check_slices, maps_to_size, to_size
from medsynth.utils.seeding import rng

LOG_BIN = math.log(256.0)  # intensities quantised to 1/256 of the p1–p99 range for bits/dim


class PCAConfig(StrictModel):
    n_components: int = Field(32, ge=1, description="principal components kept (capped at N − 1)")
    image_size: int | None = Field(128, ge=4, description="working size (square); None keeps the native size")


class PCAModel(GenerativeModel, Sampler, Scorer):
    """Linear Gaussian image model (principal components). Unconditional; scores by reconstruction error."""

    family: ClassVar[str] = "pca"
    Config: ClassVar[type[StrictModel]] = PCAConfig
    conditional: ClassVar[bool] = False

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"n_components": 3, "image_size": 16}

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.mean: np.ndarray | None = None  # (D,)
        self.components: np.ndarray | None = None  # (q, D), orthonormal rows
        self.eigenvalues: np.ndarray | None = None  # (q,) variances along the components
        self.sigma2: float = 0.0  # mean discarded variance
        self.shape: tuple[int, int] = (0, 0)  # working (H, W)

    # ---- fitting -------------------------------------------------------------------------------------
    def fit(self, train: SliceSet, val: SliceSet | None = None, seed: int = 0) -> dict[str, Any]:
        check_slices(train, self.family)
        x = to_size(train.images, self.config.image_size)
        self.shape = (int(x.shape[2]), int(x.shape[3]))
        data = x.reshape(len(x), -1).astype(np.float64)
        n, d = data.shape
        if n < 2:
            raise TrainingError(f"{self.family}: need at least 2 training slices, got {n}")
        self.mean = data.mean(axis=0)
        centred = data - self.mean
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        q = min(self.config.n_components, n - 1, d - 1)
        eig = s**2 / (n - 1)
        total = float((centred**2).sum() / (n - 1))
        self.components = vt[:q].astype(np.float32)
        self.eigenvalues = eig[:q].astype(np.float32)
        self.sigma2 = max((total - float(eig[:q].sum())) / max(d - q, 1), 1e-6)
        self.fitted = True
        report: dict[str, Any] = {
            "family": self.family,
            "n_train": n,
            "n_components": q,
            "image_size": list(self.shape),
            "explained_variance_ratio": float(eig[:q].sum() / max(total, 1e-12)),
            "sigma2": self.sigma2,
        }
        report["train_recon_mse"] = float(np.mean(self._residual(x) ** 2))
        if val is not None and len(val):
            xv = to_size(val.images, self.config.image_size)
            report["val_recon_mse"] = float(np.mean(self._residual(xv) ** 2))
            report["val_nll_bits_per_dim"] = float(np.mean(self._nll_bpd(xv)))
        return report

    # ---- linear algebra ------------------------------------------------------------------------------
    def _project(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 1, h, w) → (coefficients (N, q), centred data (N, D)) in float64."""
        d = x.reshape(len(x), -1).astype(np.float64) - self.mean
        return d @ self.components.T.astype(np.float64), d

    def _residual(self, x: np.ndarray) -> np.ndarray:
        """x − x̂ with x̂ the projection onto the principal subspace; (N, h, w)."""
        coef, d = self._project(x)
        res = d - coef @ self.components.astype(np.float64)
        return res.reshape(len(x), *self.shape)

    def _nll_bpd(self, x: np.ndarray) -> np.ndarray:
        """Exact PPCA negative log-likelihood per slice in bits/dim (see module docstring)."""
        coef, d = self._project(x)
        dim = d.shape[1]
        lam = np.maximum(self.eigenvalues.astype(np.float64), self.sigma2)
        in_sub = (coef**2 / lam).sum(axis=1)
        out_sub = ((d**2).sum(axis=1) - (coef**2).sum(axis=1)) / self.sigma2
        logdet = np.log(lam).sum() + (dim - len(lam)) * math.log(self.sigma2)
        nll = 0.5 * (dim * math.log(2 * math.pi) + logdet + in_sub + out_sub)
        return (nll + dim * LOG_BIN) / (dim * math.log(2))

    # ---- contract ------------------------------------------------------------------------------------
    def sample(self, n: int, labels: np.ndarray | None = None, seed: int = 0) -> Samples:
        self._require_fitted()
        if n < 0:
            raise ValueError(f"n: must be >= 0, got {n}")
        g = rng(seed)
        z = g.standard_normal((n, len(self.eigenvalues))) * np.sqrt(self._latent_var())
        x = self.mean + z @ self.components.astype(np.float64)
        if self._noisy_samples:
            x = x + g.standard_normal(x.shape) * math.sqrt(self.sigma2)
        return Samples(images=x.reshape(n, 1, *self.shape).astype(np.float32), labels=None)

    _noisy_samples: ClassVar[bool] = False

    def _latent_var(self) -> np.ndarray:
        return self.eigenvalues.astype(np.float64)

    def score(self, slices: SliceSet) -> AnomalyScores:
        """Reconstruction error: slice score = mean squared residual, pixel map = |x − x̂| at the input size."""
        self._require_fitted()
        res = self._residual(to_size(slices.images, self.config.image_size))
        maps = maps_to_size(np.abs(res), slices.image_size)
        return AnomalyScores(slice_scores=(res**2).reshape(len(res), -1).mean(axis=1), pixel_maps=maps)

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        self._require_fitted()
        arrays = {
            "mean": self.mean.astype(np.float64),
            "components": self.components,
            "eigenvalues": self.eigenvalues,
        }
        return arrays, {"sigma2": self.sigma2, "shape": list(self.shape)}

    def set_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.mean = np.asarray(arrays["mean"], dtype=np.float64)
        self.components = np.asarray(arrays["components"], dtype=np.float32)
        self.eigenvalues = np.asarray(arrays["eigenvalues"], dtype=np.float32)
        self.sigma2 = float(meta["sigma2"])
        self.shape = (int(meta["shape"][0]), int(meta["shape"][1]))
        self.fitted = True


class PPCAModel(PCAModel):
    """Probabilistic PCA: a full Gaussian density; scores by exact negative log-likelihood (bits/dim)."""

    family: ClassVar[str] = "ppca"
    _noisy_samples: ClassVar[bool] = True

    def _latent_var(self) -> np.ndarray:
        # x = μ + W z + ε with W = U (Λ − σ²)^½: the in-subspace variance excluding the isotropic noise.
        return np.maximum(self.eigenvalues.astype(np.float64) - self.sigma2, 0.0)

    def score(self, slices: SliceSet) -> AnomalyScores:
        """Slice score = NLL bits/dim; pixel map = (x − x̂)² / (2σ²), the off-subspace NLL share per pixel."""
        self._require_fitted()
        x = to_size(slices.images, self.config.image_size)
        res = self._residual(x)
        maps = maps_to_size(res**2 / (2 * self.sigma2), slices.image_size)
        return AnomalyScores(slice_scores=self._nll_bpd(x), pixel_maps=maps)

    def log_likelihood_bpd(self, slices: SliceSet) -> np.ndarray:
        """Negative log-likelihood per slice in bits/dim (lower = more likely)."""
        self._require_fitted()
        return self._nll_bpd(to_size(slices.images, self.config.image_size))
