"""Seeded in-plane affine deformation of label maps: new plausible label maps from real ones."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class LabelDeformation:
    """Deterministic in-plane affine about the image centre, nearest-neighbour on (H, W) label maps.

    ``angle_deg`` rotation, ``scale`` isotropic zoom (1 = none), ``shift_px`` (dy, dx) in pixels, ``flip``
    mirrors along W. Background fills what moves in from outside.
    """

    angle_deg: float = 0.0
    scale: float = 1.0
    shift_px: tuple[float, float] = (0.0, 0.0)
    flip: bool = False

    def __post_init__(self) -> None:
        if self.scale <= 0:
            raise ValueError(f"scale: must be positive, got {self.scale}")

    def matrix(self) -> np.ndarray:
        """Output→input 2×2 matrix for ``scipy.ndimage.affine_transform``."""
        t = np.deg2rad(self.angle_deg)
        rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
        return rot / self.scale

    def __call__(self, label: np.ndarray, order: int = 0) -> np.ndarray:
        """Deform an (H, W) array: ``order=0`` (nearest) for label maps, ``order=1`` for the aligned image."""
        if label.ndim != 2:
            raise ValueError(f"label: expected (H, W), got shape {label.shape}")
        src = label[:, ::-1] if self.flip else label
        centre = (np.array(src.shape) - 1) / 2.0
        m = self.matrix()
        offset = centre - m @ (centre + np.asarray(self.shift_px))
        # images: edge values fill what moves in, so no black border enters the surroundings
        mode = "constant" if order == 0 else "nearest"
        out = ndimage.affine_transform(src, m, offset=offset, order=order, mode=mode, cval=0)
        return out.astype(label.dtype)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RandomLabelDeformation:
    """Samples a :class:`LabelDeformation`: rotation ±``rotate_deg``, zoom 1±``scale``, shift ±``translate_px``."""

    rotate_deg: float = 15.0
    scale: float = 0.1
    translate_px: float = 4.0
    flip: bool = False

    def __post_init__(self) -> None:
        if self.rotate_deg < 0 or self.translate_px < 0:
            raise ValueError("rotate_deg / translate_px: must be non-negative")
        if not 0 <= self.scale < 1:
            raise ValueError(f"scale: must be in [0, 1), got {self.scale}")

    def sample(self, rng: np.random.Generator) -> LabelDeformation:
        return LabelDeformation(
            angle_deg=float(rng.uniform(-self.rotate_deg, self.rotate_deg)),
            scale=float(1.0 + rng.uniform(-self.scale, self.scale)),
            shift_px=(float(rng.uniform(-1, 1) * self.translate_px), float(rng.uniform(-1, 1) * self.translate_px)),
            flip=bool(self.flip and rng.random() < 0.5),
        )

    def __call__(self, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, LabelDeformation]:
        params = self.sample(rng)
        return params(label), params
