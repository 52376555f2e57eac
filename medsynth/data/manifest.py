"""The manifest: one CSV row per image–label pair (schema in ``data_manifests/README.md``).

Paths are relative POSIX paths under a *data root*. The root is resolved, first match wins:
an explicit ``data_root`` argument, the ``MEDSYNTH_DATA_ROOT`` environment variable, the optional first
line ``#medsynth-manifest data_root=<path>`` (relative to the manifest's folder), the manifest's folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path, PurePosixPath

import pandas as pd

from medsynth.errors import ManifestError
from medsynth.utils.atomic import atomic_file

log = logging.getLogger(__name__)

#: Required columns, in order.
COLUMNS: tuple[str, ...] = (
    "subject_id",
    "image",
    "label",
    "dataset",
    "modality",
    "vendor",
    "phase",
    "pathology",
    "label_map",
    "spacing",
    "shape",
    "split",
    "sha256",
)
#: Optional columns with provenance and layout detail; kept when present.
OPTIONAL_COLUMNS: tuple[str, ...] = (
    "frame",
    "slice_index",
    "source",  # real | synthetic
    "family",
    "model_hash",
    "seed",
    "source_case",
    "config_hash",
)
MODALITIES = ("cine", "lge", "t1", "t2", "other")
PHASES = ("ED", "ES", "none")
SPLITS = ("train", "val", "test", "")
HEADER_PREFIX = "#medsynth-manifest "


def resolve_data_root(manifest_path: str | Path, data_root: str | Path | None = None) -> Path:
    """The folder the manifest's relative paths are resolved against (see module docstring)."""
    manifest_path = Path(manifest_path)
    if data_root is not None:
        return Path(data_root)
    env = os.environ.get("MEDSYNTH_DATA_ROOT")
    if env:
        return Path(env)
    header = _read_header(manifest_path)
    if "data_root" in header:
        return (manifest_path.parent / header["data_root"]).resolve()
    return manifest_path.parent.resolve()


def _read_header(path: Path) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
    except OSError as err:
        raise ManifestError(f"{path}: cannot read manifest: {err.strerror}") from None
    if not first.startswith(HEADER_PREFIX):
        return {}
    items = first[len(HEADER_PREFIX) :].strip().split()
    return dict(item.split("=", 1) for item in items if "=" in item)


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest CSV (all columns as strings, missing → ''), checking the required columns."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    skip = 1 if _read_header(path) else 0
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skiprows=skip)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: not a readable CSV manifest: {err}") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{path}: missing required column(s) {missing}")
    return df


def write_manifest(df: pd.DataFrame, path: str | Path, data_root: str | Path | None = None) -> Path:
    """Write a manifest atomically; with ``data_root`` record it (relative to the file) in the header."""
    path = Path(path)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{path}: refusing to write a manifest without column(s) {missing}")
    ordered = list(COLUMNS) + [c for c in df.columns if c not in COLUMNS]
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        if data_root is not None:
            rel = os.path.relpath(Path(data_root).resolve(), path.parent.resolve())
            f.write(f"{HEADER_PREFIX}data_root={PurePosixPath(Path(rel).as_posix())}\n")
        df[ordered].to_csv(f, index=False)
    return path


def resolve_path(root: Path, rel: str, manifest: str | Path = "manifest") -> Path:
    """Resolve a manifest path under ``root``; refuse absolute paths and paths escaping the root."""
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or Path(rel).is_absolute():
        raise ManifestError(f"{manifest}: path {rel!r} must be relative to the data root {root}")
    full = (root / Path(*p.parts)).resolve()
    root_r = root.resolve()
    if full != root_r and root_r not in full.parents:
        raise ManifestError(f"{manifest}: path {rel!r} lies outside the data root {root}")
    return full


def validate_manifest(
    df: pd.DataFrame,
    root: Path,
    manifest: str | Path = "manifest",
    check_files: bool = True,
    lenient: bool = False,
) -> pd.DataFrame:
    """Check duplicates, paths, files and split leakage; return the (possibly filtered) rows.

    Strict mode raises :class:`ManifestError` on the first problem; lenient mode drops bad rows with a
    warning (a split that leaks a subject is always an error: it would silently bias every evaluation).
    """
    problems: list[tuple[int, str]] = []
    # M&Ms ED and ES rows share one 4-D file and differ by frame
    dup = df.duplicated(subset=[c for c in ("image", "label", "frame") if c in df.columns], keep="first")
    for i in df.index[dup]:
        problems.append((i, f"duplicate row for image {df.at[i, 'image']!r}"))
    for i, row in df.iterrows():
        if dup[i]:
            continue
        for col in ("image", "label"):
            if col == "label" and not row[col]:
                continue  # an image-only row (e.g. samples of an unconditional family)
            try:
                full = resolve_path(root, row[col], manifest)
            except ManifestError as err:
                problems.append((i, str(err).split(": ", 1)[1]))
                break
            if check_files and not full.is_file():
                problems.append((i, f"{col} file {full} is missing"))
                break
    if problems and not lenient:
        i, msg = problems[0]
        more = f" (and {len(problems) - 1} more problem rows)" if len(problems) > 1 else ""
        raise ManifestError(f"{manifest}: row {i + 1}: {msg}{more}")
    for i, msg in problems:
        log.warning("%s: row %d skipped: %s", manifest, i + 1, msg)
    out = df.drop(index=[i for i, _ in problems])
    check_split_leakage(out, manifest)
    return out


def check_split_leakage(df: pd.DataFrame, manifest: str | Path = "manifest") -> None:
    """Raise if any subject appears in more than one non-empty split."""
    if "split" not in df.columns:
        return
    assigned = df[df["split"] != ""]
    per_subject = assigned.groupby("subject_id")["split"].nunique()
    leaky = per_subject[per_subject > 1]
    if len(leaky):
        raise ManifestError(
            f"{manifest}: subject(s) {list(leaky.index[:5])} appear in more than one split; splits must be "
            "patient-level"
        )


def load_manifest(
    path: str | Path,
    data_root: str | Path | None = None,
    check_files: bool = True,
    lenient: bool = False,
) -> tuple[pd.DataFrame, Path]:
    """Read, validate and return ``(rows, data_root)``; the usual entry point for commands."""
    df = read_manifest(path)
    root = resolve_data_root(path, data_root)
    return validate_manifest(df, root, path, check_files=check_files, lenient=lenient), root
