"""Surroundings partition: a few unsupervised tissue classes outside the heart labels.

Real label maps cover only the heart (LV, MYO, RV, scar, MVO); everything else is "background". To synthesise
whole images (body outline, lung, chest wall, liver, vessels) every real slice gets a *surroundings
partition*, found without labels by clustering intensity and position (the SynthSeg trick for unlabelled
tissue), and generated label maps (deformed real maps, shape-model maps) get one attached from a bank of
training partitions.

Partition codes, (H, W) uint8:

- ``0`` (:data:`HEART`): a heart pixel (canonical label != background); never a surroundings class;
- ``1`` (:data:`OUTSIDE`): outside the body: dark pixels connected to the image border (air);
- ``2 … K``: body classes in increasing order of mean intensity: ``2`` the darkest inside the body (lung,
  air in bowel), then e.g. muscle / liver / abdomen, and the brightest (fat, bright blood in vessels).

``K`` is ``n_classes`` (default 5). A class may be empty in a slice (e.g. no air in a tight crop). Codes are
ordered the same way in every slice, so class ``k`` means roughly the same tissue across slices and the GMM
can fit one intensity model per class. :func:`extend_labels` turns a canonical map plus a partition into one
*extended* label map, with heart codes unchanged and surroundings class ``k`` at code
``N_CLASSES + k - 1`` (:func:`surroundings_code`).

Use from any family (the GMM does this; image-generating networks can condition on the extended map):
:func:`partition_slices` on the training slices at fit, keep a bank (:func:`bank_indices`), and for new label
maps :func:`match_bank` (a bank slice whose heart matches) then :func:`attach_partition`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from medsynth.labels import BACKGROUND, N_CLASSES

HEART = 0
OUTSIDE = 1
DEFAULT_CLASSES = 5


def surroundings_code(k: int | np.ndarray) -> int | np.ndarray:
    """Extended label code of partition class ``k`` (1 … K): ``N_CLASSES + k - 1``."""
    return N_CLASSES + np.asarray(k) - 1 if isinstance(k, np.ndarray) else N_CLASSES + int(k) - 1


def _kmeans(feat: np.ndarray, init: np.ndarray, n_iter: int = 25) -> np.ndarray:
    """Lloyd's k-means from fixed initial centres (deterministic): centres (k, F) for ``feat`` (N, F)."""
    centres = init.astype(np.float64).copy()
    for _ in range(n_iter):
        d = ((feat[:, None, :] - centres[None]) ** 2).sum(axis=2)
        assign = d.argmin(axis=1)
        new = centres.copy()
        for j in range(centres.shape[0]):
            sel = assign == j
            if sel.any():
                new[j] = feat[sel].mean(axis=0)
        if np.allclose(new, centres):
            break
        centres = new
    return centres


