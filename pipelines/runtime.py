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

    return ThreadPoolTaskRunner(max_workers=runner["max_workers"])


def _strip_volatile(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_volatile(v) for k, v in obj.items() if k not in ("cached",)}
    if isinstance(obj, list | tuple):
        return [_strip_volatile(v) for v in obj]
    return obj


def cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Task name + inputs (records reduced to their content keys) + medsynth version."""
    from medsynth import __version__

    return f"{context.task.name}-" + sha256_json({"params": _strip_volatile(parameters), "version": __version__})[:24]
