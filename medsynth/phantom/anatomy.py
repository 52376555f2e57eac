"""Procedural short-axis heart and thorax geometry of the phantom.

Everything is defined in millimetres on a grid of (X, Y, Z) voxels: X is the display column (left →
right), Y the display row (top = anterior), Z the short-axis slice index from base (0) towards the apex.
Heart-frame angles ``alpha`` are measured clockwise on the display from the septum (the direction from the
LV centre towards the RV): 0° septum, 90° anterior, 180° lateral, 270° inferior. That matches the usual
short-axis view (RV on the left, anterior up) and the AHA 17-segment model.

The same :class:`Anatomy` renders both cardiac phases: ES shrinks the LV cavity by the subject's ejection
fraction while conserving the myocardial cross-section per slice and angle (so the wall thickens), and the
scar lives in normalised wall coordinates (angle, depth, long-axis position) so it deforms with the wall.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from medsynth.labels import LV, MVO, MYO, RV, SCAR

# Tissue classes of the rendered object (finer than the label map: surroundings matter for the image).
AIR, SOFT, FAT, MUSCLE, LUNG, LIVER, AORTA, EPIFAT, LV_BLOOD, MYOCARDIUM, RV_BLOOD, SCAR_T, MVO_T = range(13)
PAPILLARY, RV_WALL, SPINE, RIB = 13, 14, 15, 16
TISSUE_NAMES: dict[int, str] = {
    AIR: "air",
    SOFT: "soft_tissue",
    FAT: "fat",
    MUSCLE: "muscle",
    LUNG: "lung",
    LIVER: "liver",
    AORTA: "aorta_blood",
    EPIFAT: "epicardial_fat",
    LV_BLOOD: "lv_blood",
    MYOCARDIUM: "myocardium",
    RV_BLOOD: "rv_blood",
    SCAR_T: "scar",
    MVO_T: "mvo",
    PAPILLARY: "papillary",
    RV_WALL: "rv_wall",
    SPINE: "spine",
    RIB: "rib",
}
N_TISSUES = len(TISSUE_NAMES)

#: Coronary territories → centre range of the scar (heart-frame degrees) and usual long-axis range (0 base, 1 apex).
TERRITORIES: dict[str, dict[str, tuple[float, float]]] = {
    "LAD": {"alpha": (30.0, 100.0), "start": (0.25, 0.5), "end": (0.95, 1.1)},
    "RCA": {"alpha": (250.0, 320.0), "start": (0.0, 0.2), "end": (0.55, 0.85)},
    "LCx": {"alpha": (150.0, 215.0), "start": (0.0, 0.2), "end": (0.5, 0.8)},
}
TERRITORY_PROBS = {"LAD": 0.5, "RCA": 0.3, "LCx": 0.2}


@dataclass
class Scar:
    """An infarct in normalised wall coordinates (see module docstring)."""

    territory: str
    alpha_center_deg: float
    half_width_deg: float
    t_start: float  # long-axis start (0 base, 1 apex)
    t_end: float
    transmurality: float  # peak fraction of the wall thickness (endocardium outwards), 0..1
    mvo: bool
    edge_harmonics: list[float] = field(default_factory=list)  # amplitude/phase pairs of the ragged border


@dataclass
class Anatomy:
    """Per-subject ground-truth geometry (mm, degrees); drawn by :func:`sample_anatomy`."""

    pathology: str  # "normal" | "infarct"
    center_mm: tuple[float, float]  # LV centre at the base relative to the grid centre (x, y)
    apex_drift_mm: tuple[float, float]  # LV centre shift from base to apex
    septum_deg: float  # display angle (counter-clockwise, y up) of the septal direction
    lv_length_mm: float  # base → endocardial apex
    slice_offset_mm: float  # position of slice 0 below the base plane
    lv_radius_mm: float  # ED endocardial radius at the base
    lv_ellipticity: float
    wall_mm: float  # mean ED wall thickness at the base
    wall_harmonics: list[float]  # (amplitude, phase) pairs for 1st and 2nd angular harmonics
    trabeculation: list[float]  # small high-frequency endocardial roughness (amplitude, phase) pairs
    ef: float  # LV ejection fraction
    rv_ef: float
    rv_depth_mm: float  # ED crescent depth at the base
    rv_wrap: float  # RV lateral extent relative to the LV epicardial radius
    rv_extent: float  # long-axis fraction of the LV covered by the RV
    papillary_mm: float
    trab_mm: float
    trab_harmonics: list[float]
    epifat_mm: float
    epifat_harmonics: list[float]
    groove_fat_mm: tuple[float, float]  # fat in the anterior / inferior interventricular grooves
    body_axes_mm: tuple[float, float]
    body_offset_mm: tuple[float, float]
    body_angle_deg: float
    fat_mm: float
    muscle_mm: float
    body_harmonics: list[float]  # irregular body outline (flatter back, chest and flank bulges)
    fat_harmonics: list[float]  # subcutaneous fat thickness varies around the body
    muscle_harmonics: list[float]  # chest-wall muscle thickness (pectoral and intercostal muscles)
    rib_phase_deg: float  # angular position of the first rib cross-section in the chest wall
    rib_pitch_mm: float  # long-axis period of the ribs' appearance in the slices (ribs run obliquely)
    liver_offset_mm: tuple[float, float]
    slice_jitter_mm: list[tuple[float, float]]  # breath-hold misregistration per slice (x, y)
    lung_harmonics: list[float]  # ragged lung borders
    clutter: list[list[float]]  # other structures: [x, y, a, b, angle, tissue, t_center, t_half, h1, p1, h2, p2]
    scar: Scar | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _harmonics(rng: np.random.Generator, n: int, scale: float) -> list[float]:
    out: list[float] = []
    for k in range(n):
        out += [float(rng.normal(0.0, scale / (1 + k))), float(rng.uniform(0, 2 * np.pi))]
    return out


def _eval_harmonics(coef: list[float], alpha: np.ndarray, orders: list[int]) -> np.ndarray:
    val = np.zeros_like(alpha)
    for i, order in enumerate(orders):
        amp, phase = coef[2 * i], coef[2 * i + 1]
        val = val + amp * np.cos(order * alpha - phase)
    return val


def sample_scar(rng: np.random.Generator) -> Scar:
    """Draw an infarct: coronary territory, angular and long-axis extent, transmurality, MVO."""
    names = list(TERRITORY_PROBS)
    territory = str(rng.choice(names, p=[TERRITORY_PROBS[n] for n in names]))
    ter = TERRITORIES[territory]
    transmurality = float(rng.uniform(0.3, 1.0) ** 0.7)  # skewed towards transmural, as in acute MI cohorts
    half_width = float(rng.uniform(28.0, 50.0) + 30.0 * transmurality)
    return Scar(
        territory=territory,
        alpha_center_deg=float(rng.uniform(*ter["alpha"])),
        half_width_deg=half_width,
        t_start=float(rng.uniform(*ter["start"])),
        t_end=float(rng.uniform(*ter["end"])),
        transmurality=transmurality,
        mvo=bool(transmurality > 0.75 and half_width > 50.0 and rng.uniform() < 0.6),
        edge_harmonics=_harmonics(rng, 3, 0.12),
    )


def _sample_clutter(rng: np.random.Generator) -> list[list[float]]:
    """Extra mediastinal/abdominal structures (vessels, fat pads, bowel/stomach, muscle) away from the heart."""
    kinds = [FAT, MUSCLE, AORTA, LUNG, LIVER, SOFT, FAT, AORTA]
    out: list[list[float]] = []
    n = int(rng.integers(16, 26))
    while len(out) < n:
        ang = rng.uniform(0, 2 * np.pi)
        dist = rng.uniform(35, 90)
        x, y = dist * np.cos(ang), dist * np.sin(ang)
        kind = int(rng.choice(kinds))
        small = kind == AORTA
        a = rng.uniform(3, 7) if small else rng.uniform(5, 18)
        b = a * rng.uniform(0.6, 1.0)
        out.append(
            [
                float(x),
                float(y),
                float(a),
                float(b),
                float(rng.uniform(0, 180)),
                float(kind),
                float(rng.uniform(0, 1.1)),
                float(rng.uniform(0.2, 0.7)),
                *_harmonics(rng, 2, 0.15),
            ]
        )
    return out


def sample_anatomy(rng: np.random.Generator, pathology: str, n_slices: int) -> Anatomy:
    """Draw one subject's geometry; ``pathology`` "infarct" adds a :class:`Scar`."""
    if pathology not in ("normal", "infarct"):
        raise ValueError(f"pathology: expected 'normal' or 'infarct', got {pathology!r}")
    infarct = pathology == "infarct"
    scar = sample_scar(rng) if infarct else None
    return Anatomy(
        pathology=pathology,
        center_mm=(float(rng.uniform(-8, 8)), float(rng.uniform(-8, 8))),
        apex_drift_mm=(float(rng.uniform(-2, 8)), float(rng.uniform(0, 8))),
        septum_deg=float(rng.uniform(160.0, 195.0)),
        lv_length_mm=float(rng.uniform(68.0, 80.0)),
        slice_offset_mm=float(rng.uniform(0.0, 4.0)),
        # adult ED volumes (LV ~110–170 ml, dilated after infarction) and stroke volumes ~60–100 ml
        lv_radius_mm=float(rng.uniform(25.5, 30.0) * (1.1 if infarct else 1.0)),
        lv_ellipticity=float(rng.uniform(0.0, 0.08)),
        wall_mm=float(rng.uniform(6.5, 9.5)),
        wall_harmonics=_harmonics(rng, 2, 0.12),
        trabeculation=_harmonics(rng, 3, 0.015),
        ef=float(rng.uniform(0.42, 0.55) if infarct else rng.uniform(0.55, 0.68)),
        rv_ef=float(rng.uniform(0.47, 0.62)),
        rv_depth_mm=float(rng.uniform(20.0, 27.0)),
        rv_wrap=float(rng.uniform(1.15, 1.35)),
        rv_extent=float(rng.uniform(0.8, 0.92)),
        papillary_mm=float(rng.uniform(3.5, 5.0)),
        trab_mm=float(rng.uniform(1.0, 2.5)),
        trab_harmonics=[v for _ in range(5) for v in (float(rng.normal(0, 0.5)), float(rng.uniform(0, 2 * np.pi)))],
        epifat_mm=float(rng.uniform(0.0, 2.0)),
        epifat_harmonics=_harmonics(rng, 4, 2.5),
        groove_fat_mm=(float(rng.uniform(2, 7)), float(rng.uniform(2, 7))),
        body_axes_mm=(float(rng.uniform(150, 180)), float(rng.uniform(105, 125))),
        body_offset_mm=(float(rng.uniform(-15, 15)), float(rng.uniform(35, 55))),
        body_angle_deg=float(rng.uniform(-25, 5)),
        fat_mm=float(rng.uniform(6, 18)),
        muscle_mm=float(rng.uniform(8, 15)),
        body_harmonics=_harmonics(rng, 4, 0.08),
        fat_harmonics=_harmonics(rng, 3, 0.6),
        muscle_harmonics=_harmonics(rng, 3, 0.6),
        rib_phase_deg=float(rng.uniform(0, 360)),
        rib_pitch_mm=float(rng.uniform(22, 32)),
        liver_offset_mm=(float(rng.uniform(-50, -25)), float(rng.uniform(60, 80))),
        slice_jitter_mm=[(float(a), float(b)) for a, b in rng.normal(0.0, 0.8, size=(n_slices, 2))],
        lung_harmonics=_harmonics(rng, 6, 0.12),
        clutter=_sample_clutter(rng),
        scar=scar,
    )


