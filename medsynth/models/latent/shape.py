"""Statistical shape model: PCA on signed distance maps (SDMs) of the LV endocardium, LV epicardium and RV.

Each training label map (N, H, W) is resized (nearest) to ``image_size`` and turned into three SDMs (pixels;
negative inside, clipped to ±``sdm_clip``): the endocardial region (LV blood pool, code 1), the epicardial
region (LV blood pool ∪ wall, codes 1/2/4/5) and the RV blood pool (code 3). Nested filled regions rather than
the thin wall itself keep the topology: the myocardium is epi minus endo, so it always encloses the pool. An
absent structure (e.g. no RV in EMIDEC) is a constant +``sdm_clip`` map. The concatenated SDMs
(3·s² dims) get a PCA; sampling draws ``b ~ N(0, temperature² · diag λ)`` (truncated at ±3 SD per mode, the usual
"plausible shape" bound of active shape models), reconstructs SDMs, upsamples them bilinearly to the native
training size and labels pixels: inside endo and epi → LV, inside epi only → MYO, inside RV and outside epi →
RV, else background; each class then keeps its largest connected component.

Sampled labels are canonical healthy anatomy (codes 0–3): scar/MVO are left to the scar model, which inserts
them into the myocardium. ``Samples.images`` is a rendering of the labels with each class's mean training
intensity — a placeholder for callers that need an image; label-conditioned families produce the real images.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from pydantic import Field
from scipy import ndimage

from medsynth.config import StrictModel
from medsynth.data.slices import SliceSet
from medsynth.errors import TrainingError
from medsynth.labels import LV, MYO, MYOCARDIAL_WALL, N_CLASSES, RV
from medsynth.models.base import GenerativeModel, Sampler, Samples
from medsynth.models.latent.common import check_slices, labels_to_size
from medsynth.utils.seeding import rng

STRUCTURES = (("endo", (LV,)), ("epi", (LV, *MYOCARDIAL_WALL)), ("rv", (RV,)))


class ShapeConfig(StrictModel):
    n_components: int = Field(16, ge=1, description="shape modes kept (capped at N − 1)")
    image_size: int = Field(96, ge=8, description="working size of the SDMs (square)")
    sdm_clip: float = Field(20.0, gt=0, description="SDM clip in working-size pixels")
    temperature: float = Field(1.0, gt=0, description="scale of the sampled mode coefficients")


def signed_distance(mask: np.ndarray, clip: float) -> np.ndarray:
    """SDM of a boolean (H, W) mask in pixels: negative inside, positive outside, clipped to ±clip."""
    if not mask.any():
        return np.full(mask.shape, clip, dtype=np.float32)
    if mask.all():
        return np.full(mask.shape, -clip, dtype=np.float32)
    outside = ndimage.distance_transform_edt(~mask)
    inside = ndimage.distance_transform_edt(mask)
    return np.clip(outside - inside, -clip, clip).astype(np.float32)


def label_sdms(labels: np.ndarray, clip: float) -> np.ndarray:
    """(N, H, W) canonical labels → (N, 3, H, W) SDMs of endocardium, epicardium, RV."""
    out = np.empty((len(labels), len(STRUCTURES), *labels.shape[1:]), dtype=np.float32)
    for i, lab in enumerate(labels):
        for c, (_, codes) in enumerate(STRUCTURES):
            out[i, c] = signed_distance(np.isin(lab, codes), clip)
    return out


def sdms_to_labels(sdms: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) SDMs → (N, H, W) canonical labels (nested endo/epi, then RV; largest component kept)."""
    endo, epi, rv = sdms[:, 0] < 0, sdms[:, 1] < 0, sdms[:, 2] < 0
    out = np.zeros(endo.shape, dtype=np.uint8)
    out[rv & ~epi] = RV
    out[epi] = MYO
    out[epi & endo] = LV
    for i in range(len(out)):
        for code in (LV, MYO, RV):
            comp, n = ndimage.label(out[i] == code)
            if n > 1:
                sizes = ndimage.sum(np.ones_like(comp), comp, index=range(1, n + 1))
                keep = 1 + int(np.argmax(sizes))
                out[i][(comp > 0) & (comp != keep)] = 0
    return out


