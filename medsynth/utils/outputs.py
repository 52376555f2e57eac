"""Output safety: never delete what medsynth did not write, one writer per output, no leftovers.

The CLI (:mod:`medsynth.cli.main`) runs :func:`check_outputs` and takes :class:`OutputLock` before every
command that writes ``--out``:

- a folder output may replace an existing folder only when it carries medsynth's marker
  (:data:`medsynth.utils.atomic.MARKER`) *and* ``--overwrite`` is given; an empty folder is fine;
- a single-file output (a manifest CSV) may replace an existing file only when it is a manifest medsynth
  wrote (its first line is the ``#medsynth-manifest`` header or medsynth's column row) and ``--overwrite``
  is given;
- an output that is or contains an input (manifest, model, config, data root, the manifest's folder) is
  refused; a folder output that lies inside a data root is refused too, unless a folder medsynth wrote
  (a phantom dataset, a run folder) holds it (a manifest CSV may sit beside its data);
- the output's parent must be a writable folder;
- a lock file ``.<name>.medsynth-lock`` beside the output holds the PID of the process writing it; a second
  process refuses, naming that PID. The lock is an ``flock``: a killed holder releases it, so a stale lock
  file is taken over;
- with the lock held, ``.<name>.tmp-*`` / ``.<name>.old-*`` temporaries of killed runs are removed
  (:func:`clean_leftovers`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from medsynth.utils.atomic import OutputError, has_marker

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".medsynth-lock"


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def is_medsynth_file(path: str | Path) -> bool:
    """True when ``path`` is a manifest medsynth wrote: ``#medsynth-manifest`` header or medsynth's column row."""
    from medsynth.data.manifest import COLUMNS, HEADER_PREFIX

    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
    except (OSError, UnicodeDecodeError):
        return False
    return first.startswith(HEADER_PREFIX.strip()) or first.rstrip("\r\n").startswith(",".join(COLUMNS))


def _marked_ancestor(path: Path, stop: Path) -> bool:
    """True when ``path`` or a folder between it and ``stop`` (inclusive) carries the medsynth marker."""
    for p in (path, *path.parents):
        if p.is_dir() and has_marker(p):
            return True
        if p == stop:
            break
    return False


def check_outputs(
    targets: Iterable[str | Path],
    inputs: Iterable[str | Path] = (),
    data_dirs: Iterable[str | Path] = (),
    overwrite: bool = False,
    kind: str = "dir",
) -> None:
    """Refuse (:class:`OutputError`) to write ``targets`` where that could lose data; see the module docstring.

    ``inputs`` are files or folders the command reads (it must not replace them or their parents);
    ``data_dirs`` are folders whose content is the user's data (outputs must not go inside them unless
    medsynth wrote the folder). ``kind`` is ``dir`` or ``file``.
    """
    inputs = [_real(p) for p in inputs if p]
    data_dirs = [_real(p) for p in data_dirs if p]
    for target in targets:
        t = _real(target)
        name = str(target)
        for inp in inputs + data_dirs:
            if _within(inp, t):
                what = "is" if inp == t else "contains"
                raise OutputError(f"{name}: the output {what} the input {inp}; refusing to replace it")
        for d in data_dirs if kind == "dir" else ():  # a manifest may sit beside its data; a folder may not
            if _within(t, d) and not _marked_ancestor(t.parent, d):
                raise OutputError(f"{name}: the output lies inside the input data folder {d}; write it elsewhere")
        parent = t.parent
        for p in (parent, *parent.parents):  # the first existing ancestor must be a writable folder
            if p.exists() or p.is_symlink():
                if not p.is_dir():
                    raise OutputError(f"{name}: {p} is a file, not a folder")
                if not os.access(p, os.W_OK | os.X_OK):
                    raise OutputError(f"{name}: cannot write into {p} (permission denied)")
                break
        if not (t.exists() or t.is_symlink()):
            continue
        if kind == "file":
            if t.is_dir():
                raise OutputError(f"{name}: is a folder; give a file path for this output")
            if not is_medsynth_file(t):
                raise OutputError(
                    f"{name}: exists and medsynth did not write it (not a medsynth manifest); refusing to replace it"
                )
        else:
            if t.is_symlink() or not t.is_dir():
                raise OutputError(
                    f"{name}: exists and is a file medsynth did not write; refusing to replace it with a folder"
                )
            if not any(t.iterdir()):
                continue
            if not has_marker(t):
                raise OutputError(
                    f"{name}: exists and is a folder medsynth did not write (no .medsynth marker); "
                    "refusing to replace it"
                )
        if not overwrite:
            raise OutputError(f"{name}: exists (an earlier medsynth output); pass --overwrite to replace it")


def lock_path(target: str | Path) -> Path:
    t = Path(os.path.abspath(os.fspath(target)))
    return t.parent / f".{t.name}{LOCK_SUFFIX}"


class OutputLock:
    """Exclusive lock on an output path for the lifetime of one process (``with OutputLock(out): ...``).

    The lock file holds the holder's PID. A second process raises :class:`OutputError` naming it. The lock is
    released (and its file removed) on exit, and by the kernel when the holder dies.
    """

    def __init__(self, target: str | Path) -> None:
        self.target = Path(target)
        self.path = lock_path(target)
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise OutputError(f"{self.target}: cannot write into {self.path.parent} ({err.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                pid = self._holder()
                raise OutputError(
                    f"{self.target}: in use by medsynth process {pid or '?'} (lock {self.path}); wait for it or "
                    "choose another --out"
                ) from None
            # the previous holder may have removed the file between our open and flock: lock the live one
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def _holder(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8").strip()
        except OSError:
            return ""

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # while still locked, so no one else holds the unlinked inode
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def clean_leftovers(target: str | Path, recursive: bool = False) -> list[Path]:
    """Remove ``.<name>.tmp-*`` / ``.<name>.old-*`` temporaries of killed runs next to ``target`` (and, with
    ``recursive``, every ``.*.tmp-*`` / ``.*.old-*`` inside it, e.g. a run's work folder). Call with the
    output's lock held. Returns what was removed."""
    t = Path(target)
    removed: list[Path] = []
    if t.parent.is_dir():
        for p in t.parent.iterdir():
            if p.name.startswith((f".{t.name}.tmp-", f".{t.name}.old-")):
                removed.append(p)
    if recursive and t.is_dir():
        for dirpath, dirnames, filenames in os.walk(t):
            for n in list(dirnames) + filenames:
                if n.startswith(".") and (".tmp-" in n or ".old-" in n):
                    removed.append(Path(dirpath) / n)
            dirnames[:] = [d for d in dirnames if not (d.startswith(".") and (".tmp-" in d or ".old-" in d))]
    for p in removed:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        log.info("removed %s (left by an interrupted run)", p)
    return removed
