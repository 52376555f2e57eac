"""Atomic outputs: build in a temporary sibling, rename into place only when complete.

A crash, an exception or Ctrl-C leaves the previous output (or nothing), never a half-written one.

Every folder :func:`atomic_dir` creates carries the marker file :data:`MARKER` ("medsynth made this");
:func:`atomic_dir` replaces an existing folder only when it is empty or carries that marker, and never
replaces a plain file, so a library call can not delete what medsynth did not write. Temporary siblings are
named ``.<name>.tmp-*`` (and ``.<name>.old-*`` while an old version is swapped out); a run killed with
``kill -9`` leaves them behind and :func:`medsynth.utils.outputs.clean_leftovers` removes them on the next
run on that output.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from medsynth.errors import MedsynthError

#: Name of the marker file in every folder medsynth writes (content is fixed: runs stay byte-identical).
MARKER = ".medsynth"
MARKER_TEXT = "This folder was written by medsynth; medsynth replaces it only with --overwrite.\n"


class OutputError(MedsynthError):
    """An output path can not be written: not medsynth's, in use, inside an input, or not writable."""


def _read_umask() -> int:
    # os.umask can only be read by setting it, which is not thread-safe (a thread creating a file in between
    # would get mode 0666/0777): read it once at import, or from /proc where the kernel reports it.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


def has_marker(path: str | Path) -> bool:
    """True when ``path`` is a folder medsynth wrote (it holds :data:`MARKER`)."""
    return (Path(path) / MARKER).is_file()


def write_marker(folder: str | Path) -> None:
    """Mark ``folder`` as medsynth's (idempotent; fixed content so two runs stay byte-identical)."""
    marker = Path(folder) / MARKER
    if not marker.is_file():
        marker.write_text(MARKER_TEXT, encoding="utf-8")
        os.chmod(marker, FILE_MODE)


def _normalise_modes(root: Path) -> None:
    """Give every file and folder under ``root`` the usual modes: some writers (safetensors, mkstemp) create
    0600 files, and identical runs must give identical folders, modes included."""
    os.chmod(root, DIR_MODE)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                os.chmod(p, DIR_MODE)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, FILE_MODE)


def _check_replaceable(target: Path) -> None:
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise OutputError(f"{target}: exists and is not a folder medsynth wrote; refusing to replace it")
    if target.is_dir() and not has_marker(target) and any(target.iterdir()):
        raise OutputError(f"{target}: is a non-empty folder medsynth did not write; refusing to replace it")


# Linux renameat2(RENAME_EXCHANGE): swaps two paths in one step, so the target is never missing.
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _renameat2 = _libc.renameat2
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    _renameat2.restype = ctypes.c_int
except (OSError, AttributeError):  # not glibc >= 2.28 / not Linux: the rename loop below still works
    _renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap ``a`` and ``b``; False when the platform or file system can not (then use renames)."""
    global _renameat2
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        _renameat2 = None  # file system without RENAME_EXCHANGE: fall back for good
        return False
    raise OSError(err, os.strerror(err), str(b))


def _install(tmp: Path, target: Path) -> None:
    """Put the finished ``tmp`` folder at ``target``, replacing what is there; safe against concurrent writers.

    Several processes may finish the same target at once (parallel stage runs, Dask workers); each attempt
    either renames into an absent target or swaps with the present one, and the loser of a race retries
    rather than failing with ``Directory not empty`` / ``FileNotFoundError``.
    """
    for _ in range(10_000):
        try:
            os.rename(tmp, target)  # target absent (or an empty folder): done
            return
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
                raise
        # target exists: swap it out atomically, or move it aside and retry the rename
        try:
            if _exchange(tmp, target):
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old version
                return
        except FileNotFoundError:
            continue  # another writer moved the target away in between: rename again
        old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(target, old)
        except FileNotFoundError:
            continue
        shutil.rmtree(old, ignore_errors=True)
    raise OSError(errno.EBUSY, "could not install the output after many concurrent attempts", str(target))


def _make_parent(target: Path) -> None:
    """Create ``target``'s parent folder, turning the usual failures into one :class:`OutputError` line."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputError(f"{target}: a parent of the output is a file, not a folder") from None
    except OSError as err:
        raise OutputError(f"{target}: cannot create the output's folder ({err.strerror})") from None


@contextlib.contextmanager
def atomic_dir(target: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory next to ``target``; on success it replaces ``target``.

    The temporary directory lives in the same parent so the final step is a rename. It gets the marker
    :data:`MARKER`, and every file in it the usual mode (0666 less the umask). An existing ``target`` is
    replaced only when it is an empty folder or one medsynth wrote (else :class:`OutputError`); with
    ``overwrite=False`` any existing target is an error.
    """
    target = Path(target)
    _make_parent(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target}: already exists")
    _check_replaceable(target)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as err:
        raise OutputError(f"{target}: cannot write into {target.parent} ({err.strerror})") from None
    try:
        write_marker(tmp)
        yield tmp
        _normalise_modes(tmp)
        _check_replaceable(target)  # again: something may have appeared there while we were building
        _install(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary file path next to ``target``; on success it replaces ``target``."""
    target = Path(target)
    _make_parent(target)
    if target.is_dir():
        raise OutputError(f"{target}: is a folder, expected a file path")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent, suffix="".join(target.suffixes))
    except OSError as err:
        raise OutputError(f"{target}: cannot write into {target.parent} ({err.strerror})") from None
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, FILE_MODE)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, FILE_MODE)  # a writer may have replaced the file with its own (0600) one
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
