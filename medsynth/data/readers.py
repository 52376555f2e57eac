"""Readers for cardiac MR images and label maps that keep the geometry.

Every reader returns a :class:`~medsynth.data.volume.Volume` whose array is (X, Y, Z) in the closest
canonical (RAS+) voxel order and whose affine maps voxel indices to RAS world millimetres.

Supported sources:

- NIfTI ``.nii`` / ``.nii.gz`` (nibabel). 4-D files (e.g. M&Ms ``_sa.nii.gz``, time last) need ``frame``.
  When the header's sform/qform column lengths disagree with ``pixdim`` (ACDC ships a unit-scaled sform
  with pixdim 1.56×1.56×10 mm), the affine's directions and origin are kept and its columns rescaled to
  ``pixdim``: the pixdim spacing is the one the data were labelled on.
- DICOM series: a directory holding one series (SimpleITK ``ImageSeriesReader``); other SimpleITK formats
  (``.mha``, ``.mhd``, ``.nrrd``, ``.nhdr``, single ``.dcm``). SimpleITK's LPS geometry is converted to RAS.
- PNG 2-D slices (8- or 16-bit grayscale; palette PNGs give their indices, as label masks store them; RGB(A)
  is accepted only when its colour channels are equal, i.e. gray stored as colour, and refused otherwise).
  Pixel (row r, column c) becomes ``array[c, r, 0]`` (X = column, Y = row), affine identity, spacing ``None``.

Problems with a file (missing, corrupt, truncated, unsupported) raise :class:`InputFileError` with a one-line
message starting with the path; label problems raise :class:`LabelError`; image/label disagreement raises
:class:`GeometryError` (see :mod:`medsynth.data.validate`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medsynth.data.validate import validate_pair
from medsynth.data.volume import Volume
from medsynth.errors import InputFileError
from medsynth.labels import harmonize

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
PNG_SUFFIXES = (".png",)
SITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr", ".dcm")
#: Sunnybrook Cardiac Data inner (endocardial) contour; the outer one is ``-ocontour-manual.txt``.
CONTOUR_SUFFIX = "-icontour-manual.txt"
#: Relative disagreement between affine column lengths and pixdim above which the affine is rescaled.
_SCALE_RTOL = 1e-3

# LPS (ITK / DICOM) <-> RAS (NIfTI / nibabel) world coordinates.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text}" if not isinstance(err, OSError | ValueError) else text


def _kind(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir():
        return "dicom-dir"
    if name.endswith(CONTOUR_SUFFIX):
        return "contour"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(PNG_SUFFIXES):
        return "png"
    if name.endswith(SITK_SUFFIXES):
        return "sitk"
    raise InputFileError(
        f"{path}: unsupported file type; expected NIfTI (.nii, .nii.gz), PNG, a DICOM series directory "
        f"or one of {list(SITK_SUFFIXES)}"
    )


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise InputFileError(f"{path}: file not found")


# --------------------------------------------------------------------------------------------- NIfTI


def _fixed_affine(img: nib.Nifti1Image | nib.Nifti2Image) -> np.ndarray:
    """The image affine with its column lengths set to the header's pixdim where they disagree."""
    affine = np.array(img.affine, dtype=float)
    zooms = np.array(img.header.get_zooms()[:3], dtype=float)
    if len(zooms) < 3:
        zooms = np.concatenate([zooms, np.ones(3 - len(zooms))])
    lengths = np.linalg.norm(affine[:3, :3], axis=0)
    if np.all(lengths > 0) and np.all(zooms > 0) and not np.allclose(lengths, zooms, rtol=_SCALE_RTOL):
        log.debug(
            "%s: affine column lengths %s disagree with pixdim %s; using pixdim", img.get_filename(), lengths, zooms
        )
        affine[:3, :3] = affine[:3, :3] / lengths * zooms
    return affine


def _check_geometry(affine: np.ndarray, path: Path, zooms: Any = None) -> None:
    """Refuse a degenerate voxel grid (a zero pixdim or sform/qform column, NaN in the affine): every
    resampling and volume would be wrong, and nibabel's orientation code fails with a traceback."""
    lengths = np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)
    if not np.all(np.isfinite(affine)):
        raise InputFileError(f"{path}: the affine (sform/qform) holds NaN or Inf")
    if np.any(lengths <= 1e-9):
        axis = int(np.argmin(lengths))
        extra = f"; pixdim {tuple(float(z) for z in zooms)}" if zooms is not None else ""
        raise InputFileError(
            f"{path}: voxel axis {axis} has zero length in the affine (zero pixdim or sform/qform column{extra})"
        )
    if abs(np.linalg.det(np.asarray(affine, float)[:3, :3])) <= 1e-12:
        raise InputFileError(f"{path}: the affine's voxel axes are linearly dependent (degenerate sform/qform)")


