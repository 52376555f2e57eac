"""Tissue intensities of the phantom for cine bSSFP and LGE, before any scanner effect.

Units are arbitrary "MR units" on a 0–1000 scale. Each subject draws its own tissue means (log-normal
spread around the table below) and every tissue has an intrinsic within-tissue SD, realised as a smooth
random texture field (not noise: noise is the scanner's). These per-subject means/SDs are the ground truth
recorded in ``phantom_params.json``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from medsynth.phantom.anatomy import AIR, LUNG, LV_BLOOD, N_TISSUES, RV_BLOOD, TISSUE_NAMES

CONTRASTS = ("cine", "lge")

# name: (mean, relative SD of the subject-level mean, within-tissue SD as a fraction of the mean)
_CINE = {
    "air": (0.0, 0.0, 0.0),
    "soft_tissue": (230.0, 0.15, 0.18),
    "fat": (820.0, 0.08, 0.08),
    "muscle": (230.0, 0.1, 0.08),
    "lung": (45.0, 0.2, 0.35),
    "liver": (320.0, 0.1, 0.07),
    "aorta_blood": (680.0, 0.1, 0.06),
    "epicardial_fat": (760.0, 0.08, 0.1),
    "lv_blood": (720.0, 0.1, 0.07),
    "myocardium": (240.0, 0.1, 0.09),
    "rv_blood": (690.0, 0.1, 0.06),
    "scar": (240.0, 0.0, 0.06),  # invisible in cine: tied to myocardium below
    "mvo": (240.0, 0.0, 0.06),
    "papillary": (250.0, 0.0, 0.08),
    "rv_wall": (230.0, 0.0, 0.08),
    "spine": (420.0, 0.15, 0.15),
    "rib": (330.0, 0.15, 0.2),  # rib cross-sections: marrow signal
}
_LGE = {
    "air": (0.0, 0.0, 0.0),
    "soft_tissue": (260.0, 0.15, 0.18),
    "fat": (600.0, 0.1, 0.1),
    "muscle": (160.0, 0.15, 0.1),
    "lung": (30.0, 0.2, 0.4),
    "liver": (280.0, 0.12, 0.08),
    "aorta_blood": (360.0, 0.12, 0.06),
    "epicardial_fat": (560.0, 0.1, 0.12),
    "lv_blood": (340.0, 0.12, 0.07),
    "myocardium": (110.0, 0.25, 0.15),  # nulled (imperfectly)
    "rv_blood": (340.0, 0.12, 0.07),
    "scar": (0.0, 0.0, 0.1),  # set relative to blood per subject below
    "mvo": (0.0, 0.0, 0.15),  # dark no-reflow core, relative to myocardium
    "papillary": (50.0, 0.0, 0.15),
    "rv_wall": (120.0, 0.0, 0.15),
    "spine": (300.0, 0.15, 0.15),
    "rib": (260.0, 0.15, 0.2),
}
TABLES = {"cine": _CINE, "lge": _LGE}


def sample_tissue_intensities(rng: np.random.Generator, contrast: str) -> dict[str, dict[str, float]]:
    """Per-subject tissue ``{name: {"mean": m, "sd": s}}`` (MR units, before scanner effects)."""
    if contrast not in TABLES:
        raise ValueError(f"contrast: expected one of {CONTRASTS}, got {contrast!r}")
    out: dict[str, dict[str, float]] = {}
    for name, (mean, spread, rel_sd) in TABLES[contrast].items():
        m = mean * float(np.exp(rng.normal(0.0, spread))) if spread else mean
        out[name] = {"mean": m, "sd": m * rel_sd}
    # Both ventricles hold the same blood: RV slightly darker (through-plane flow, coil distance), not independent.
    lv = out["lv_blood"]["mean"]
    rv = lv * float(rng.uniform(0.9, 1.0))
    out["rv_blood"] = {"mean": rv, "sd": rv * TABLES[contrast]["rv_blood"][2]}
    if contrast == "cine":
        myo = out["myocardium"]["mean"]
        for name in ("scar", "mvo", "rv_wall"):
            out[name] = {"mean": myo, "sd": myo * TABLES["cine"][name][2]}
        out["papillary"] = {"mean": myo * 1.05, "sd": myo * 1.05 * 0.08}
    else:
        blood = out["lv_blood"]["mean"]
        scar = blood * float(rng.uniform(1.05, 1.7))  # EMIDEC: (scar-myo)/(blood-myo) ~0.8-1.7
        out["scar"] = {"mean": scar, "sd": scar * TABLES["lge"]["scar"][2]}
        myo = out["myocardium"]["mean"]
        mvo = myo * float(rng.uniform(0.9, 1.5))
        out["mvo"] = {"mean": mvo, "sd": mvo * TABLES["lge"]["mvo"][2]}
        out["papillary"] = {"mean": myo * 1.1, "sd": myo * 1.1 * 0.15}
    return {k: {"mean": round(v["mean"], 4), "sd": round(v["sd"], 4)} for k, v in out.items()}


def _unit_field(rng: np.random.Generator, shape: tuple[int, ...], sigma_px: float) -> np.ndarray:
    """Smooth zero-mean unit-SD random field, smoothed in-plane only (slices are far apart)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=(sigma_px, sigma_px, 0))
    return (f - f.mean()) / (f.std() + 1e-8)


def texture_fields(rng: np.random.Generator, shape: tuple[int, ...], pixel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Fine (~1.2 mm) and coarse (~5 mm) unit-SD texture fields; tissue texture is static, shared by ED/ES."""
    return _unit_field(rng, shape, 1.2 / pixel_mm), _unit_field(rng, shape, 5.0 / pixel_mm)


def render_intensity(
    tissue: np.ndarray,
    intensities: dict[str, dict[str, float]],
    fields: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """Noise-free object image (X, Y, Z) float32: tissue mean + SD × smooth texture, plus lung vessels.

    ``fields`` are :func:`texture_fields` of the same shape as ``tissue``.
    """
    means = np.zeros(N_TISSUES, dtype=np.float32)
    sds = np.zeros(N_TISSUES, dtype=np.float32)
    for code, name in TISSUE_NAMES.items():
        means[code] = intensities[name]["mean"]
        sds[code] = intensities[name]["sd"]
    fine, coarse = fields
    texture = 0.6 * fine + 0.8 * coarse  # unit SD: independent fields, 0.6² + 0.8² = 1
    image = means[tissue] + sds[tissue] * texture
    # Lung vessels and bronchial walls: sparse bright dots on the dark lung.
    vessels = (fine > 2.2) & (tissue == LUNG)
    image[vessels] += 4.0 * intensities["lung"]["mean"]
    # Flowing blood is smoother than tissue at fine scales (same SD, mostly coarse texture).
    for code in (LV_BLOOD, RV_BLOOD):
        m = tissue == code
        image[m] = means[code] + sds[code] * (0.3 * fine[m] + 0.954 * coarse[m])
    image[tissue == AIR] = 0.0
    return np.maximum(image, 0.0).astype(np.float32)