def surroundings_partition(
    image: np.ndarray,
    labels: np.ndarray,
    n_classes: int = DEFAULT_CLASSES,
    seed: int = 0,
    position_weight: float = 0.25,
    smooth_px: float = 1.5,
    min_region_px: int = 12,
    max_pixels: int = 20000,
) -> np.ndarray:
    """Surroundings partition (H, W) uint8 of one slice (codes in the module docstring).

    ``image`` (H, W) float (any intensity scale), ``labels`` (H, W) canonical codes. Features per background
    pixel: intensity smoothed at 1 px and 3 px (standardised by the surroundings' SD) and position (rows and
    columns scaled to [-1, 1], times ``position_weight``, which keeps clusters spatially compact). ``K - 1``
    k-means clusters (initial centres at intensity quantiles, fitted on at most ``max_pixels`` pixels drawn
    with ``seed``) are ordered by intensity, cleaned by a majority vote over a ``smooth_px`` Gaussian
    neighbourhood and by absorbing regions under ``min_region_px`` into their surroundings; the border-connected
    part of the darkest cluster becomes :data:`OUTSIDE`. Deterministic: same inputs and seed → same bytes.
    Every background pixel gets a class in 1 … K; heart pixels are 0.
    """
    image = np.asarray(image, dtype=np.float64)
    labels = np.asarray(labels)
    if image.ndim != 2 or labels.shape != image.shape:
        raise ValueError(f"image/labels: expected two (H, W) arrays of one shape, got {image.shape}, {labels.shape}")
    if n_classes < 2:
        raise ValueError(f"n_classes: must be >= 2 (outside + at least one body class), got {n_classes}")
    if not np.all(np.isfinite(image)):
        raise ValueError("image: contains NaN/Inf")
    h, w = image.shape
    bg = labels == BACKGROUND
    out = np.zeros((h, w), dtype=np.uint8)
    if not bg.any():
        return out
    k = n_classes - 1
    fine = ndimage.gaussian_filter(image, 1.0, mode="nearest")
    coarse = ndimage.gaussian_filter(image, 3.0, mode="nearest")
    spread = float(fine[bg].std()) or 1.0
    yy, xx = np.meshgrid(np.linspace(-1.0, 1.0, h), np.linspace(-1.0, 1.0, w), indexing="ij")
    feat = np.stack(
        [fine[bg] / spread, coarse[bg] / spread, position_weight * yy[bg], position_weight * xx[bg]], axis=1
    )
    rng = np.random.default_rng(seed)
    fit = feat if len(feat) <= max_pixels else feat[np.sort(rng.choice(len(feat), max_pixels, replace=False))]
    # initial centres: pixels at the intensity quantiles (i + 0.5) / k, so cluster j starts j-th darkest
    order = np.argsort(fit[:, 0], kind="stable")
    init = fit[order[((np.arange(k) + 0.5) / k * (len(fit) - 1)).astype(int)]]
    centres = _kmeans(fit, init)
    rank = np.argsort(np.argsort(centres[:, 0], kind="stable"), kind="stable")  # cluster → intensity rank
    assign = rank[((feat[:, None, :] - centres[None]) ** 2).sum(axis=2).argmin(axis=1)]
    cls = np.full((h, w), -1, dtype=np.int64)
    cls[bg] = assign
    # majority vote in a Gaussian neighbourhood: organ-sized regions instead of salt-and-pepper borders
    if smooth_px > 0:
        votes = np.stack([ndimage.gaussian_filter((cls == j).astype(np.float32), smooth_px) for j in range(k)])
        cls[bg] = votes[:, bg].argmax(axis=0)
    cls = _absorb_small(cls, bg, k, min_region_px)
    # body classes 2..K; the border-connected part of the darkest cluster is outside the body
    out[bg] = (cls[bg] + 2).astype(np.uint8)
    dark = cls == 0
    comp, n_comp = ndimage.label(dark, structure=np.ones((3, 3), bool))
    if n_comp:
        edge = np.unique(np.concatenate([comp[0], comp[-1], comp[:, 0], comp[:, -1]]))
        edge = edge[edge > 0]
        sizes = np.bincount(comp.ravel(), minlength=n_comp + 1)
        edge = edge[sizes[edge] >= min_region_px]
        out[np.isin(comp, edge) & dark] = OUTSIDE
    out[~bg] = HEART
    return _reorder(out, image, n_classes)


def _absorb_small(cls: np.ndarray, bg: np.ndarray, k: int, min_px: int) -> np.ndarray:
    """Regions (8-connected) under ``min_px`` pixels take the class of the nearest pixel outside them."""
    if min_px <= 1:
        return cls
    small = np.zeros(cls.shape, dtype=bool)
    for j in range(k):
        comp, n = ndimage.label(cls == j, structure=np.ones((3, 3), bool))
        if n:
            sizes = np.bincount(comp.ravel(), minlength=n + 1)
            small |= (sizes[comp] < min_px) & (comp > 0)
    keep = bg & ~small
    if small.any() and keep.any():
        _, (iy, ix) = ndimage.distance_transform_edt(~keep, return_indices=True)
        cls = cls.copy()
        cls[small] = cls[iy[small], ix[small]]
    return cls


