"""``medsynth run CONFIG``: load and validate a run config, pick its flow and task runner, run it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipelines.runtime import configure_prefect_env

log = logging.getLogger(__name__)

WORK_DIR = ".medsynth-work"


def run_config(config_path: str | Path, data_root: str | None = None, out: str | None = None) -> dict[str, Any]:
    """Run the flow named in the config. Artefacts of each stage go to ``OUT/.medsynth-work/<run_name>/``
    (reused by a rerun); the final outputs to ``OUT/<run_name>/``."""
    configure_prefect_env()
    from medsynth.workflows.config import load_run_config, resolve_data_root

    cfg = load_run_config(config_path)
    root = resolve_data_root(cfg, data_root)
    out_dir = Path(out or cfg.output.dir).resolve()
    work = out_dir / WORK_DIR / cfg.run_name
    work.mkdir(parents=True, exist_ok=True)
    return run_flow(cfg.model_dump(mode="json"), str(work), str(out_dir), str(root) if root else None)


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
