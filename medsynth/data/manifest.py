"""The manifest: one CSV row per image–label pair (schema in ``data_manifests/README.md``).

Paths are relative POSIX paths under a *data root*. The root is resolved, first match wins:
an explicit ``data_root`` argument, the ``MEDSYNTH_DATA_ROOT`` environment variable, the optional first
line ``#medsynth-manifest data_root=<path>`` (relative to the manifest's folder), the manifest's folder.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
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
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path}: not a UTF-8 text manifest (byte {err.start} of the first line)") from None
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
    _read_header(path)
    with open(path, encoding="utf-8", errors="replace") as f:
        skip = 1 if f.readline().startswith(HEADER_PREFIX.strip()) else 0
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skiprows=skip, encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path}: not a UTF-8 text manifest ({err.reason} at byte {err.start})") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ManifestError(f"{path}: not a readable CSV manifest: {' '.join(str(err).split())}") from None
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
    # Lexically ('..' may not climb out), not through symlinks: a symlinked patient folder inside the root is
    # the user's choice and is followed.
    root_r = Path(os.path.abspath(root))
    full = Path(os.path.normpath(root_r / Path(*p.parts)))
    if full != root_r and root_r not in full.parents:
        raise ManifestError(f"{manifest}: path {rel!r} lies outside the data root {root}")
    return full


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_hash_memo: dict[tuple[str, int, int], str] = {}


def _default_hasher(path: Path) -> str:
    """SHA-256 of a file or DICOM folder, memoised per process on (path, size, mtime)."""
    from medsynth.utils.hashing import sha256_path

    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _hash_memo:
        _hash_memo[key] = sha256_path(path)
    return _hash_memo[key]


def field_problem(row: pd.Series) -> str | None:
    """The first schema violation of a row's fields (``data_manifests/README.md``), or None."""
    if not str(row["subject_id"]).strip():
        return "subject_id is empty"
    checks = (("modality", (*MODALITIES, "")), ("phase", (*PHASES, "")), ("split", SPLITS))
    for col, allowed in checks:
        if row[col] not in allowed:
            return f"{col} {row[col]!r} is not one of {[a for a in allowed if a]}" + (
                " or empty" if "" in allowed else ""
            )
    sha = row["sha256"]
    if sha and not _SHA256.match(sha):
        return f"sha256 {sha!r} is not 64 lower-case hex digits"
    return None


def validate_manifest(
    df: pd.DataFrame,
    root: Path,
    manifest: str | Path = "manifest",
    check_files: bool = True,
    lenient: bool = False,
    hasher: Callable[[Path], str] | None = None,
) -> pd.DataFrame:
    """Check fields, duplicates, paths, files, image hashes and split leakage; return the (filtered) rows.

    Fields follow the schema (non-empty ``subject_id``; ``modality``, ``phase``, ``split`` from their
    vocabularies; ``sha256`` empty or 64 hex digits). With ``check_files`` every file must exist (an image may
    be a DICOM series folder) and a non-empty ``sha256`` must match the image's content (``hasher``, default a
    per-process memo of :func:`medsynth.utils.hashing.sha256_path`). Strict mode raises
    :class:`ManifestError` on the first problem; lenient mode drops bad rows with a warning (a split that
    leaks a subject is always an error: it would silently bias every evaluation).
    """
    hasher = hasher or _default_hasher
    problems: list[tuple[int, str]] = []
    # M&Ms ED and ES rows share one 4-D file and differ by frame
    dup = df.duplicated(subset=[c for c in ("image", "label", "frame") if c in df.columns], keep="first")
    for i in df.index[dup]:
        problems.append((i, f"duplicate row for image {df.at[i, 'image']!r}"))
    for i, row in df.iterrows():
        if dup[i]:
            continue
        bad = field_problem(row)
        if bad:
            problems.append((i, bad))
            continue
        for col in ("image", "label"):
            if col == "label" and not row[col]:
                continue  # an image-only row (e.g. samples of an unconditional family)
            try:
                full = resolve_path(root, row[col], manifest)
            except ManifestError as err:
                problems.append((i, str(err).split(": ", 1)[1]))
                break
            # an image may be a DICOM series folder; a label is a file
            exists = full.is_file() or (col == "image" and full.is_dir())
            if check_files and not exists:
                problems.append((i, f"{col} file {full} is missing"))
                break
            if check_files and col == "image" and row["sha256"]:
                try:
                    actual = hasher(full)
                except OSError as err:
                    problems.append((i, f"image {full} cannot be read: {err.strerror}"))
                    break
                if actual != row["sha256"]:
                    problems.append(
                        (
                            i,
                            f"image {full}: content does not match the manifest's sha256 {row['sha256'][:12]}… "
                            f"(file is {actual[:12]}…; changed since the manifest was written?)",
                        )
                    )
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
    hasher: Callable[[Path], str] | None = None,
) -> tuple[pd.DataFrame, Path]:
    """Read, validate and return ``(rows, data_root)``; the usual entry point for commands."""
    df = read_manifest(path)
    root = resolve_data_root(path, data_root)
    return validate_manifest(df, root, path, check_files=check_files, lenient=lenient, hasher=hasher), root