class ShapeModel(GenerativeModel, Sampler):
    """PCA shape model of LV endocardium / epicardium / RV; samples plausible canonical label maps."""

    family: ClassVar[str] = "shape_pca"
    Config: ClassVar[type[StrictModel]] = ShapeConfig
    conditional: ClassVar[bool] = False

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"n_components": 2, "image_size": 16}

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.mean: np.ndarray | None = None  # (3·s·s,)
        self.components: np.ndarray | None = None  # (q, 3·s·s)
        self.eigenvalues: np.ndarray | None = None  # (q,)
        self.class_means = np.zeros(N_CLASSES, dtype=np.float32)  # intensity per canonical code
        self.out_shape: tuple[int, int] = (0, 0)  # native (H, W) of the training labels

    def fit(self, train: SliceSet, val: SliceSet | None = None, seed: int = 0) -> dict[str, Any]:
        check_slices(train, self.family)
        s, clip = self.config.image_size, self.config.sdm_clip
        keep = np.array([np.isin(lab, MYOCARDIAL_WALL + (LV, RV)).any() for lab in train.labels])
        if keep.sum() < 2:
            raise TrainingError(f"{self.family}: need at least 2 slices with heart labels, got {int(keep.sum())}")
        labels = labels_to_size(train.labels[keep], s)
        data = label_sdms(labels, clip).reshape(int(keep.sum()), -1).astype(np.float64)
        self.mean = data.mean(axis=0)
        _, sv, vt = np.linalg.svd(data - self.mean, full_matrices=False)
        q = min(self.config.n_components, len(data) - 1)
        eig = sv**2 / (len(data) - 1)
        self.components, self.eigenvalues = vt[:q].astype(np.float32), eig[:q].astype(np.float32)
        self.out_shape = train.image_size
        for code in range(N_CLASSES):
            vals = train.images[:, 0][train.labels == code]
            self.class_means[code] = float(vals.mean()) if vals.size else 0.0
        self.fitted = True
        report: dict[str, Any] = {
            "family": self.family,
            "n_train": int(keep.sum()),
            "n_components": q,
            "explained_variance_ratio": float(eig[:q].sum() / max(eig.sum(), 1e-12)),
            "train_dice": self._recon_dice(train.labels[keep]),
        }
        if val is not None and len(val):
            report["val_dice"] = self._recon_dice(val.labels)
        return report

    def _recon_dice(self, labels: np.ndarray) -> float:
        """Mean Dice over structures of label maps reconstructed from their shape-mode projection."""
        s = self.config.image_size
        small = labels_to_size(labels, s)
        d = label_sdms(small, self.config.sdm_clip).reshape(len(small), -1) - self.mean
        coef = d @ self.components.T
        recon = sdms_to_labels((self.mean + coef @ self.components).reshape(len(small), 3, s, s))
        dices = []
        small = np.where(np.isin(small, MYOCARDIAL_WALL), MYO, small)
        for code in (LV, MYO, RV):
            a, b = small == code, recon == code
            denom = a.sum() + b.sum()
            if denom:
                dices.append(2 * (a & b).sum() / denom)
        return float(np.mean(dices)) if dices else float("nan")

    def sample(self, n: int, labels: np.ndarray | None = None, seed: int = 0) -> Samples:
        self._require_fitted()
        if n < 0:
            raise ValueError(f"n: must be >= 0, got {n}")
        s = self.config.image_size
        sd = np.sqrt(self.eigenvalues.astype(np.float64))
        b = np.clip(rng(seed).standard_normal((n, len(sd))), -3, 3) * sd * self.config.temperature
        sdms = (self.mean + b @ self.components.astype(np.float64)).reshape(n, 3, s, s).astype(np.float32)
        if self.out_shape != (s, s):
            import torch
            import torch.nn.functional as F

            sdms = F.interpolate(torch.from_numpy(sdms), size=self.out_shape, mode="bilinear", align_corners=False)
            sdms = sdms.numpy()
        out = sdms_to_labels(sdms)
        images = self.class_means[out][:, None].astype(np.float32)
        return Samples(images=images, labels=out)

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        self._require_fitted()
        arrays = {
            "mean": self.mean.astype(np.float64),
            "components": self.components,
            "eigenvalues": self.eigenvalues,
            "class_means": self.class_means,
        }
        return arrays, {"out_shape": list(self.out_shape)}

    def set_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.mean = np.asarray(arrays["mean"], dtype=np.float64)
        self.components = np.asarray(arrays["components"], dtype=np.float32)
        self.eigenvalues = np.asarray(arrays["eigenvalues"], dtype=np.float32)
        self.class_means = np.asarray(arrays["class_means"], dtype=np.float32)
        self.out_shape = (int(meta["out_shape"][0]), int(meta["out_shape"][1]))
        self.fitted = True
