"""Idempotent, content-addressed pipeline stages.

``run_stage(work, name, inputs, build)`` hashes ``inputs`` (small JSON records: paths, artefact hashes,
config dicts) into a key, and builds into ``<work>/<name>/<key>/`` through an atomic directory. A stage
that finished before is recognised by its ``done.json`` and not run again — the artefacts on disk are the
cache, so a rerun after a crash resumes at the first unfinished stage whatever the orchestrator.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medsynth import __version__
from medsynth.utils.atomic import atomic_dir
from medsynth.utils.hashing import sha256_json

log = logging.getLogger(__name__)

DONE = "done.json"


def stage_key(name: str, inputs: dict[str, Any]) -> str:
    """Hash of the stage name, its inputs and the medsynth version (16 hex digits)."""
    return sha256_json({"stage": name, "inputs": inputs, "version": __version__})[:16]


def stage_dir(work: str | Path, name: str, inputs: dict[str, Any]) -> Path:
    return Path(work) / name / stage_key(name, inputs)


def is_done(record: dict[str, Any]) -> bool:
    """True while the artefacts a record points to still exist (used to heal stale orchestrator caches)."""
    return (Path(record["dir"]) / DONE).is_file()


def run_stage(
    work: str | Path,
    name: str,
    inputs: dict[str, Any],
    build: Callable[[Path], dict[str, Any]],
) -> dict[str, Any]:
    """Run ``build(tmp_dir) -> record`` once per distinct ``inputs``; return the record.

    The record gets ``dir`` (the final artefact folder), ``key`` and ``cached`` (whether this call reused
    an earlier result). ``build`` writes into ``tmp_dir``; record values that are paths inside it must be
    given relative to it (they are made absolute against the final folder).
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
        (tmp / "inputs.json").write_text(json.dumps(inputs, indent=2, sort_keys=True, default=str), encoding="utf-8")
        (tmp / DONE).write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    log.info("stage %s: built %s", name, out)
    return {**record, "cached": False}


def artefact(record: dict[str, Any], key: str = "path") -> Path:
    """Absolute path of a record's artefact (relative names are resolved against its stage folder)."""
    p = Path(record[key])
    return p if p.is_absolute() else Path(record["dir"]) / p
