"""Prefect runtime helpers: environment defaults, task runners from config, cache keys, stale-cache healing."""

from __future__ import annotations

import os
from typing import Any

from medsynth.utils.hashing import sha256_json


def configure_prefect_env() -> None:
    """Defaults for the embedded server; a user's ``PREFECT_API_URL`` or own settings win."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "medsynth")


def make_task_runner(runner: dict[str, Any]):
    """``local``: a thread pool; ``dask``: prefect-dask on a LocalCluster or an existing scheduler."""
    if runner["kind"] == "dask":
        from prefect_dask import DaskTaskRunner

        if runner.get("address"):
            return DaskTaskRunner(address=runner["address"])
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": runner["n_workers"],
                "threads_per_worker": runner["threads_per_worker"],
                "processes": True,
                "dashboard_address": None,
            }
        )
    from prefect.task_runners import ThreadPoolTaskRunner

    share_cores(runner["max_workers"])
    return ThreadPoolTaskRunner(max_workers=runner["max_workers"])


def share_cores(max_workers: int) -> int:
    """Torch intra-op threads for ``max_workers`` tasks running side by side in one process: the cores divided
    among them (at least 1), unless the user set ``OMP_NUM_THREADS``. Two concurrent fits each asking for every
    core oversubscribe the CPU; on the 2-core development machine that slowed a cVAE fit several-fold. Returns
    the thread count in force."""
    import logging

    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    threads = max(1, (os.cpu_count() or 1) // max(1, max_workers))
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
        logging.getLogger("medsynth").info("torch: %d thread(s) per task for %d parallel tasks", threads, max_workers)
    return threads


def _strip_volatile(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_volatile(v) for k, v in obj.items() if k not in ("cached",)}
    if isinstance(obj, list | tuple):
        return [_strip_volatile(v) for v in obj]
    return obj


def _input_fingerprint(task_name: str, parameters: dict[str, Any]) -> str | None:
    """Content of the input files a task reads that its parameters do not show (only the data-preparing task
    reads user files: later tasks get records carrying artefact hashes). Without it a data file changed
    between runs would let the cached, stale result through."""
    if task_name != "prepare-manifest":
        return None
    from medsynth.errors import MedsynthError
    from medsynth.workflows.stages import prepare_fingerprint

    try:
        return prepare_fingerprint(parameters["work"], parameters["data"], parameters["seed"], parameters["data_root"])
    except MedsynthError as err:  # bad input: the task itself reports it; a unique key means no stale reuse
        return f"unavailable: {err}"


def cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Task name + inputs (records reduced to their content keys, input files by content) + medsynth version."""
    from medsynth import __version__

    name = context.task.name
    key = {
        "params": _strip_volatile(parameters),
        "files": _input_fingerprint(name, parameters),
        "version": __version__,
    }
    return f"{name}-" + sha256_json(key)[:24]
