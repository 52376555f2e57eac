"""Figure: mid-ventricular phantom slices next to real ACDC cine and EMIDEC LGE slices.

``python -m medsynth.phantom.figure --data ../shared/data --out docs/figures/phantom_vs_real.png``

Every panel is cropped to about 120 mm around the heart (label centroid; EMIDEC PNGs have no spacing, so a
fixed pixel crop) and windowed to its own 0.5–99.5th intensity percentiles, as a reader would window it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from medsynth.errors import InputFileError
from medsynth.labels import LV, MVO, MYOCARDIAL_WALL, SCAR, harmonize
from medsynth.utils.atomic import atomic_file

log = logging.getLogger(__name__)

ACDC_PATIENTS = ("patient061", "patient001", "patient041")
EMIDEC_CASES = ("Case_P004", "Case_P009", "Case_N006")
CROP_MM = 120.0
EMIDEC_CROP_PX = 96


def _crop(img: np.ndarray, lab: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Crop (H, W) around the label centroid, padding with the minimum where the crop leaves the image."""
    ys, xs = np.nonzero(lab > 0)
    cy, cx = (int(ys.mean()), int(xs.mean())) if len(ys) else (img.shape[0] // 2, img.shape[1] // 2)
    pad = half + 1
    img_p = np.pad(img, pad, constant_values=float(img.min()))
    lab_p = np.pad(lab, pad)
    sl = (slice(cy + pad - half, cy + pad + half), slice(cx + pad - half, cx + pad + half))
    return img_p[sl], lab_p[sl]


def _mid_index(lab3: np.ndarray) -> int:
    """Mid-ventricular slice: the middle of the slices that contain LV blood pool."""
    zs = [k for k in range(lab3.shape[2]) if (lab3[:, :, k] == LV).any()]
    return zs[len(zs) // 2] if zs else lab3.shape[2] // 2


def _display(plane: np.ndarray) -> np.ndarray:
    """RAS (X, Y) plane → radiological display (rows = -Y, columns = -X), as medsynth's preprocessing."""
    return plane[::-1, ::-1].T


def acdc_slice(root: Path, patient: str) -> tuple[np.ndarray, np.ndarray]:
    """Mid-ventricular ED slice of an ACDC patient, read like every volume (RAS+), canonical labels."""
    from medsynth.data.readers import read_pair

    img_p = root / "acdc" / "training" / patient / f"{patient}_frame01.nii.gz"
    lab_p = img_p.with_name(f"{patient}_frame01_gt.nii.gz")
    if not img_p.is_file() or not lab_p.is_file():
        raise InputFileError(f"{img_p}: ACDC image or its _gt label is missing")
    img, label = read_pair(img_p, lab_p, "acdc")
    lab = label.array
    k = _mid_index(lab)
    half = int(round(CROP_MM / 2 / float(img.spacing[0])))
    return _crop(_display(img.array[:, :, k]), _display(lab[:, :, k]), half)


def emidec_slice(root: Path, case: str) -> tuple[np.ndarray, np.ndarray]:
    """Mid slice (or the one with the most scar for infarct cases) of an EMIDEC PNG case."""
    from PIL import Image

    images = sorted((root / "emidec_png" / "images").glob(f"{case}_slice*.png"))
    if not images:
        raise InputFileError(f"{root / 'emidec_png' / 'images'}: no slices for {case}")
    pairs = []
    for p in images:
        lab = harmonize(np.array(Image.open(root / "emidec_png" / "masks" / p.name)), "emidec", source=str(p))
        pairs.append((p, lab))
    scar = [int(np.isin(lab, (SCAR, MVO)).sum()) for _, lab in pairs]
    k = int(np.argmax(scar)) if max(scar) > 0 else len(pairs) // 2
    img = np.array(Image.open(pairs[k][0]), dtype=np.float32)
    return _crop(img, pairs[k][1], EMIDEC_CROP_PX // 2)


def phantom_slice(contrast: str, scanner: str, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Mid-ventricular ED slice of a phantom subject (infarct for LGE), display orientation."""
    from medsynth.phantom.generate import phantom_subject

    subj = phantom_subject(seed, index, contrast, scanner, pathology="infarct")
    image, label = subj["ED"]
    lab3 = label.array
    # LGE: the slice with the most scar, as chosen for EMIDEC.
    k = int(np.argmax(np.isin(lab3, (SCAR, MVO)).sum(axis=(0, 1)))) if contrast == "lge" else _mid_index(lab3)
    half = int(round(CROP_MM / 2 / label.spacing[0]))
    return _crop(_display(image.array[:, :, k]), _display(lab3[:, :, k]), half)


def _window(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, [0.5, 99.5])
    return np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)


def make_figure(data: Path, out: Path, seed: int = 3) -> Path:
    """Render the comparison figure to ``out`` (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cine = [(f"phantom cine {s}", phantom_slice("cine", s, seed, 0)) for s in ("A", "B")]
    lge = [(f"phantom LGE {s}", phantom_slice("lge", s, seed, 1)) for s in ("A", "B")]
    rows = [
        [(f"ACDC cine {p[-3:]}", acdc_slice(data, p)) for p in ACDC_PATIENTS] + cine,
        [(f"EMIDEC LGE {c[5:]}", emidec_slice(data, c)) for c in EMIDEC_CASES] + lge,
    ]
    ncol = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(2.2 * ncol, 2.35 * len(rows)), dpi=80)
    for r, row in enumerate(rows):
        for c, (title, (img, lab)) in enumerate(row):
            ax = axes[r, c]
            ax.imshow(_window(img), cmap="gray", vmin=0, vmax=1, interpolation="bilinear")
            if np.isin(lab, MYOCARDIAL_WALL).any():
                ax.contour(np.isin(lab, (SCAR, MVO)).astype(float), levels=[0.5], colors="gold", linewidths=0.6)
            ax.set_title(title, fontsize=8, color="tab:blue" if title.startswith("phantom") else "black")
            ax.axis("off")
    fig.suptitle("Phantom (blue titles) vs real short-axis slices, ~120 mm crops; gold: scar/MVO label", fontsize=8)
    fig.tight_layout()
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder holding acdc/ and emidec_png/")
    parser.add_argument("--out", type=Path, default=Path("docs/figures/phantom_vs_real.png"))
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        path = make_figure(args.data, args.out, args.seed)
    except InputFileError as err:
        print(f"medsynth: error: {err}", file=sys.stderr)
        return 2
    log.info("wrote %s (%d bytes)", path, path.stat().st_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