def _select_frame(arr: np.ndarray, path: Path, frame: int | None) -> np.ndarray:
    """Reduce a NIfTI data array to 3-D (X, Y, Z), picking ``frame`` on a 4th (time) axis."""
    while arr.ndim > 3 and arr.shape[-1] == 1 and not (arr.ndim == 4 and frame is not None):
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim == 3:
        if frame is not None:
            raise InputFileError(f"{path}: frame={frame} given but the file is 3-D {arr.shape} (no time axis)")
        return arr
    if arr.ndim == 4:
        if frame is None:
            raise InputFileError(f"{path}: 4-D file {arr.shape} needs a frame index (time axis has {arr.shape[3]})")
        if not 0 <= frame < arr.shape[3]:
            raise InputFileError(f"{path}: frame {frame} out of range; the file has {arr.shape[3]} frames")
        return arr[..., frame]
    raise InputFileError(f"{path}: unsupported NIfTI dimensionality {arr.shape}")


def _read_nifti(path: Path, frame: int | None, as_label: bool) -> Volume:
    try:
        img = nib.load(str(path))
        affine = _fixed_affine(img)
        shape = img.shape
        sliced = len(shape) == 4 and frame is not None and 0 <= frame < shape[3]
        # Slicing the proxy avoids materialising (and scaling) every frame of a 4-D cine file.
        data = np.asarray(img.dataobj[..., frame]) if sliced else np.asanyarray(img.dataobj)
    except InputFileError:
        raise
    except Exception as err:  # nibabel / gzip / zlib / numpy raise many types for corrupt or truncated files
        raise InputFileError(f"{path}: cannot read NIfTI ({_one_line(err)})") from None
    _check_geometry(affine, path, img.header.get_zooms()[:3])
    data = _select_frame(data, path, None if sliced else frame)
    if not as_label:
        data = data.astype(np.float32, copy=False)
    arr, canon_affine = _canonical(data, affine)
    return _volume(arr, canon_affine, path)


