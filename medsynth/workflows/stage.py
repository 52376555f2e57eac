"""Idempotent, content-addressed pipeline stages.

``run_stage(work, name, inputs, build)`` hashes ``inputs`` (small JSON records: paths, artefact hashes,
config dicts) into a key, and builds into ``<work>/<name>/<key>/`` through an atomic directory. A stage
that finished before is recognised by its ``done.json`` and not run again — the artefacts on disk are the
cache, so a rerun after a crash resumes at the first unfinished stage whatever the orchestrator.

Input files are part of the key: :func:`file_hashes` gives their content hashes, re-hashing a file only when
its size or mtime changed since the last run (a small JSON cache ``<work>/file_hashes.json``, never pickle).

Test hook: ``MEDSYNTH_FAULT_AT=<stage name>`` makes :func:`run_stage` kill its own process with SIGKILL
right after building that stage (before it is renamed into place), to test recovery from ``kill -9``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from medsynth import __version__
from medsynth.utils.atomic import atomic_dir, atomic_file
from medsynth.utils.hashing import sha256_json, sha256_path

log = logging.getLogger(__name__)

DONE = "done.json"
HASH_CACHE = "file_hashes.json"
FAULT_ENV = "MEDSYNTH_FAULT_AT"
_hash_lock = threading.Lock()


def _stat_key(path: Path) -> list[int]:
    """Size and mtime (ns) of a file, or of every file in a folder (summed sizes, latest mtime, count)."""
    if not path.is_dir():
        st = path.stat()
        return [st.st_size, st.st_mtime_ns, 1]
    stats = [p.stat() for p in path.rglob("*") if p.is_file()]
    return [sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0), len(stats)]


def _read_cache(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # a damaged cache only costs re-hashing
        return {}
    return data if isinstance(data, dict) else {}


def file_hashes(paths: Iterable[str | Path], work: str | Path | None = None) -> dict[str, str]:
    """``{path: sha256}`` of files (or DICOM folders); a file whose size and mtime match the JSON cache in
    ``work`` is not read again. Paths are given back as passed."""
    cache_path = Path(work) / HASH_CACHE if work is not None else None
    with _hash_lock:
        cache = _read_cache(cache_path)
        out: dict[str, str] = {}
        changed = False
        for p in paths:
            real = os.path.realpath(p)
            key = _stat_key(Path(real))
            hit = cache.get(real)
            if isinstance(hit, dict) and hit.get("stat") == key and isinstance(hit.get("sha256"), str):
                out[str(p)] = hit["sha256"]
                continue
            digest = sha256_path(real)
            cache[real] = {"stat": key, "sha256": digest}
            out[str(p)] = digest
            changed = True
        if changed and cache_path is not None:
            with contextlib.suppress(OSError):  # the cache is an optimisation; a read-only work dir is fine
                merged = {**_read_cache(cache_path), **cache}
                with atomic_file(cache_path) as tmp:
                    tmp.write_text(json.dumps(merged, sort_keys=True), encoding="utf-8")
    return out


def _fault_point(name: str) -> None:
    """Test hook (see module docstring): die like ``kill -9`` when ``MEDSYNTH_FAULT_AT`` names this stage."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def stage_key(name: str, inputs: dict[str, Any]) -> str:
    """Hash of the stage name, its inputs and the medsynth version (16 hex digits)."""
    return sha256_json({"stage": name, "inputs": inputs, "version": __version__})[:16]


def stage_dir(work: str | Path, name: str, inputs: dict[str, Any]) -> Path:
    return Path(work) / name / stage_key(name, inputs)


def is_done(record: dict[str, Any]) -> bool:
    """True while the artefacts a record points to still exist (used to heal stale orchestrator caches)."""
    return (Path(record["dir"]) / DONE).is_file()


def resolved_inputs(
    work: str | Path,
    name: str,
    inputs: dict[str, Any],
    resolved: dict[str, Any],
    legacy: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None,
) -> dict[str, Any]:
    """The inputs a stage is keyed on, given the ``resolved`` values it computes with (a config with every
    default filled in).

    ``inputs`` hold what the user wrote, so a key part left to a default hashes the same after the default
    changed. A finished stage under ``inputs`` that recorded other resolved values (``record["resolved"]``, or
    for records written before the field ``legacy(record)``; None: unknown, taken as matching) was built under
    the old default: the stage is then keyed on ``inputs`` plus ``resolved`` instead, and built anew there.
    Caches whose defaults did not change keep their keys."""
    done = stage_dir(work, name, inputs) / DONE
    if not done.is_file():
        return inputs
    record = json.loads(done.read_text(encoding="utf-8"))
    seen = record.get("resolved")
    if seen is None and legacy is not None:
        seen = legacy(record)
    if seen is None or _canonical(seen) == _canonical(resolved):
        return inputs
    log.info("stage %s: %s was built under other defaults; building under the resolved config", name, done.parent)
    return {**inputs, "resolved": resolved}


def _canonical(value: Any) -> Any:
    """JSON round trip (tuples as lists, keys as strings), so recorded and fresh values compare alike."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def run_stage(
    work: str | Path,
    name: str,
    inputs: dict[str, Any],
    build: Callable[[Path], dict[str, Any]],
    resolved: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``build(tmp_dir) -> record`` once per distinct ``inputs``; return the record.

    The record gets ``dir`` (the final artefact folder), ``key`` and ``cached`` (whether this call reused
    an earlier result). ``build`` writes into ``tmp_dir``; record values that are paths inside it must be
    given relative to it (they are made absolute against the final folder). ``resolved``: the values the
    build computes with, recorded beside it for :func:`resolved_inputs`.
    """
    out = stage_dir(work, name, inputs)
    done = out / DONE
    if done.is_file():
        record = json.loads(done.read_text(encoding="utf-8"))
        log.info("stage %s: reusing %s", name, out)
        return {**record, "cached": True}
    with atomic_dir(out) as tmp:
        record = build(tmp)
        record = {**record, "stage": name, "key": out.name, "dir": str(out.resolve())}
        if resolved is not None:
            record["resolved"] = resolved
        (tmp / "inputs.json").write_text(json.dumps(inputs, indent=2, sort_keys=True, default=str), encoding="utf-8")
        (tmp / DONE).write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
        _fault_point(name)
    log.info("stage %s: built %s", name, out)
    return {**record, "cached": False}


def artefact(record: dict[str, Any], key: str = "path") -> Path:
    """Absolute path of a record's artefact (relative names are resolved against its stage folder)."""
    p = Path(record[key])
    return p if p.is_absolute() else Path(record["dir"]) / p
