"""What every unpaired translation family (cyclegan, cut, fastcut) shares: the domain masks, the fit preamble
(checks, the optional source-domain U-Net, seeding, the generators), the working-grid tensors, the fit report,
and running a generator on images with the output kept in the to-domain's intensity range.

Arrays: images (N, 1, H, W) float32 on the slice intensity scale; inside the networks (B, 1, s, s) at the
working size s = ``image_size`` (labels, when the segmentation-consistency loss is on, ride along as channel 1
of the source batches, see :mod:`medsynth.models.translation.segconsistency`).

Intensity range: ``fit`` records the [min, max] of each domain's training slices on the working grid, and
``translate`` clips its output to the range of the domain it translates to. A residual generator adds a
learned correction to its input, and nothing else bounds it: on ACDC cine → EMIDEC LGE at a CPU budget, CUT
overshot to a mean of 1.07, above every real LGE slice. Models saved before this range existed translate
unclipped; models saved before the ``residual`` key existed were plain generators and load as such.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from monai.networks.nets import PatchDiscriminator
from torch import nn

from medsynth.data.slices import SliceSet
from medsynth.errors import MedsynthError
from medsynth.models.base import TranslationDomains, Translator
from medsynth.models.latent.common import check_slices, maps_to_size, to_size
from medsynth.models.torch_family import TorchFamily
from medsynth.models.translation.segconsistency import pack_labels, train_source_unet

log = logging.getLogger(__name__)


def domain_values(slices: SliceSet, key: str) -> np.ndarray:
    """The normalised (stripped, lower-case) values of the domain column ``key`` of ``slices``, shape (N,)."""
    if key not in slices.meta.columns:
        raise MedsynthError(f"domain_key: slice metadata has no column {key!r}; columns: {list(slices.meta.columns)}")
    return slices.meta[key].astype(str).str.strip().str.lower().to_numpy()


class UnpairedTranslator(TorchFamily, Translator):
    """Base of the unpaired translation families; the config is an
    :class:`~medsynth.models.translation.cyclegan.UnpairedTranslationConfig`."""

    conditional: ClassVar[bool] = False

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        #: [min, max] of each domain's training slices ("source", "target"); None = not recorded (old model)
        self.intensity_range: dict[str, tuple[float, float]] | None = None
        self._fit_t0 = 0.0

    # ---- domains -------------------------------------------------------------------------------------
    def domains(self, slices: SliceSet) -> tuple[np.ndarray, np.ndarray]:
        """Boolean masks (N,) of the source- and target-domain slices of ``slices``."""
        values = domain_values(slices, self.config.domain_key)
        return values == self.config.source.strip().lower(), values == self.config.target.strip().lower()

    def translation_domains(self, slices: SliceSet, direction: str = "forward") -> TranslationDomains:
        cfg = self.config
        src, dst = cfg.source.strip().lower(), cfg.target.strip().lower()
        is_a, is_b = self.domains(slices)
        if direction == "forward":
            return TranslationDomains(cfg.domain_key, src, dst, is_a)
        if direction == "backward":  # describes the domains even for one-way families (translate() refuses)
            return TranslationDomains(cfg.domain_key, dst, src, is_b)
        raise ValueError(f"direction: 'forward' or 'backward', got {direction!r}")

    # ---- state ---------------------------------------------------------------------------------------
    def extra_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        meta: dict[str, Any] = {"residual": bool(self.config.residual)}
        if self.intensity_range is not None:
            meta["intensity_range"] = {k: list(v) for k, v in self.intensity_range.items()}
        return {}, meta

    def load_extra_state(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        if "residual" not in meta and self.config.residual:
            # saved before generators could be residual: its weights are a plain generator's
            self.config = self.config.model_copy(update={"residual": False})
        ranges = meta.get("intensity_range")
        self.intensity_range = {k: (float(v[0]), float(v[1])) for k, v in ranges.items()} if ranges else None

    # ---- fitting -------------------------------------------------------------------------------------
    def _discriminator(self) -> nn.Module:
        cfg = self.config
        return PatchDiscriminator(
            spatial_dims=2, channels=cfg.disc_channels, in_channels=1, num_layers_d=cfg.disc_layers, norm="INSTANCE"
        )

    def begin_translation_fit(self, train: SliceSet, seed: int) -> tuple[np.ndarray, np.ndarray, nn.Module | None]:
        """Check ``train``, train the frozen source-domain U-Net when ``lambda_seg`` > 0, seed the fit and build
        the persistent modules. Returns the source / target masks (N,) and the U-Net (or None)."""
        check_slices(train, self.family)
        cfg = self.config
        is_a, is_b = self.domains(train)
        if not is_a.any() or not is_b.any():
            found = sorted(set(domain_values(train, cfg.domain_key)))
            raise MedsynthError(
                f"{self.family}: need slices of both domains {cfg.source!r} and {cfg.target!r} in column "
                f"{cfg.domain_key!r}; found {found}"
            )
        self._fit_t0 = time.perf_counter()
        unet = None
        if cfg.lambda_seg > 0:  # trained first: train_unet reseeds the global RNG itself
            unet = train_source_unet(train.subset(is_a), cfg.image_size, cfg.seg_iterations, cfg.seg_channels, seed)
        self.begin_fit(seed)
        self.set_modules(self.build_modules())
        return is_a, is_b, (unet.to(self.device) if unet is not None else None)

    def translation_data(
        self, train: SliceSet, is_a: np.ndarray, is_b: np.ndarray, unet: nn.Module | None
    ) -> dict[str, torch.Tensor]:
        """The working-grid training tensors ``{"a": (Na, 1 or 2, s, s), "b": (Nb, 1, s, s)}`` (source labels as
        channel 1 when the U-Net is on); records each domain's intensity range for :meth:`run_generator`."""
        s = self.config.image_size
        a, b = to_size(train.images[is_a], s), to_size(train.images[is_b], s)
        self.intensity_range = {"source": (float(a.min()), float(a.max())), "target": (float(b.min()), float(b.max()))}
        if unet is not None:
            a = pack_labels(a, train.labels[is_a], s)
        return {"a": self.tensor(a), "b": self.tensor(b)}

    def translation_report(self, res: Any, is_a: np.ndarray, is_b: np.ndarray) -> dict[str, Any]:
        """The fit report: domain counts, ``lambda_seg``, the loop's losses and timing."""
        elapsed = time.perf_counter() - self._fit_t0
        return {
            "n_source": int(is_a.sum()),
            "n_target": int(is_b.sum()),
            "lambda_seg": self.config.lambda_seg,
            **self.fit_report(res, int(is_a.sum()), elapsed),
        }

    # ---- inference -----------------------------------------------------------------------------------
    @torch.no_grad()
    def run_generator(self, net: nn.Module, images: np.ndarray, to_domain: str) -> np.ndarray:
        """``net`` applied to (N, 1, H, W) images on the working grid, resized back to (H, W) and clipped to the
        intensity range of ``to_domain`` ("source" or "target") when the fit recorded one."""
        self._require_fitted()
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"images: expected (N, 1, H, W), got {images.shape}")
        if not np.all(np.isfinite(images)):
            raise ValueError("images: contain NaN/Inf")
        if len(images) == 0:
            return images.copy()
        x = self.tensor(to_size(images, self.config.image_size))
        y = maps_to_size(self.numpy(torch.cat([net(b) for b in x.split(64)]))[:, 0], images.shape[2:])[:, None]
        if self.intensity_range is not None:
            lo, hi = self.intensity_range[to_domain]
            y = np.clip(y, lo, hi)
        return y
