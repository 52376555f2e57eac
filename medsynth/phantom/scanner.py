"""Scanner styles: what turns the phantom's object image into a "scan" from a given scanner.

Applied in physical order to the supersampled object image: tissue contrast curve (sequence parameters),
point-spread blur (acquired resolution), area downsampling to the output grid (partial volume),
multiplicative coil bias field, then Rician magnitude noise. Two styles differ in every step, so
translating style A into style B is a meaningful (and, with shared anatomy seeds, paired) task.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class ScannerStyle:
    """One scanner's imaging chain. Intensities on the 0–1000 MR-unit scale."""

    name: str
    gamma: float  # contrast curve out = scale * 1000 * (in / 1000) ** gamma
    scale: float
    blur_mm: float  # Gaussian PSF sigma in-plane (mm)
    bias_strength: float  # SD of the log bias field over the field of view
    bias_anterior: float  # extra log-gain from posterior to anterior (surface-coil falloff)
    noise_sigma: float  # Rician noise sigma (MR units)

    def to_dict(self) -> dict:
        return asdict(self)


SCANNERS: dict[str, ScannerStyle] = {
    "A": ScannerStyle("A", gamma=1.0, scale=1.0, blur_mm=0.7, bias_strength=0.06, bias_anterior=0.1, noise_sigma=18.0),
    "B": ScannerStyle(
        "B", gamma=0.7, scale=0.85, blur_mm=1.8, bias_strength=0.18, bias_anterior=0.45, noise_sigma=30.0
    ),
}


def get_scanner(name: str) -> ScannerStyle:
    try:
        return SCANNERS[name]
    except KeyError:
        raise ValueError(f"scanner: expected one of {sorted(SCANNERS)}, got {name!r}") from None


def contrast_curve(image: np.ndarray, style: ScannerStyle) -> np.ndarray:
    """Apply the style's monotone tissue contrast curve (MR units in and out)."""
    return (style.scale * 1000.0 * np.power(np.maximum(image, 0.0) / 1000.0, style.gamma)).astype(np.float32)


def bias_field(shape: tuple[int, int, int], style: ScannerStyle, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative field (X, Y, Z): random low-order polynomial plus anterior coil gain."""
    nx, ny, nz = shape
    u = np.linspace(-1, 1, nx)[:, None]
    v = np.linspace(-1, 1, ny)[None, :]
    terms = [u, v, u * v, u**2 - 1 / 3, v**2 - 1 / 3]
    coef = rng.normal(0.0, 1.0, size=len(terms))
    poly = sum(c * t for c, t in zip(coef, terms, strict=True))
    poly = (poly - poly.mean()) / (poly.std() + 1e-8)
    log_b = style.bias_strength * poly - style.bias_anterior * 0.5 * v  # v = -1 is the anterior (top) edge
    field = np.exp(log_b).astype(np.float32)
    # Slight slice-to-slice gain change (coil position relative to each slice).
    gains = np.exp(rng.normal(0.0, style.bias_strength * 0.3, size=nz)).astype(np.float32)
    return field[:, :, None] * gains[None, None, :]


def apply_scanner(
    obj: np.ndarray,
    style: ScannerStyle,
    rng: np.random.Generator,
    supersample: int,
    pixel_mm: float,
) -> np.ndarray:
    """Scan the supersampled object image ``obj`` (X·s, Y·s, Z) into an (X, Y, Z) float32 image."""
    img = contrast_curve(obj, style)
    sigma = style.blur_mm / (pixel_mm / supersample)
    img = ndimage.gaussian_filter(img, sigma=(sigma, sigma, 0.0), mode="nearest")
    s = supersample
    nx, ny, nz = img.shape[0] // s, img.shape[1] // s, img.shape[2]
    img = img.reshape(nx, s, ny, s, nz).mean(axis=(1, 3))
    img = img * bias_field((nx, ny, nz), style, rng)
    n1 = rng.standard_normal(img.shape).astype(np.float32)
    n2 = rng.standard_normal(img.shape).astype(np.float32)
    img = np.sqrt((img + style.noise_sigma * n1) ** 2 + (style.noise_sigma * n2) ** 2)
    return img.astype(np.float32)