def _reorder(part: np.ndarray, image: np.ndarray, n_classes: int) -> np.ndarray:
    """Re-rank body classes 2..K by their mean intensity in this slice (cleanup can move pixels between
    classes); outside stays 1, heart 0, empty classes keep their rank."""
    means = []
    for c in range(2, n_classes + 1):
        sel = part == c
        means.append(float(image[sel].mean()) if sel.any() else np.inf)
    order = np.argsort(np.asarray(means), kind="stable")
    if np.array_equal(order, np.arange(len(order))):
        return part
    lut = np.arange(n_classes + 1, dtype=np.uint8)
    lut[2 + order] = 2 + np.arange(len(order), dtype=np.uint8)
    return lut[part]


def partition_slices(
    images: np.ndarray, labels: np.ndarray, n_classes: int = DEFAULT_CLASSES, seed: int = 0
) -> np.ndarray:
    """Partitions (N, H, W) uint8 of slices ``images`` (N, 1, H, W) or (N, H, W) with labels (N, H, W); slice
    ``i`` uses seed ``seed + i`` (only its k-means subsample depends on it)."""
    images = np.asarray(images)
    if images.ndim == 4:
        images = images[:, 0]
    if images.shape != np.asarray(labels).shape:
        raise ValueError(f"images/labels: shapes {images.shape} and {np.asarray(labels).shape} differ")
    return (
        np.stack([surroundings_partition(images[i], labels[i], n_classes, seed + i) for i in range(images.shape[0])])
        if len(images)
        else np.zeros(images.shape, dtype=np.uint8)
    )


def _resample_nearest(part: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if part.shape == tuple(shape):
        return part
    iy = np.minimum(((np.arange(shape[0]) + 0.5) * part.shape[0] / shape[0]).astype(int), part.shape[0] - 1)
    ix = np.minimum(((np.arange(shape[1]) + 0.5) * part.shape[1] / shape[1]).astype(int), part.shape[1] - 1)
    return part[np.ix_(iy, ix)]


def fit_to_heart(part: np.ndarray, labels: np.ndarray, fill: int = 3, exclude: tuple[int, ...] = ()) -> np.ndarray:
    """Make a partition (H, W) consistent with heart ``labels`` (H, W): its own heart hole (code 0) is filled
    with the nearest surroundings class (what surrounded that heart: pericardial fat, lung, liver …) other
    than the classes in ``exclude`` (e.g. blood-bright classes, which next to a new heart would look like an
    unlabelled ventricle), then the new heart pixels are set to 0. A partition without any usable
    surroundings pixel becomes ``fill`` everywhere."""
    part = np.asarray(part, dtype=np.uint8)
    hole = part == HEART
    source = ~hole & ~np.isin(part, exclude)
    if not source.any():
        source = ~hole
    if not source.any():
        filled = np.full(part.shape, fill, dtype=np.uint8)
    elif hole.any():
        _, (iy, ix) = ndimage.distance_transform_edt(~source, return_indices=True)
        filled = np.where(hole, part[iy, ix], part)
    else:
        filled = part.copy()
    filled[np.asarray(labels) != BACKGROUND] = HEART
    return filled


def attach_partition(
    labels: np.ndarray,
    bank: np.ndarray,
    rng: np.random.Generator,
    index: np.ndarray | None = None,
    rotate_deg: float = 10.0,
    scale: float = 0.08,
    translate_px: float = 5.0,
    exclude: tuple[int, ...] = (),
) -> np.ndarray:
    """Partitions (n, H, W) uint8 for canonical label maps ``labels`` (n, H, W) from a ``bank`` (B, H', W') of
    training partitions.

    Each map gets bank entry ``index[i]`` (default: uniform draws from ``rng``), resampled to (H, W) if the
    bank has another size, moved by a random in-plane affine (rotation ±``rotate_deg``, zoom 1±``scale``,
    shift ±``translate_px`` px, nearest neighbour, edges extended) and made consistent with the map's heart
    by :func:`fit_to_heart` (``exclude``: classes not used to fill the bank heart's place): heart pixels are
    0 and every background pixel has a class (preprocessed slices are centred on the heart, so bank and map
    hearts roughly coincide). Deterministic given ``rng``.
    """
    labels = np.asarray(labels)
    bank = np.asarray(bank)
    if labels.ndim != 3:
        raise ValueError(f"labels: expected (n, H, W), got {labels.shape}")
    if bank.ndim != 3 or len(bank) == 0:
        raise ValueError(f"bank: expected a non-empty (B, H, W) array, got {bank.shape}")
    n, h, w = labels.shape
    if index is None:
        index = rng.integers(0, len(bank), size=n)
    index = np.asarray(index)
    if index.shape != (n,) or (n and (index.min() < 0 or index.max() >= len(bank))):
        raise ValueError(f"index: expected ({n},) entries in [0, {len(bank)})")
    out = np.zeros((n, h, w), dtype=np.uint8)
    centre = (np.array([h, w]) - 1) / 2.0
    for i in range(n):
        part = _resample_nearest(bank[index[i]], (h, w))
        t = np.deg2rad(rng.uniform(-rotate_deg, rotate_deg))
        m = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]) / (1.0 + rng.uniform(-scale, scale))
        shift = rng.uniform(-translate_px, translate_px, size=2)
        offset = centre - m @ (centre + shift)
        part = ndimage.affine_transform(part, m, offset=offset, order=0, mode="nearest")
        out[i] = fit_to_heart(part, labels[i], exclude=exclude)
    return out


