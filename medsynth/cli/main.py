"""Entry point of the ``medsynth`` console script.

Each command module in this package exposes ``register(commands, evaluate)`` adding its subcommands to the top-level
parser group and to the ``medsynth evaluate`` group; handlers are stored as ``func`` and get the parsed
namespace.

Centrally, for every command: a subcommand with ``--out`` gets ``--overwrite``; before the handler runs, the
output is checked against the command's inputs and locked (:mod:`medsynth.utils.outputs`), and temporaries
of killed runs on that output are removed. A command declares a single-file output with
``set_defaults(out_kind="file")`` (default ``dir``; ``run`` writes ``OUT/<run_name>/`` and
``OUT/.medsynth-work/``).

Errors: user-facing errors (:class:`~medsynth.errors.MedsynthError`) become one line ``medsynth: error: …``
and exit 2. Any other exception also ends in one line and exit 2, and its full traceback goes to a log file
(``OUT/.medsynth-work/<run_name>/run.log`` for ``run``, ``.<out>.medsynth-error.log`` beside other
outputs, the temp folder otherwise) that the line names. The error line is the last line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import pkgutil
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import medsynth.cli
from medsynth.errors import MedsynthError
from medsynth.utils.atomic import OutputError

log = logging.getLogger("medsynth")

#: Namespace attributes naming manifests the command reads (their data roots and folders are inputs too).
MANIFEST_ARGS = ("manifest", "labels", "real", "synthetic")
#: Namespace attributes naming other input files or folders.
INPUT_ARGS = ("model", "config", "extractor")
#: Namespace attributes naming data folders (outputs must not go inside them).
DATA_ARGS = ("root", "data_root", "synthetic_data_root")


def command_modules() -> list[str]:
    """Every module in ``medsynth.cli`` that defines ``register(commands, evaluate)``, in name order."""
    return sorted(m.name for m in pkgutil.iter_modules(medsynth.cli.__path__) if m.name != "main")


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                yield sub
                yield from _subparsers(sub)


def add_overwrite_flags(parser: argparse.ArgumentParser) -> None:
    """Give every (sub)command that has ``--out`` an ``--overwrite`` flag (once)."""
    for sub in _subparsers(parser):
        dests = {a.dest for a in sub._actions}
        if "out" in dests and "overwrite" not in dests:
            sub.add_argument(
                "--overwrite",
                action="store_true",
                help="replace an earlier medsynth output at --out (never a folder or file medsynth did not write)",
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsynth", description="Synthetic-data pipeline for cardiac MR.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    evaluate_parser = commands.add_parser("evaluate", help="evaluate synthetic data, scar methods, segmentation")
    evaluate = evaluate_parser.add_subparsers(dest="evaluate_command", metavar="WHAT", required=True)
    for name in command_modules():
        module = importlib.import_module(f"medsynth.cli.{name}")
        if hasattr(module, "register"):
            module.register(commands, evaluate)
    add_overwrite_flags(parser)
    return parser


# ------------------------------------------------------------------------------------------ output guard


def _existing(value: Any) -> Path | None:
    if not isinstance(value, str | os.PathLike) or not str(value):
        return None
    p = Path(value)
    return p if p.exists() else None


def _manifest_inputs(args: argparse.Namespace) -> tuple[list[Path], list[Path]]:
    """``(inputs, data_dirs)`` from the manifests on the command line: each file, its folder, its data root."""
    from medsynth.data.manifest import resolve_data_root

    inputs: list[Path] = []
    data_dirs: list[Path] = []
    for attr in MANIFEST_ARGS:
        m = _existing(getattr(args, attr, None))
        if m is None or not m.is_file():
            continue
        inputs += [m, m.parent]
        explicit = getattr(args, "synthetic_data_root" if attr == "synthetic" else "data_root", None)
        with contextlib.suppress(MedsynthError, OSError, ValueError):
            data_dirs.append(resolve_data_root(m, explicit))
    return inputs, data_dirs


def _plan(args: argparse.Namespace) -> dict[str, Any] | None:
    """What the command will write and read: targets, lock path, inputs, data folders, kind; None: no --out."""
    kind = getattr(args, "out_kind", "dir")
    out = getattr(args, "out", None)
    inputs, data_dirs = _manifest_inputs(args)
    inputs += [p for p in (_existing(getattr(args, a, None)) for a in INPUT_ARGS) if p is not None]
    data_dirs += [p for p in (_existing(getattr(args, a, None)) for a in DATA_ARGS) if p is not None]
    if kind == "run":
        from medsynth.workflows.config import load_run_config, resolve_data_root

        cfg = load_run_config(args.config)
        out = Path(out or cfg.output.dir)
        root = resolve_data_root(cfg, args.data_root)
        if cfg.data.source == "manifest" and cfg.data.manifest and Path(cfg.data.manifest).is_file():
            inputs.append(Path(cfg.data.manifest))  # a manifest given from the working directory
        if root is not None and cfg.data.source != "phantom":
            data_dirs.append(root)
            sub = cfg.data.root if cfg.data.source == "layout" else cfg.data.manifest
            if sub and (root / sub).exists():
                (data_dirs if (root / sub).is_dir() else inputs).append(root / sub)
        work = out / ".medsynth-work"
        return {
            "targets": [out / cfg.run_name],
            "extra_targets": [work],
            "lock": out,
            "inside": out,
            "inputs": inputs,
            "data_dirs": data_dirs,
            "kind": "dir",
            "clean": [(out / cfg.run_name, False), (work, True)],
            "log": work / cfg.run_name / "run.log",
        }
    if out is None:
        return None
    out = Path(out)
    return {
        "targets": [out],
        "extra_targets": [],
        "lock": out,
        "inside": out,
        "inputs": inputs,
        "data_dirs": data_dirs,
        "kind": kind,
        "clean": [(out, False)],
        "log": out.parent / f".{out.name}.medsynth-error.log",
    }


@contextlib.contextmanager
def guarded_output(args: argparse.Namespace, plan: dict[str, Any] | None) -> Iterator[None]:
    """Check the command's outputs, hold their lock, remove leftovers of killed runs; then run the body."""
    from medsynth.utils.atomic import has_marker
    from medsynth.utils.outputs import OutputLock, check_outputs, clean_leftovers

    if plan is None:
        yield
        return
    overwrite = bool(getattr(args, "overwrite", False))
    check_outputs(plan["targets"], plan["inputs"], plan["data_dirs"], overwrite=overwrite, kind=plan["kind"])
    for extra in plan["extra_targets"]:  # a run's work folder: a cache, reused without --overwrite
        check_outputs([extra], plan["inputs"], plan["data_dirs"], overwrite=True, kind="dir")
        if extra.exists() and any(extra.iterdir()) and not has_marker(extra):
            raise OutputError(f"{extra}: exists and is not medsynth's work folder; refusing to use it")
    with OutputLock(plan["lock"]):
        for path, recursive in plan["clean"]:
            clean_leftovers(path, recursive=recursive)
        yield