@dataclass
class Grid:
    """Voxel-centre coordinates (mm) of an (X, Y, Z) grid; ``supersample`` subdivides each voxel in-plane."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    supersample: int = 1

    def coords(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        nx, ny, nz = self.shape
        s = self.supersample
        x = ((np.arange(nx * s) + 0.5) / s - nx / 2) * self.spacing[0]
        y = ((np.arange(ny * s) + 0.5) / s - ny / 2) * self.spacing[1]
        z = np.arange(nz) * self.spacing[2]
        return x, y, z


def _wrap_deg(a: np.ndarray) -> np.ndarray:
    return np.mod(a, 360.0)


def _ang_dist(a: np.ndarray, b: float) -> np.ndarray:
    return np.abs((a - b + 180.0) % 360.0 - 180.0)


def _taper(d: np.ndarray, width: float) -> np.ndarray:
    """1 at d=0, smoothly 0 at |d|>=width (raised cosine)."""
    u = np.clip(np.abs(d) / max(width, 1e-6), 0.0, 1.0)
    return 0.5 * (1.0 + np.cos(np.pi * u))


def _scar_weight(scar: Scar, alpha: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Local transmurality (fraction of the wall, 0 = no scar) and the core weight, per voxel."""
    # LAD infarcts wrap further around the apex, as in the real territory map.
    grow = 1.0 + (1.2 * np.clip((t - 0.6) / 0.4, 0, 1) if scar.territory == "LAD" else 0.0)
    hw = scar.half_width_deg * grow
    rad = np.deg2rad(alpha)
    ragged = 1.0 + _eval_harmonics(scar.edge_harmonics, rad, [2, 3, 5])
    da = _ang_dist(alpha, scar.alpha_center_deg)
    wa = np.where(da < hw * ragged, np.sqrt(np.clip(1.0 - (da / (hw * ragged)) ** 2, 0.0, 1.0)), 0.0)
    mid, half = 0.5 * (scar.t_start + scar.t_end), 0.5 * (scar.t_end - scar.t_start)
    wz = np.sqrt(np.clip(1.0 - ((t - mid) / max(half, 1e-3)) ** 2, 0.0, 1.0))
    core = wa * wz
    # Wavefront: subendocardial at the border, up to the peak transmurality in the core.
    trans = np.clip(scar.transmurality * (0.3 + 0.7 * np.sqrt(core)) * (core > 0.05), 0.0, 1.0)
    return trans, core


