"""Shared fixtures. Real-data tests read ``MEDSYNTH_TEST_DATA`` and skip when it is unset."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Prefect must never touch the user's home or phone home from tests; set before anything imports it.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="medsynth-prefect-"))
# Under pytest-xdist every worker gets its own Prefect home: the ephemeral server's SQLite database, the
# profiles and the result store live there, and two processes writing one SQLite file fail with "database is
# locked". The folder is derived from the shared one, so a caller's PREFECT_HOME still holds everything.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _worker_home = Path(os.environ["PREFECT_HOME"]) / f"xdist-{os.environ['PYTEST_XDIST_WORKER']}"
    _worker_home.mkdir(parents=True, exist_ok=True)
    os.environ["PREFECT_HOME"] = str(_worker_home)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The harness fixtures wait this long for their API server (server_startup_timeout=None reads it): on a loaded
# 2-core machine a server's start (imports, SQLite migrations) took over 90 s; a long cap costs nothing when it
# starts sooner.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import torch  # noqa: E402

# One torch thread: on a loaded 2-core box two threads spin against each other (measured up to ~10x slower
# for the small networks the tests train); Dask workers and the Prefect server share the same cores.
torch.set_num_threads(1)


def _test_data() -> Path | None:
    value = os.environ.get("MEDSYNTH_TEST_DATA")
    return Path(value) if value else None


@pytest.fixture(scope="session")
def test_data_root() -> Path:
    """``MEDSYNTH_TEST_DATA`` (the folder holding ``acdc/`` and ``emidec_png/``), or skip."""
    root = _test_data()
    if root is None:
        pytest.skip("MEDSYNTH_TEST_DATA is not set: real-data test skipped")
    if not root.is_dir():
        pytest.fail(f"MEDSYNTH_TEST_DATA={root} is not a directory")
    return root


@pytest.fixture(scope="session")
def acdc_root(test_data_root: Path) -> Path:
    """ACDC ``training/`` folder (patientNNN/...)."""
    root = test_data_root / "acdc" / "training"
    if not root.is_dir():
        pytest.fail(f"{root} missing under MEDSYNTH_TEST_DATA")
    return root


@pytest.fixture(scope="session")
def emidec_png_root(test_data_root: Path) -> Path:
    """EMIDEC PNG folder (images/ and masks/)."""
    root = test_data_root / "emidec_png"
    if not root.is_dir():
        pytest.fail(f"{root} missing under MEDSYNTH_TEST_DATA")
    return root


#: Fixtures that start a Prefect API server (``prefect_test_harness``) for their module.
PREFECT_SERVER_FIXTURES = ("prefect_harness", "prefect_api")
#: Modules whose tests are spread over the xdist workers one by one (see pytest_collection_modifyitems).
SPREAD_MODULES = ("test_defaults",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Groups for ``pytest -n 2 --dist loadgroup`` (``make test``): one group per test module, so a module's
    fixtures (small trainings) are built once, as with ``--dist loadfile``; and every module that starts a
    Prefect API server in one shared group, so two servers never boot at once. On a loaded 2-core machine two
    servers starting side by side outlasted the harness's startup timeout (90 s). Modules in
    :data:`SPREAD_MODULES` are the exception: their tests are long, independent fits on a cheap fixture, so each
    test is its own group and the two workers share them."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    server_modules = {
        item.module.__name__
        for item in items
        if item.module is not None and any(f in PREFECT_SERVER_FIXTURES for f in item.fixturenames)
    }
    for item in items:
        module = item.module.__name__ if item.module is not None else item.nodeid.split("::")[0]
        if module in server_modules:
            group = "prefect-server"
        elif module.rsplit(".", 1)[-1] in SPREAD_MODULES:
            group = item.nodeid
        else:
            group = module
        item.add_marker(pytest.mark.xdist_group(group))