# ----------------------------------------------------------------------------------------------- errors


def _write_traceback(err: BaseException, log_path: Path | None) -> Path:
    """Append the full traceback to ``log_path`` (or a temp file when that is not writable); return the file."""
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    for candidate in (log_path, Path(tempfile.gettempdir()) / f"medsynth-error-{os.getpid()}.log"):
        if candidate is None:
            continue
        try:
            candidate.parent.mkdir(parents=True, exist_ok=True)
            with open(candidate, "a", encoding="utf-8") as f:
                f.write(text)
            return candidate
        except OSError:
            continue
    return Path("<no writable log>")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verbose < 2:
        # every call to the Prefect API server would otherwise log a line
        logging.getLogger("httpx").setLevel(logging.WARNING)
    plan: dict[str, Any] | None = None
    previous = _on_sigterm()
    try:
        plan = _plan(args)
        with guarded_output(args, plan):
            rc = args.func(args)
    except Terminated:
        _flush_logs()
        print("medsynth: terminated", file=sys.stderr)
        return 143
    except MedsynthError as err:
        _flush_logs()
        print(f"medsynth: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _flush_logs()
        print("medsynth: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug or an unforeseen input: still one line, the traceback to a file
        where = _write_traceback(err, plan["log"] if plan else None)
        _flush_logs()
        print(f"medsynth: error: {type(err).__name__}: {_one_line(err)} (full traceback in {where})", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return int(rc or 0)


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like Ctrl-C, so temporary folders are removed and the lock released."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


def _on_sigterm() -> Any:
    """Turn SIGTERM into :class:`Terminated` in the main thread; returns the previous handler (None: not set)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def _flush_logs() -> None:
    # log records still buffered (Prefect's console handler) must come out before the error line
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