def render(
    anat: Anatomy, grid: Grid, phases: tuple[str, ...] = ("ED", "ES"), thorax: bool = True
) -> dict[str, np.ndarray]:
    """Tissue codes (X, Y, Z) uint8 per phase ("ED" | "ES") on ``grid``.

    The thorax does not move between phases, so it is drawn once per slice; ``thorax=False`` draws the
    heart only (enough for label maps).
    """
    for phase in phases:
        if phase not in ("ED", "ES"):
            raise ValueError(f"phase: expected 'ED' or 'ES', got {phase!r}")
    x, y, z = grid.coords()
    X, Y = np.meshgrid(x, y, indexing="ij")
    out = {ph: np.full((len(x), len(y), len(z)), AIR, dtype=np.uint8) for ph in phases}
    ts = slice_t(anat, grid)
    for k in range(len(z)):
        t = float(ts[k])
        base = _thorax_slice(anat, X, Y, t) if thorax else np.full(X.shape, AIR, dtype=np.uint8)
        for phase in phases:
            out[phase][:, :, k] = _heart_slice(anat, X, Y, t, k, phase == "ES", grid, base.copy())
    return out


def labels_from_tissue(tissue: np.ndarray, lge: bool) -> np.ndarray:
    """Canonical label map of a tissue map; cine shows no scar, so scar/MVO are labelled myocardium."""
    labels = np.zeros(tissue.shape, dtype=np.uint8)
    labels[(tissue == LV_BLOOD) | (tissue == PAPILLARY)] = LV
    labels[tissue == MYOCARDIUM] = MYO
    labels[tissue == RV_BLOOD] = RV
    labels[tissue == SCAR_T] = SCAR if lge else MYO
    labels[tissue == MVO_T] = MVO if lge else MYO
    return labels