def match_bank(
    labels: np.ndarray, bank: np.ndarray, rng: np.random.Generator, top: int = 5, candidates: np.ndarray | None = None
) -> np.ndarray:
    """Bank indices (n,) for label maps (n, H, W): for each map, one of the ``top`` bank partitions (B, H', W')
    whose heart (code 0) overlaps the map's heart best (Dice of the masks on a 4× coarser grid), drawn with
    ``rng``. A partition that held a heart of similar size, shape and position has the surroundings of that
    heart (basal slices: atria and great vessels; apical: liver), instead of a random slice's.
    ``candidates`` restricts the choice to those bank indices (e.g. one contrast group)."""
    labels = np.asarray(labels)
    bank = np.asarray(bank)
    if labels.ndim != 3 or bank.ndim != 3 or len(bank) == 0:
        raise ValueError(f"labels/bank: expected (n, H, W) and non-empty (B, H, W), got {labels.shape}, {bank.shape}")
    pool = np.arange(len(bank)) if candidates is None else np.asarray(candidates, dtype=np.int64)
    if pool.size == 0:
        pool = np.arange(len(bank))
    h, w = labels.shape[1:]
    size = (max(1, h // 4), max(1, w // 4))
    heart = np.stack([_resample_nearest((lab != BACKGROUND).astype(np.uint8), size) for lab in labels])
    bank_heart = np.stack([_resample_nearest((bank[b] == HEART).astype(np.uint8), size) for b in pool])
    a = heart.reshape(len(labels), -1).astype(np.float32)
    b = bank_heart.reshape(len(pool), -1).astype(np.float32)
    dice = 2 * (a @ b.T) / np.maximum(a.sum(1)[:, None] + b.sum(1)[None, :], 1.0)
    k = min(top, len(pool))
    best = np.argsort(-dice, axis=1, kind="stable")[:, :k]
    pick = best[np.arange(len(labels)), rng.integers(0, k, size=len(labels))]
    return pool[pick]


def extend_labels(labels: np.ndarray, partition: np.ndarray) -> np.ndarray:
    """Extended label map (any shape, uint8): canonical heart codes where ``labels`` != background, else
    :func:`surroundings_code` of the partition class. Background pixels with partition 0 (none should be
    left by :func:`surroundings_partition` / :func:`attach_partition`) stay 0."""
    labels = np.asarray(labels)
    partition = np.asarray(partition)
    if labels.shape != partition.shape:
        raise ValueError(f"labels/partition: shapes {labels.shape} and {partition.shape} differ")
    ext = labels.astype(np.uint8, copy=True)
    sel = (labels == BACKGROUND) & (partition != HEART)
    ext[sel] = (N_CLASSES - 1 + partition[sel]).astype(np.uint8)
    return ext


def bank_indices(n_slices: int, size: int) -> np.ndarray:
    """Evenly spaced slice indices (at most ``size``) kept in a partition bank: deterministic, spans subjects."""
    if n_slices <= size:
        return np.arange(n_slices)
    return np.unique(np.linspace(0, n_slices - 1, size).round().astype(int))
