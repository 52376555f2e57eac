"""The canonical cardiac label scheme and the per-dataset maps into it.

Every label map inside medsynth uses the canonical codes below; datasets are harmonised once, at load,
through :func:`harmonize`. Nothing else in the code base may hard-code a dataset's own codes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from medsynth.errors import LabelError

BACKGROUND = 0
LV = 1  # LV blood pool
MYO = 2  # healthy LV myocardium
RV = 3  # RV blood pool
SCAR = 4  # infarct
MVO = 5  # microvascular obstruction (no-reflow)

CANONICAL: dict[int, str] = {
    BACKGROUND: "background",
    LV: "lv",
    MYO: "myo",
    RV: "rv",
    SCAR: "scar",
    MVO: "mvo",
}
NAME_TO_CODE: dict[str, int] = {v: k for k, v in CANONICAL.items()}
N_CLASSES = len(CANONICAL)
#: Classes that together form the LV myocardial wall (healthy + infarcted tissue).
MYOCARDIAL_WALL = (MYO, SCAR, MVO)

#: Source code → canonical code, per dataset label map name (the manifest's ``label_map`` column).
LABEL_MAPS: dict[str, dict[int, int]] = {
    "canonical": {k: k for k in CANONICAL},
    "acdc": {0: BACKGROUND, 1: RV, 2: MYO, 3: LV},
    "mnms": {0: BACKGROUND, 1: LV, 2: MYO, 3: RV},
    "mnms2": {0: BACKGROUND, 1: LV, 2: MYO, 3: RV},
    "emidec": {0: BACKGROUND, 1: LV, 2: MYO, 3: SCAR, 4: MVO},
    # MyoPS: edema is still viable myocardium for our purposes.
    "myops": {0: BACKGROUND, 500: LV, 600: RV, 200: MYO, 1220: MYO, 2221: SCAR},
}


def label_map(name: str) -> dict[int, int]:
    """Return the source → canonical map called ``name``; raise ``ValueError`` naming it if unknown."""
    try:
        return LABEL_MAPS[name]
    except KeyError:
        raise ValueError(f"label_map: unknown label map {name!r}; known: {sorted(LABEL_MAPS)}") from None


def harmonize(label: np.ndarray, mapping: str | Mapping[int, int], source: str = "<array>") -> np.ndarray:
    """Map a label array of any layout to canonical codes (uint8, same shape).

    Raises :class:`LabelError` naming ``source`` when values are non-finite, non-integer or not in the map.
    """
    lut = label_map(mapping) if isinstance(mapping, str) else dict(mapping)
    arr = np.asarray(label)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise LabelError(f"{source}: label contains NaN/Inf values")
        rounded = np.rint(arr)
        if not np.array_equal(rounded, arr):
            raise LabelError(f"{source}: label contains non-integer values (e.g. {arr[rounded != arr][0]!r})")
        arr = rounded.astype(np.int64)
    elif arr.dtype.kind not in "iub":
        raise LabelError(f"{source}: label dtype {arr.dtype} is not numeric")
    values = np.unique(arr)
    unknown = [int(v) for v in values if int(v) not in lut]
    if unknown:
        raise LabelError(f"{source}: unknown label values {unknown}; expected a subset of {sorted(lut)}")
    out = np.zeros(arr.shape, dtype=np.uint8)
    for src, dst in lut.items():
        if dst != BACKGROUND:
            out[arr == src] = dst
    return out


def myocardial_wall(label: np.ndarray) -> np.ndarray:
    """Boolean mask of the LV wall (healthy myocardium, scar and MVO)."""
    return np.isin(label, MYOCARDIAL_WALL)