def _heart_center(anat: Anatomy, t: float, k: int) -> tuple[float, float]:
    jx, jy = anat.slice_jitter_mm[k]
    tc = min(max(t, 0.0), 1.2)
    return anat.center_mm[0] + anat.apex_drift_mm[0] * tc + jx, anat.center_mm[1] + anat.apex_drift_mm[1] * tc + jy


def _ellipse(X, Y, cx, cy, a, b, angle_deg):
    th = np.deg2rad(angle_deg)
    dx, dy = X - cx, Y - cy
    u = dx * np.cos(th) + dy * np.sin(th)
    v = -dx * np.sin(th) + dy * np.cos(th)
    return (u / a) ** 2 + (v / b) ** 2


def _blob(X, Y, cx, cy, a, b, angle_deg, harm: list[float] | None = None, orders=(2, 3, 4, 5)) -> np.ndarray:
    """Ellipse with a ragged border (harmonic perturbation of its normalised radius), as a full-grid mask.

    Only the bounding box is evaluated: ``X``/``Y`` are a regular ``meshgrid(..., indexing="ij")``.
    """
    mask = np.zeros(X.shape, dtype=bool)
    ext = 1.6 * max(a, b)
    xs, ys = X[:, 0], Y[0, :]
    i0, i1 = np.searchsorted(xs, [cx - ext, cx + ext])
    j0, j1 = np.searchsorted(ys, [cy - ext, cy + ext])
    if i1 <= i0 or j1 <= j0:
        return mask
    Xs, Ys = X[i0:i1, j0:j1], Y[i0:i1, j0:j1]
    e = np.sqrt(_ellipse(Xs, Ys, cx, cy, a, b, angle_deg))
    if harm:
        th = np.arctan2(Ys - cy, Xs - cx)
        e = e / (1.0 + _eval_harmonics(harm, th, list(orders)[: len(harm) // 2]))
    mask[i0:i1, j0:j1] = e <= 1.0
    return mask


_N_LUT = 3600  # angular lookup table: 0.1° (≈0.05 mm at the LV wall)


def _thorax_slice(anat: Anatomy, X, Y, t: float) -> np.ndarray:
    """Tissue codes of the thorax (no heart) at normalised long-axis position ``t``."""
    out = np.full(X.shape, AIR, dtype=np.uint8)
    tc = min(max(t, 0.0), 1.2)
    cx = anat.center_mm[0] + anat.apex_drift_mm[0] * tc  # organs follow the heart, not its per-slice jitter
    cy = anat.center_mm[1] + anat.apex_drift_mm[1] * tc

    # --- thorax -------------------------------------------------------------------------------------
    bx, by = anat.center_mm[0] + anat.body_offset_mm[0], anat.center_mm[1] + anat.body_offset_mm[1]
    ba, bb = anat.body_axes_mm
    # Body outline: an ellipse with a harmonic border (no perfect arc); subcutaneous fat of varying thickness.
    th = np.arctan2(Y - by, X - bx)
    outline = 1.0 + _eval_harmonics(anat.body_harmonics, th, [2, 3, 5, 7])
    fat = anat.fat_mm * np.maximum(1.0 + _eval_harmonics(anat.fat_harmonics, th, [2, 4, 7]), 0.25)
    muscle = anat.muscle_mm * np.maximum(1.0 + _eval_harmonics(anat.muscle_harmonics, th, [2, 3, 6]), 0.4)
    body = np.sqrt(_ellipse(X, Y, bx, by, ba, bb, anat.body_angle_deg)) / outline
    inner_fat = np.sqrt(_ellipse(X, Y, bx, by, ba - fat, bb - fat, anat.body_angle_deg)) / outline
    wall = fat + muscle
    inner_mus = np.sqrt(_ellipse(X, Y, bx, by, ba - wall, bb - wall, anat.body_angle_deg)) / outline
    out[body <= 1] = FAT
    out[inner_fat <= 1] = MUSCLE
    cavity = inner_mus <= 1
    _ribs(anat, X, Y, (bx, by), outline, (inner_fat, inner_mus), t, out)
    # Inside the rib cage: lung everywhere except the mediastinum around the heart and towards the spine,
    # and the liver/abdomen under the diaphragm (more of it towards the apex).
    out[cavity] = LUNG
    lh = anat.lung_harmonics
    sd = np.deg2rad(anat.septum_deg)
    ux, uy = np.cos(sd), -np.sin(sd)  # septal direction on the display
    size = anat.lv_radius_mm + anat.wall_mm
    mcx, mcy = cx + 0.35 * size * ux, cy + 0.35 * size * uy
    medi = _blob(X, Y, mcx, mcy, size + 0.5 * anat.rv_depth_mm + 6, size + 5, -anat.septum_deg, lh[:4])
    spine_x, spine_y = bx + 12, by + bb - anat.fat_mm - 35
    post = _blob(X, Y, 0.5 * (cx + spine_x) + 12, 0.5 * (cy + spine_y) + 5, 22, 0.5 * abs(spine_y - cy), 10, lh[4:8])
    out[(medi | post) & cavity] = SOFT
    liver_scale = 0.75 + 0.45 * tc
    liver = _blob(
        X,
        Y,
        cx + anat.liver_offset_mm[0],
        cy + anat.liver_offset_mm[1] + 10 * (1 - tc),
        80 * liver_scale,
        45 * liver_scale,
        -15,
        lh[8:],
    )
    out[liver & cavity] = LIVER
    for x0, y0, a, b, ang, kind, tcen, thalf, *harm in anat.clutter:
        if abs(t - tcen) < thalf:
            scale = float(np.sqrt(1.0 - ((t - tcen) / thalf) ** 2))
            m = _blob(X, Y, cx + x0, cy + y0, a * scale + 1.0, b * scale + 1.0, ang, harm)
            out[m & ((out == SOFT) | (out == LIVER))] = int(kind)
    spine = _blob(X, Y, spine_x, spine_y, 16, 14, 0)
    out[spine] = SPINE
    aorta = _blob(X, Y, cx + 30, by + bb - anat.fat_mm - 62, 11, 11, 0)
    out[aorta & (body <= 1)] = AORTA
    return out


def _ribs(anat: Anatomy, X, Y, centre, outline, shells, t: float, out: np.ndarray) -> None:
    """Rib (and sternum) cross-sections in the chest-wall muscle, every ~14° around the body except at the
    spine; ribs run obliquely, so each one appears only in some slices (period ``rib_pitch_mm``)."""
    inner_fat, inner_mus = shells
    layer = (inner_fat <= 1) & (inner_mus > 1)
    if not layer.any():
        return
    bx, by = centre
    ba, bb = anat.body_axes_mm
    depth = anat.fat_mm + 0.5 * anat.muscle_mm
    rot = np.deg2rad(anat.body_angle_deg)
    z_mm = t * anat.lv_length_mm
    for j in range(26):
        ang = np.deg2rad(anat.rib_phase_deg + j * 360.0 / 26)
        if np.sin(ang - rot) > 0.75:  # posterior (display +Y): the spine and back muscles, no ribs drawn
            continue
        if np.cos(2 * np.pi * z_mm / anat.rib_pitch_mm + 1.7 * j) < 0.1:
            continue
        # a point in the middle of the muscle layer of the (rotated) body ellipse
        u, v = (ba - depth) * np.cos(ang), (bb - depth) * np.sin(ang)
        px, py = bx + u * np.cos(rot) - v * np.sin(rot), by + u * np.sin(rot) + v * np.cos(rot)
        k = np.unravel_index(np.argmin((X - px) ** 2 + (Y - py) ** 2), X.shape)
        scale = 1.0 / float(outline[k])
        px, py = bx + (px - bx) * scale, by + (py - by) * scale
        tangent = np.rad2deg(np.arctan2(py - by, px - bx)) + 90.0
        rib = _blob(X, Y, px, py, 8.0, 0.5 * anat.muscle_mm, tangent)
        out[rib & layer] = RIB


def _heart_slice(anat: Anatomy, X, Y, t: float, k: int, es: bool, grid: Grid, out: np.ndarray) -> np.ndarray:
    """Draw the heart of one slice (0 base, 1 endocardial apex) over the tissue codes ``out``."""
    cx, cy = _heart_center(anat, t, k)
    # --- LV in polar heart-frame coordinates ------------------------------------------------------------
    dx, dy = X - cx, -(Y - cy)  # y up for the angle
    r = np.hypot(dx, dy)
    beta = np.rad2deg(np.arctan2(dy, dx))
    alpha = _wrap_deg(anat.septum_deg - beta)
    # Everything radial is a function of angle only within a slice: evaluate on a table, then look up.
    lut_alpha = (np.arange(_N_LUT) + 0.5) * 360.0 / _N_LUT
    idx = np.minimum((alpha * (_N_LUT / 360.0)).astype(np.int32), _N_LUT - 1)
    tabs = radii(anat, lut_alpha, t, es)
    r_endo, r_epi, trans, core = (tab[idx] for tab in tabs)
    scar = anat.scar
    epi = r <= r_epi
    cav = r < r_endo
    heart = epi.copy()

    # --- RV crescent attached to the septum (basal and mid slices only) --------------------------------
    rv = np.zeros_like(epi)
    rv_wall = np.zeros_like(epi)
    if t / anat.rv_extent < 1.0:
        if es:
            # The RV ejects: its ES cross-section is (1 - RVEF) of the ED one in every slice, found by
            # bisection on the crescent depth against the ES septum (the LV epicardium moves inwards at ES,
            # which alone would make a fixed crescent *grow*).
            r_epi_ed = radii(anat, lut_alpha, t, False)[1][idx]
            target = (1.0 - anat.rv_ef) * _rv_crescent(anat, X, Y, cx, cy, t, r <= r_epi_ed, 1.0)[0].sum()
            lo_f, hi_f = 0.0, 1.0
            for _ in range(14):
                mid = 0.5 * (lo_f + hi_f)
                if _rv_crescent(anat, X, Y, cx, cy, t, epi, mid)[0].sum() > target:
                    hi_f = mid
                else:
                    lo_f = mid
            rv, rv_wall = _rv_crescent(anat, X, Y, cx, cy, t, epi, 0.5 * (lo_f + hi_f))
        else:
            rv, rv_wall = _rv_crescent(anat, X, Y, cx, cy, t, epi, 1.0)
        heart |= rv | rv_wall

    # --- epicardial fat, then the heart on top ------------------------------------------------------
    if anat.epifat_mm > 0 and heart.any():
        s = grid.spacing[0] / grid.supersample
        dist = ndimage.distance_transform_edt(~heart, sampling=s)
        # Patchy epicardial fat, thickest in the interventricular grooves (next to the RV insertions).
        fat_tab = anat.epifat_mm + _eval_harmonics(anat.epifat_harmonics, np.deg2rad(lut_alpha), [1, 2, 3, 5])
        for g, at in zip(anat.groove_fat_mm, (80.0, 280.0), strict=True):
            fat_tab = fat_tab + g * np.exp(-0.5 * (_ang_dist(lut_alpha, at) / 18.0) ** 2)
        fat_w = np.maximum(fat_tab, 0.0)[idx]
        out[(dist > 0) & (dist <= fat_w)] = EPIFAT
    out[rv_wall] = RV_WALL
    out[rv] = RV_BLOOD
    out[epi] = MYOCARDIUM
    out[cav] = LV_BLOOD

    # Papillary muscles: anterolateral and posteromedial, inside the cavity in mid slices.
    if 0.25 < t < 0.8:
        pr = anat.papillary_mm * (1.25 if es else 1.0) * float(np.sin(np.pi * (t - 0.25) / 0.55)) ** 0.5
        for pa in (140.0, 235.0):
            rr = float(np.median(r_endo[cav])) if cav.any() else 0.0
            if rr <= pr * 1.5:
                continue
            ang = np.deg2rad(anat.septum_deg - pa)
            px, py = cx + (rr - 0.8 * pr) * np.cos(ang), cy - (rr - 0.8 * pr) * np.sin(ang)
            pm = ((X - px) ** 2 + (Y - py) ** 2 <= pr**2) & cav
            out[pm] = PAPILLARY
    # Trabeculae: thin muscle spikes along the endocardium (more towards the apex, compacted at ES).
    if 0.0 <= t < 0.95:
        h = _eval_harmonics(anat.trab_harmonics, np.deg2rad(lut_alpha), [13, 17, 23, 29, 37])
        depth_tab = anat.trab_mm * (0.6 + 0.6 * t) * (1.3 if es else 1.0) * np.maximum(h - 0.6, 0.0)
        out[cav & (r > r_endo - depth_tab[idx])] = PAPILLARY

    # --- scar and MVO inside the wall -------------------------------------------------------------------
    if scar is not None:
        wall_mask = epi & ~cav
        depth_n = (r - r_endo) / np.maximum(r_epi - r_endo, 1e-3)
        scar_m = wall_mask & (trans > 0.08) & (depth_n <= trans)
        out[scar_m] = SCAR_T
        if scar.mvo:
            mvo_m = scar_m & (core > 0.55) & (depth_n <= 0.55 * trans)
            out[mvo_m] = MVO_T
    return out


def _rv_crescent(anat: Anatomy, X, Y, cx: float, cy: float, t: float, epi: np.ndarray, size: float):
    """RV blood pool and free wall masks of one slice: an offset ellipse a bit larger than the LV, minus the
    LV epicardium ``epi``, leaves a crescent hugging the septum. ``size`` (0–1) scales the crescent's depth
    and width together (1 = ED)."""
    g = np.sqrt(max(0.0, 1.0 - (t / anat.rv_extent) ** 2))
    r_epi_mean = float(anat.lv_radius_mm * np.sqrt(max(0.0, 1.0 - t**2)) ** 0.9 + anat.wall_mm)
    depth = anat.rv_depth_mm * g * size
    rr = r_epi_mean * anat.rv_wrap * (0.75 + 0.25 * g) * (0.8 + 0.2 * size)
    a, b = 0.72 * rr, 0.98 * rr
    d = depth + r_epi_mean - a
    sd = np.deg2rad(anat.septum_deg)
    rcx, rcy = cx + d * np.cos(sd), cy - d * np.sin(sd)
    ang = -anat.septum_deg  # ellipse axis along the septal direction (display y down)
    rv = (_ellipse(X, Y, rcx, rcy, a, b, ang) <= 1.0) & ~epi
    rv_wall = (_ellipse(X, Y, rcx, rcy, a + 3.0, b + 3.0, ang) <= 1.0) & ~epi & ~rv
    return rv, rv_wall


def radii(anat: Anatomy, alpha: np.ndarray, t: float, es: bool) -> tuple[np.ndarray, ...]:
    """Endo- and epicardial radius (mm), local scar transmurality and scar core weight at angles ``alpha``.

    ED: half-ellipsoid cavity with angular wall-thickness harmonics, thinner towards the apex, apical cap
    beyond t = 1. ES: the cavity shrinks by the EF (volume ∝ r²) except in infarcted segments
    (hypokinesis); the myocardial cross-section is conserved, so the wall thickens.
    """
    alpha = np.asarray(alpha, dtype=float)
    arad = np.deg2rad(alpha)
    L = anat.lv_length_mm
    zmm = t * L
    shape_mod = 1.0 + anat.lv_ellipticity * np.cos(2 * arad) + _eval_harmonics(anat.trabeculation, arad, [7, 9, 11])
    r_endo_ed = anat.lv_radius_mm * np.sqrt(max(0.0, 1.0 - min(t, 1.0) ** 2)) ** 0.9 * shape_mod
    wall = anat.wall_mm * (1.0 + _eval_harmonics(anat.wall_harmonics, arad, [1, 2])) * (1.0 - 0.35 * min(t, 1.0) ** 2)
    if t <= 1.0:
        r_epi_ed = r_endo_ed + wall
    else:
        cap = anat.wall_mm * 0.65
        r_epi_ed = wall * np.sqrt(max(0.0, 1.0 - ((zmm - L) / cap) ** 2))
        r_endo_ed = np.zeros_like(alpha)
    if anat.scar is not None:
        trans, core = _scar_weight(anat.scar, alpha, np.full_like(alpha, t))
    else:
        trans = core = np.zeros_like(alpha)
    if es:
        c = np.sqrt(1.0 - anat.ef)
        c = c + (0.92 - c) * np.clip(core * 1.2, 0, 1) * 0.7
        r_endo = r_endo_ed * c
        r_epi = np.sqrt(r_endo**2 + np.maximum(r_epi_ed**2 - r_endo_ed**2, 0.0))
    else:
        r_endo, r_epi = r_endo_ed, r_epi_ed
    return r_endo, np.maximum(r_epi, r_endo), trans, core


def slice_t(anat: Anatomy, grid: Grid) -> np.ndarray:
    """Normalised long-axis position (0 base, 1 endocardial apex) of each slice of ``grid``."""
    return (grid.coords()[2] + anat.slice_offset_mm) / anat.lv_length_mm


def segment_wall_thickness(anat: Anatomy, phase: str, n_angles: int = 72) -> dict[str, float]:
    """Mean wall thickness (mm) per AHA segment 1–16 (keys "01".."16") from the analytic geometry."""
    acc: dict[int, list[float]] = {}
    alpha = (np.arange(n_angles) + 0.5) * 360.0 / n_angles
    for t in np.linspace(0.05, 0.95, 19):
        r_endo, r_epi, _, _ = radii(anat, alpha, float(t), phase == "ES")
        seg = aha_segment(alpha, np.full_like(alpha, t))
        for s in np.unique(seg):
            acc.setdefault(int(s), []).extend((r_epi - r_endo)[seg == s].tolist())
    return {f"{k:02d}": round(float(np.mean(v)), 3) for k, v in sorted(acc.items())}


def aha_segment(alpha_deg: np.ndarray, t: np.ndarray) -> np.ndarray:
    """AHA 17-segment index per voxel from heart-frame angle and long-axis position (t > 1: apex, 17)."""
    alpha_deg = np.asarray(alpha_deg, dtype=float)
    t = np.asarray(t, dtype=float)
    # Six 60° segments starting at the anterior RV insertion (alpha 120° → 60°): 1 anterior (60–120°),
    # 2 anteroseptal (0–60°), 3 inferoseptal (300–360°), 4 inferior (240–300°), 5 inferolateral, 6 anterolateral.
    six = np.select(
        [
            (alpha_deg >= 60) & (alpha_deg < 120),
            alpha_deg < 60,
            alpha_deg >= 300,
            (alpha_deg >= 240) & (alpha_deg < 300),
            (alpha_deg >= 180) & (alpha_deg < 240),
        ],
        [1, 2, 3, 4, 5],
        6,
    )
    four = np.select(
        [(alpha_deg >= 45) & (alpha_deg < 135), (alpha_deg < 45) | (alpha_deg >= 315), (alpha_deg >= 225)],
        [13, 14, 15],
        16,
    )
    seg = np.where(t < 1 / 3, six, np.where(t < 2 / 3, six + 6, four))
    return np.where(t > 1.0, 17, seg)


def wall_coordinates(anat: Anatomy, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Heart-frame angle (deg) and long-axis position t per voxel of ``grid`` (for segment bookkeeping)."""
    x, y, z = grid.coords()
    X, Y = np.meshgrid(x, y, indexing="ij")
    alpha = np.empty((len(x), len(y), len(z)))
    tt = np.empty_like(alpha)
    for k in range(len(z)):
        t = (z[k] + anat.slice_offset_mm) / anat.lv_length_mm
        cx, cy = _heart_center(anat, float(t), k)
        beta = np.rad2deg(np.arctan2(-(Y - cy), X - cx))
        alpha[:, :, k] = _wrap_deg(anat.septum_deg - beta)
        tt[:, :, k] = t
    return alpha, tt