def _canonical(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder (X, Y, Z) voxel axes to the closest canonical RAS+ orientation (what ``nib.as_closest_canonical``
    does), done on the array directly so any dtype (int64, bool) passes and no NIfTI image is built."""
    ornt = nib.orientations.io_orientation(affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return arr, affine
    out = nib.orientations.apply_orientation(arr, ornt)
    return out, affine @ nib.orientations.inv_ornt_aff(ornt, arr.shape)


def _volume(arr: np.ndarray, affine: np.ndarray, path: Path, spacing: bool = True) -> Volume:
    affine = np.asarray(affine, dtype=float)
    sp = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)) if spacing else None
    return Volume(array=np.ascontiguousarray(arr), affine=affine, spacing=sp, path=path)


# ------------------------------------------------------------------------------------- SimpleITK / DICOM


def _sitk_to_volume(image, path: Path, frame: int | None, as_label: bool) -> Volume:
    """Convert a SimpleITK image (LPS world, array Z,Y,X) to a canonical RAS Volume."""
    import SimpleITK as sitk  # noqa: N813

    dim = image.GetDimension()
    if dim == 4:
        if frame is None:
            raise InputFileError(f"{path}: 4-D image needs a frame index")
        size = image.GetSize()
        if not 0 <= frame < size[3]:
            raise InputFileError(f"{path}: frame {frame} out of range; the image has {size[3]} frames")
        image = sitk.Extract(image, [size[0], size[1], size[2], 0], [0, 0, 0, frame])
    elif frame is not None:
        raise InputFileError(f"{path}: frame={frame} given but the image is {dim}-D (no time axis)")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputFileError(f"{path}: multi-component (colour/vector) images are not supported")
    arr = sitk.GetArrayFromImage(image)  # (Z, Y, X) or (Y, X)
    arr = arr.T  # (X, Y, Z)
    ndim = image.GetDimension()
    spacing = np.ones(3)
    spacing[:ndim] = image.GetSpacing()
    origin = np.zeros(3)
    origin[:ndim] = image.GetOrigin()
    direction = np.eye(3)
    direction[:ndim, :ndim] = np.array(image.GetDirection()).reshape(ndim, ndim)
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing  # column j = direction of index axis j times its spacing
    lps[:3, 3] = origin
    ras = _LPS_TO_RAS @ lps
    _check_geometry(ras, path)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if not as_label:
        arr = arr.astype(np.float32, copy=False)
    arr, canon_affine = _canonical(arr, ras)
    return _volume(arr, canon_affine, path)


#: Largest relative deviation of one slice gap from the median gap before a series counts as uneven.
SLICE_GAP_RTOL = 0.05


def _dicom_series_files(path: Path) -> list[str]:
    """The files of the one DICOM series in folder ``path``, checked slice by slice.

    Every regular file in the folder must be a readable slice of the series, and the slice positions along
    the normal must be evenly spaced; else :class:`InputFileError` names the slice. (GDCM silently leaves an
    unreadable slice out and ITK only warns about a gap, which gave 9 slices at 9 mm instead of 10 at 8 mm.)
    """
    import SimpleITK as sitk  # noqa: N813

    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
    if not series:
        raise InputFileError(f"{path}: no DICOM series found in the directory")
    if len(series) > 1:
        raise InputFileError(f"{path}: {len(series)} DICOM series in one directory; give one series per directory")
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0]))
    listed = {os.path.realpath(f) for f in files}
    for f in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
        if os.path.realpath(f) not in listed:
            raise InputFileError(f"{f}: unreadable or foreign DICOM slice in series folder {path}")
    positions = []
    normal = None
    for f in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(f)
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise InputFileError(f"{f}: unreadable DICOM slice (series folder {path})") from None
        if normal is None:
            d = np.array(reader.GetDirection(), float).reshape(3, 3)
            normal = d[:, 2]
        positions.append(float(np.dot(np.array(reader.GetOrigin(), float), normal)))
    if len(files) > 2:
        order = np.argsort(positions)
        pos = np.array(positions)[order]
        gaps = np.diff(pos)
        median = float(np.median(gaps))
        if median <= 1e-6:
            raise InputFileError(f"{path}: DICOM slices share one position (duplicate slices?)")
        bad = np.flatnonzero(np.abs(gaps - median) > SLICE_GAP_RTOL * median)
        if bad.size:
            k = int(bad[0])
            after = files[order[k + 1]]
            raise InputFileError(
                f"{after}: uneven slice spacing in DICOM series {path}: gap {gaps[k]:.3g} mm before this slice, "
                f"{median:.3g} mm elsewhere (missing or extra slice?)"
            )
    return files


def _read_sitk(path: Path, frame: int | None, as_label: bool) -> Volume:
    import SimpleITK as sitk  # noqa: N813

    # ITK prints warnings (non-uniform sampling, …) straight to stderr; the checks above raise instead
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(_dicom_series_files(path))
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except InputFileError:
        raise
    except Exception as err:  # SimpleITK raises RuntimeError with a multi-line ITK message
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip() and "ITK" not in ln[:4]), "")
        raise InputFileError(f"{path}: cannot read image ({first or type(err).__name__})") from None
    return _sitk_to_volume(image, path, frame, as_label)


# ----------------------------------------------------------------------------------------------- PNG


def _read_png(path: Path, frame: int | None, as_label: bool) -> Volume:
    from PIL import Image, UnidentifiedImageError

    if frame is not None:
        raise InputFileError(f"{path}: frame={frame} given but PNG slices have no time axis")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.array(im)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise InputFileError(f"{path}: cannot read PNG ({_one_line(err)})") from None
    if mode in ("RGB", "RGBA", "LA"):
        colour = arr[..., : (1 if mode == "LA" else 3)]
        if mode != "LA" and not (
            np.array_equal(colour[..., 0], colour[..., 1]) and np.array_equal(colour[..., 0], colour[..., 2])
        ):
            raise InputFileError(f"{path}: colour PNG ({mode}) is not supported; save slices as grayscale")
        arr = colour[..., 0]
    elif mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1", "F"):
        raise InputFileError(f"{path}: unsupported PNG mode {mode}")
    if arr.ndim != 2:
        raise InputFileError(f"{path}: expected a 2-D PNG, got array shape {arr.shape}")
    if mode == "1":
        arr = arr.astype(np.uint8)
    arr = arr.T[:, :, None]  # (row, col) -> (X = col, Y = row, 1)
    if not as_label:
        arr = arr.astype(np.float32)
    return Volume(array=np.ascontiguousarray(arr), affine=np.eye(4), spacing=None, path=path)


# ------------------------------------------------------------------------------- Sunnybrook contours


def contour_image(contour: Path) -> Path:
    """The DICOM slice a Sunnybrook contour file belongs to: ``IM-0001-NNNN.dcm`` for
    ``IM-0001-NNNN-icontour-manual.txt``, looked up beside the contour, then anywhere under each of its
    three nearest ancestor folders (Sunnybrook keeps contours in ``<patient>/contours-manual/IRCCI-expert/``)."""
    stem = contour.name[: -len(CONTOUR_SUFFIX)] if contour.name.lower().endswith(CONTOUR_SUFFIX) else contour.stem
    stem = stem.replace("-ocontour-manual", "")
    for folder in (contour.parent, *list(contour.parent.parents)[:3]):
        same = folder / f"{stem}.dcm"
        if same.is_file():
            return same
        found = sorted(folder.rglob(f"{stem}.dcm"))
        if found:
            return found[0]
    top = list(contour.parent.parents)[:3][-1] if len(contour.parent.parents) else contour.parent
    raise InputFileError(f"{contour}: no DICOM slice {stem}.dcm for this contour beside it or under {top}")


def _read_points(path: Path) -> np.ndarray:
    try:
        text = path.read_text(encoding="ascii")
        pts = np.array([[float(v) for v in ln.split()[:2]] for ln in text.splitlines() if ln.strip()], float)
    except (OSError, UnicodeDecodeError, ValueError, IndexError) as err:
        raise InputFileError(f"{path}: not a contour file of 'x y' points ({_one_line(err)})") from None
    if pts.ndim != 2 or pts.shape[0] < 3 or pts.shape[1] != 2 or not np.all(np.isfinite(pts)):
        raise InputFileError(f"{path}: a contour needs at least 3 finite 'x y' points")
    return pts


def _fill(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """Polygon interior as a (rows, cols) bool mask; points are (x = column, y = row) in pixels."""
    from PIL import Image, ImageDraw

    canvas = Image.new("1", (width, height), 0)
    ImageDraw.Draw(canvas).polygon([(float(x), float(y)) for x, y in points], fill=1, outline=1)
    return np.array(canvas, dtype=bool)


def _read_contours(path: Path) -> Volume:
    """Rasterise a Sunnybrook slice's contours on its DICOM grid: inside the i-contour → LV blood pool,
    between it and the o-contour (when present) → LV myocardium (canonical codes)."""
    import SimpleITK as sitk  # noqa: N813

    from medsynth.labels import LV, MYO

    image_path = contour_image(path)
    try:
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
        image = sitk.ReadImage(str(image_path))
    except RuntimeError:
        raise InputFileError(f"{image_path}: unreadable DICOM slice (for contour {path.name})") from None
    width, height = image.GetSize()[:2]
    inner = _fill(_read_points(path), width, height)
    mask = np.zeros((height, width), np.uint8)
    outer_path = path.with_name(path.name.replace("-icontour-", "-ocontour-"))
    if outer_path.is_file():
        mask[_fill(_read_points(outer_path), width, height)] = MYO
    mask[inner] = LV
    label = sitk.GetImageFromArray(mask[None] if image.GetDimension() == 3 else mask)
    label.CopyInformation(image)
    return _sitk_to_volume(label, path, None, as_label=True)


# ------------------------------------------------------------------------------------------ public API


def _read(path: str | Path, frame: int | None, as_label: bool) -> Volume:
    path = Path(path)
    _check_exists(path)
    kind = _kind(path)
    if frame is not None and (isinstance(frame, bool) or not isinstance(frame, int | np.integer)):
        raise InputFileError(f"{path}: frame must be an integer, got {frame!r}")
    if frame is not None:
        frame = int(frame)
    if kind == "nifti":
        return _read_nifti(path, frame, as_label)
    if kind == "png":
        return _read_png(path, frame, as_label)
    if kind == "contour":
        if not as_label or frame is not None:
            raise InputFileError(f"{path}: a contour file is a label of one slice (no frame), not an image")
        return _read_contours(path)
    return _read_sitk(path, frame, as_label)


def read_volume(path: str | Path, frame: int | None = None) -> Volume:
    """Read an image as float32 (X, Y, Z) in closest-canonical RAS+ order with its affine and spacing (mm).

    ``frame`` selects the time point of a 4-D file (0-based) and must be ``None`` for 3-D files and PNGs.
    PNG slices come back as (X, Y, 1) with spacing ``None`` and an identity affine.
    """
    return _read(path, frame, as_label=False)


def read_label(path: str | Path, label_map: str, frame: int | None = None) -> Volume:
    """Read a label map and harmonise it to canonical codes (uint8, (X, Y, Z), RAS+).

    ``label_map`` names the source map (:data:`medsynth.labels.LABEL_MAPS`). Non-integer, NaN/Inf or
    unknown values raise :class:`~medsynth.errors.LabelError` naming the file.
    """
    vol = _read(path, frame, as_label=True)
    vol.array = harmonize(vol.array, label_map, source=str(vol.path))
    return vol


def read_pair(
    image_path: str | Path, label_path: str | Path, label_map: str, frame: int | None = None
) -> tuple[Volume, Volume]:
    """Read an image and its label map (same ``frame``) and validate them as a pair.

    Raises :class:`InputFileError` for NaN/Inf image voxels or an all-zero image, :class:`GeometryError`
    (naming both files) when
    shapes or affines (tolerance 1e-3 mm) differ, :class:`LabelError` when the label is all background.
    """
    image = read_volume(image_path, frame=frame)
    label = read_label(label_path, label_map, frame=frame)
    validate_pair(image, label)
    return image, label


def read_header(path: str | Path, frame: int | None = None) -> tuple[tuple[int, int, int], tuple[float, ...] | None]:
    """Canonical (X, Y, Z) shape and spacing (mm, or ``None`` for PNG) without reading voxel data where possible.

    NIfTI and PNG read only their headers; other formats are read in full. ``frame`` is checked like
    :func:`read_volume` does.
    """
    path = Path(path)
    _check_exists(path)
    kind = _kind(path)
    if kind == "nifti":
        try:
            img = nib.load(str(path))
            affine = _fixed_affine(img)
            shape = tuple(int(s) for s in img.shape)
        except Exception as err:
            raise InputFileError(f"{path}: cannot read NIfTI header ({_one_line(err)})") from None
        _check_geometry(affine, path, img.header.get_zooms()[:3])
        while len(shape) > 3 and shape[-1] == 1 and not (len(shape) == 4 and frame is not None):
            shape = shape[:-1]
        if len(shape) == 2:
            shape = (*shape, 1)
        if len(shape) == 4:
            if frame is None:
                raise InputFileError(f"{path}: 4-D file {shape} needs a frame index (time axis has {shape[3]})")
            if not 0 <= frame < shape[3]:
                raise InputFileError(f"{path}: frame {frame} out of range; the file has {shape[3]} frames")
            shape = shape[:3]
        elif len(shape) != 3:
            raise InputFileError(f"{path}: unsupported NIfTI dimensionality {shape}")
        elif frame is not None:
            raise InputFileError(f"{path}: frame={frame} given but the file is 3-D {shape} (no time axis)")
        ornt = nib.io_orientation(affine)
        axes = [int(a) for a in ornt[:, 0]]  # output axis i comes from input axis axes.index(i)
        canon_shape = [0, 0, 0]
        lengths = np.linalg.norm(affine[:3, :3], axis=0)
        canon_spacing = [0.0, 0.0, 0.0]
        for src, dst in enumerate(axes):
            canon_shape[dst] = shape[src]
            canon_spacing[dst] = float(lengths[src])
        return (canon_shape[0], canon_shape[1], canon_shape[2]), tuple(canon_spacing)
    if kind == "png":
        from PIL import Image, UnidentifiedImageError

        if frame is not None:
            raise InputFileError(f"{path}: frame={frame} given but PNG slices have no time axis")
        try:
            with Image.open(path) as im:
                width, height = im.size
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
            raise InputFileError(f"{path}: cannot read PNG ({_one_line(err)})") from None
        return (int(width), int(height), 1), None
    vol = _read(path, frame, as_label=kind == "contour")
    return (vol.shape[0], vol.shape[1], vol.shape[2]), vol.spacing
