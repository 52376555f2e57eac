"""``medsynth run CONFIG``: load and validate a run config, pick its flow and task runner, run it."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medsynth.errors import MedsynthError
from pipelines.runtime import configure_prefect_env

log = logging.getLogger(__name__)

WORK_DIR = ".medsynth-work"
#: The run's log (every Prefect and medsynth record, tracebacks included), in the work folder so the run
#: folder itself stays byte-identical between runs.
RUN_LOG = "run.log"


class _NoErrors(logging.Filter):
    """Keep errors and tracebacks off the console during a run: they go to the run log, and the CLI prints
    one line for them last."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or record.exc_info:
            return False
        # Prefect repeats the error in its final state line ("Finished in state Failed('… exception …')")
        return not (record.name.startswith("prefect") and "state Failed(" in record.getMessage())


def _drain_prefect_queues() -> None:
    """Send queued logs and events now: once the server is gone they could only fail (at exit, after the
    CLI's error line)."""
    with contextlib.suppress(Exception):
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
    with contextlib.suppress(Exception):
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=5)


@contextlib.contextmanager
def own_temporary_server(log_path: Path) -> Iterator[None]:
    """Without ``PREFECT_API_URL`` Prefect starts a temporary server that inherits our stderr: its startup,
    shutdown and crash messages would mix with (and follow) the CLI's one error line. Start it here instead,
    its output going to the run log, and stop it before returning."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        yield
        return
    server = SubprocessASGIServer()
    if getattr(server, "running", False):  # someone else's (a test harness): leave it alone
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        server.start()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)
    try:
        yield
    finally:
        _drain_prefect_queues()
        with contextlib.suppress(Exception):
            server.stop()


@contextlib.contextmanager
def run_log(path: Path) -> Iterator[Path]:
    """Write every log record of the run to ``path``; errors and tracebacks only there, not on the console."""
    # Prefect configures logging when first imported (dictConfig closes every existing handler): do that
    # first, or the run log would be closed before the flow's first record
    import prefect.main  # noqa: F401 - its import runs Prefect's setup_logging (root level, handlers)
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("", encoding="utf-8")  # one log per run
    # append mode: should something reconfigure logging mid-run (closing handlers), the next record reopens it
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    quiet = _NoErrors()
    consoles = [
        h for h in root.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    prefect_consoles = []
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
        prefect_consoles += [h for h in logging.getLogger(name).handlers if isinstance(h, logging.StreamHandler)]
    touched = consoles + prefect_consoles
    for h in touched:
        h.addFilter(quiet)
    old_level = root.level
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()
        for h in touched:
            h.removeFilter(quiet)


def run_config(config_path: str | Path, data_root: str | None = None, out: str | None = None) -> dict[str, Any]:
    """Run the flow named in the config. Artefacts of each stage go to ``OUT/.medsynth-work/<run_name>/``
    (reused by a rerun); the final outputs to ``OUT/<run_name>/``; the log to
    ``OUT/.medsynth-work/<run_name>/run.log``. An exception inside the flow is re-raised once, with its
    traceback in the log only (the CLI prints one line naming the log)."""
    configure_prefect_env()
    from medsynth.utils.atomic import write_marker
    from medsynth.workflows.config import load_run_config, resolve_data_root

    cfg = load_run_config(config_path)
    root = resolve_data_root(cfg, data_root)
    out_dir = Path(out or cfg.output.dir).resolve()
    work = out_dir / WORK_DIR / cfg.run_name
    work.mkdir(parents=True, exist_ok=True)
    write_marker(out_dir / WORK_DIR)
    with run_log(work / RUN_LOG) as log_path, own_temporary_server(log_path):
        try:
            return run_flow(cfg.model_dump(mode="json"), str(work), str(out_dir), str(root) if root else None)
        except Exception as err:
            log.error("run %s failed", cfg.run_name, exc_info=err)
            text = " ".join(str(err).split()) or type(err).__name__
            if isinstance(err, MedsynthError):
                try:
                    named = type(err)(f"{text} (run log: {log_path})")
                except Exception:  # a subclass with its own constructor
                    named = RunFailedError(f"{text} (run log: {log_path})")
                raise named from None
            raise RunFailedError(f"{type(err).__name__}: {text} (full traceback in {log_path})") from None


class RunFailedError(MedsynthError):
    """A flow raised something other than a MedsynthError; the message names the run log."""


def run_flow(config: dict[str, Any], work: str, out: str, data_root: str | None, return_state: bool = False) -> Any:
    """Run a resolved config dict (``RunConfig.model_dump(mode='json')``) with its task runner.

    Returns the flow's result record, or its Prefect state with ``return_state``."""
    from pipelines.anomaly import anomaly_flow
    from pipelines.augment import augment_flow
    from pipelines.runtime import make_task_runner
    from pipelines.translate import translate_flow

    flows = {"augment": augment_flow, "anomaly": anomaly_flow, "translate": translate_flow}
    chosen = flows[config["flow"]].with_options(task_runner=make_task_runner(config["runner"]))
    return chosen(config=config, work=work, out=out, data_root=data_root, return_state=return_state)
