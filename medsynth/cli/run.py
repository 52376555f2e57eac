"""``medsynth run CONFIG``: the main job (a Prefect flow chosen by the config)."""

from __future__ import annotations

import argparse
import json


def register(commands: argparse._SubParsersAction, evaluate: argparse._SubParsersAction) -> None:
    p = commands.add_parser("run", help="run a pipeline config (Prefect flow) end to end")
    p.add_argument("config", help="YAML run config, e.g. configs/quickstart.yaml")
    p.add_argument("--data-root", default=None, help="folder holding the real data (overrides the config's env var)")
    p.add_argument("--out", default=None, help="output folder (default: the config's output.dir)")
    p.set_defaults(func=_run, out_kind="run")  # writes OUT/<run_name>/ and the cache OUT/.medsynth-work/


def _run(args: argparse.Namespace) -> int:
    from pipelines.run import run_config

    result = run_config(args.config, data_root=args.data_root, out=args.out)
    print(json.dumps(result, indent=2))
    return 0
