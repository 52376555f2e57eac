"""DICOM series and Sunnybrook-style contour files made in the tests (SimpleITK writes the DICOM)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_series(
    folder: Path,
    volume: np.ndarray,
    spacing: tuple[float, float, float] = (1.25, 1.25, 8.0),
    positions: list[float] | None = None,
    stem: str = "IM-0001-{:04d}.dcm",
    first: int = 1,
) -> list[Path]:
    """Write ``volume`` (Z, Y, X) as one MR DICOM series, one file per slice; ``positions``: slice z in mm."""
    import SimpleITK as sitk  # noqa: N813

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = "1.2.826.0.1.3680043.2.1125." + str(abs(hash(str(folder))) % 10**12)
    positions = positions if positions is not None else [k * spacing[2] for k in range(volume.shape[0])]
    paths = []
    for k, z in enumerate(positions):
        img = sitk.GetImageFromArray(volume[k].astype(np.int16))
        img.SetSpacing((spacing[0], spacing[1]))
        tags = {
            "0008|0060": "MR",
            "0008|0008": "ORIGINAL\\PRIMARY\\M\\ND",
            "0020|000d": series_uid + ".1",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": f"0\\0\\{z}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": f"{spacing[1]}\\{spacing[0]}",
            "0018|0050": str(spacing[2]),
            "0008|0018": f"{series_uid}.{k + 1}",
        }
        for key, value in tags.items():
            img.SetMetaData(key, value)
        path = folder / stem.format(first + k)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(path))
        writer.Execute(img)
        paths.append(path)
    return paths


def write_contour(path: Path, centre: tuple[float, float], radius: float, n: int = 64) -> Path:
    """A Sunnybrook contour text file: one ``x y`` point (pixel columns, rows) per line."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    pts = np.stack([centre[0] + radius * np.cos(t), centre[1] + radius * np.sin(t)], 1)
    path.write_text("".join(f"{x:.2f} {y:.2f}\n" for x, y in pts))
    return path
