"""Fault injection: kill -9 mid-run, concurrent writers, changed data files, pickles on the resume path.

One embedded Prefect server for the module; ``medsynth run`` subprocesses talk to it through
``PREFECT_API_URL`` (no server start per process). The kill points use the stage runner's test hook
``MEDSYNTH_FAULT_AT=<stage>`` (SIGKILL right after building that stage, before it is renamed into place).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from medsynth.cli.main import main

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "run_name": "tiny",
    "seed": 0,
    "data": {
        "source": "phantom",
        "phantom": {"subjects": 4, "contrast": "cine"},
        "splits": {"train": 0.5, "test": 0.5},
    },
    "preprocess": {"size": 64, "spacing_mm": 2.5},
    "models": [{"family": "gmm"}],
    "synthesis": {"n": 4, "context": False},
    "evaluation": {
        "fidelity": {"enabled": False},
        "segmentation": {"arms": ["real"], "seeds": [0], "params": {"image_size": 32, "iterations": 4}},
    },
}


def _drop_prefect_consoles() -> None:
    """In-process runs under pytest: Prefect's console handler keeps the stderr capture of the test that
    configured it and, once that is closed, prints logging tracebacks into later tests' stderr. The CLI in
    its own process never sees this; here the handler is dropped (medsynth's own handlers stay)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger()] + [
        lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        for h in list(lg.handlers):
            if isinstance(h, PrefectConsoleHandler):
                lg.removeHandler(h)


@pytest.fixture(autouse=True)
def _fresh_console():
    _drop_prefect_consoles()
    yield
    _drop_prefect_consoles()


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):  # PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
        yield PREFECT_API_URL.value()


def _env(api: str | None, **extra: str) -> dict[str, str]:
    """Subprocess environment; ``api=None``: no API URL, so medsynth starts its own temporary server (the
    plain user path, with its startup and shutdown messages)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("MEDSYNTH_FAULT_AT", None)
    env.pop("PREFECT_API_URL", None)
    if api is not None:
        env["PREFECT_API_URL"] = api
    env.update(extra)
    return env


def _run_cli(api: str | None, args: list[str], **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medsynth.cli.main", *args],
        env=_env(api, **extra),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )


def _tree(folder: Path) -> dict[str, str]:
    """Relative path → (mode, sha256) of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): f"{p.stat().st_mode:o}:{hashlib.sha256(p.read_bytes()).hexdigest()}"
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _leftovers(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


def _config(tmp_path: Path, **overrides) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg.update(overrides)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert lines, stderr
    errors = [ln for ln in lines if ln.startswith("medsynth: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


def _storage_has_no_pickle() -> int:
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    storage = Path(PREFECT_LOCAL_STORAGE_PATH.value())
    files = [p for p in storage.rglob("*") if p.is_file()] if storage.is_dir() else []
    for p in files:
        raw = p.read_bytes()
        assert not raw.startswith(b"\x80"), f"{p}: a pickle"
        record = json.loads(raw)  # every persisted result is plain JSON
        serializer = record.get("metadata", {}).get("serializer", {}) if isinstance(record, dict) else {}
        assert serializer.get("type", "json") == "json", (p, serializer)
    return len(files)


def test_kill9_at_three_points_then_rerun_gives_identical_bytes(prefect_api, tmp_path: Path, capsys) -> None:
    cfg = _config(tmp_path)
    assert main(["run", str(cfg), "--out", str(tmp_path / "ref")]) == 0  # in-process, on the module's server
    reference = _tree(tmp_path / "ref" / "tiny")
    assert any(k.startswith("dataset/") for k in reference)
    assert "timings.csv" not in " ".join(reference)  # wall-clock lives beside the run folder, not in it
    assert (tmp_path / "ref" / ".medsynth-work" / "tiny" / "timings.csv").is_file()
    assert "stage prepare: built" in (tmp_path / "ref" / ".medsynth-work" / "tiny" / "run.log").read_text(
        encoding="utf-8"
    )
    modes = {v.split(":")[0] for v in reference.values()}
    assert len(modes) == 1, modes  # weights.safetensors gets the mode of every other file
    # kill -9 at three points in turn on one output; each rerun resumes from what the last one finished
    out = tmp_path / "killed"
    for point in ("prepare", "preprocess", "models"):
        killed = _run_cli(prefect_api, ["run", str(cfg), "--out", str(out)], MEDSYNTH_FAULT_AT=point)
        assert killed.returncode == -9, (point, killed.returncode, killed.stderr[-2000:])
        assert not (out / "tiny").exists()
        assert any(f"/{point}/" in p for p in _leftovers(out)), (point, _leftovers(out))  # its temp folder
        assert (out / ".medsynth-work" / "tiny" / point).is_dir()
    capsys.readouterr()
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    assert _leftovers(out) == []  # removed by the rerun
    assert _tree(out / "tiny") == reference  # every file of the run folder, byte for byte
    # a finished run folder is replaced only with --overwrite
    capsys.readouterr()
    assert main(["run", str(cfg), "--out", str(out)]) == 2
    assert "--overwrite" in _one_error_line(capsys.readouterr().err)
    assert _tree(out / "tiny") == reference
    # nothing on the resume path is a pickle
    assert _storage_has_no_pickle() > 0


def test_error_inside_a_flow_is_one_last_line_naming_the_file_and_the_log(tmp_path: Path) -> None:
    from medsynth.data.manifest import read_manifest

    manifest = _phantom_manifest(tmp_path, blank_sha=True)
    broken = tmp_path / "data" / read_manifest(manifest)["image"].iloc[2]
    broken.write_bytes(broken.read_bytes()[:300])  # truncated: fails inside the flow's preprocessing task
    cfg = _config(
        tmp_path,
        data={"source": "manifest", "manifest": str(manifest), "splits": {"train": 0.5, "test": 0.5}},
        evaluation={"fidelity": {"enabled": False}, "segmentation": {"enabled": False}},
    )
    # no PREFECT_API_URL: a temporary server of its own, as a user runs it (its exit message must come first)
    bad = _run_cli(None, ["run", str(cfg), "--out", str(tmp_path / "o")], PREFECT_HOME=str(tmp_path / "ph"))
    assert bad.returncode == 2
    line = _one_error_line(bad.stderr)
    log_path = tmp_path / "o" / ".medsynth-work" / "tiny" / "run.log"
    assert str(broken) in line and str(log_path) in line
    assert "Traceback" in log_path.read_text(encoding="utf-8")
    assert not (tmp_path / "o" / "tiny").exists() and _leftovers(tmp_path / "o") == []


def test_concurrent_runs_on_one_output(prefect_api, tmp_path: Path) -> None:
    out = tmp_path / "shared"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from medsynth.utils.outputs import OutputLock; "
            f"OutputLock({str(out)!r}).acquire(); print('locked', flush=True); time.sleep(120)",
        ],
        env=_env(prefect_api),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = _run_cli(prefect_api, ["phantom", "--out", str(out), "--subjects", "2", "--shape", "32x32x2"])
        assert second.returncode == 2
        line = _one_error_line(second.stderr)
        assert f"process {holder.pid}" in line and str(out) in line
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died with kill -9: its lock file is stale and is taken over
    assert (out.parent / f".{out.name}.medsynth-lock").exists()
    assert main(["phantom", "--out", str(out), "--subjects", "2", "--shape", "32x32x2"]) == 0
    assert not (out.parent / f".{out.name}.medsynth-lock").exists()
    # two real writers started together on one output: exactly one writes it, the other refuses in one line
    # (naming the holder's PID while it runs, or asking for --overwrite once it has finished)
    both = tmp_path / "both"
    args = [sys.executable, "-m", "medsynth.cli.main", "phantom", "--out", str(both), "--subjects", "6"]
    procs = [
        subprocess.Popen(args, env=_env(prefect_api), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=600), p.communicate()[1], p.pid) for p in procs]
    codes = sorted(rc for rc, _, _ in results)
    assert codes == [0, 2], [(rc, err[-500:]) for rc, err, _ in results]
    loser = next(err for rc, err, _ in results if rc == 2)
    winner = next(pid for rc, _, pid in results if rc == 0)
    line = _one_error_line(loser)
    assert f"process {winner}" in line or "--overwrite" in line, line
    assert _leftovers(tmp_path) == [] and (both / "manifest.csv").is_file()


def _phantom_manifest(tmp_path: Path, blank_sha: bool) -> Path:
    from medsynth.data.manifest import read_manifest, write_manifest
    from medsynth.phantom import generate_dataset

    m = generate_dataset(tmp_path / "data", subjects=4, contrast="cine", seed=0)
    df = read_manifest(m)
    if blank_sha:
        df["sha256"] = ""
    return write_manifest(df, tmp_path / "data" / "manifest.csv", data_root=tmp_path / "data")


def _modify_image(path: Path) -> None:
    img = nib.load(str(path))
    arr = np.asarray(img.dataobj).astype(np.float32)
    nib.save(nib.Nifti1Image(arr[::-1].copy() * 0.5 + 7.0, img.affine, img.header), str(path))


def test_changed_data_file_is_read_again(prefect_api, tmp_path: Path, capsys) -> None:
    """A training image changed between runs (manifest untouched): the rerun uses the new content, and only
    that subject's preprocessing is redone; with a filled sha256 column the change is an error naming it."""
    from medsynth.data.manifest import read_manifest

    manifest = _phantom_manifest(tmp_path, blank_sha=True)
    no_eval = {"fidelity": {"enabled": False}, "segmentation": {"enabled": False}}
    data = {"source": "manifest", "manifest": str(manifest), "splits": {"train": 0.5, "test": 0.5}}
    cfg = _config(tmp_path, data=data, evaluation=no_eval)
    out = tmp_path / "o"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    before = _tree(out / "tiny" / "dataset")
    preprocess = out / ".medsynth-work" / "tiny" / "preprocess"
    first_dirs = {p.name for p in preprocess.iterdir()}
    rows = read_manifest(manifest)
    _modify_image(tmp_path / "data" / rows["image"].iloc[0])
    assert main(["run", str(cfg), "--out", str(out), "--overwrite"]) == 0
    assert _tree(out / "tiny" / "dataset") != before  # the new image content reached the dataset
    new_dirs = {p.name for p in preprocess.iterdir()} - first_dirs
    assert len(new_dirs) == 1, new_dirs  # exactly that subject's preprocessing was redone
    # with the manifest's sha256 filled in, a changed image is an error naming the file
    second = tmp_path / "second"
    manifest2 = _phantom_manifest(second, blank_sha=False)
    rows2 = read_manifest(manifest2)
    _modify_image(second / "data" / rows2["image"].iloc[1])
    cfg2 = _config(second, data={**data, "manifest": str(manifest2)}, evaluation=no_eval)
    capsys.readouterr()
    assert main(["run", str(cfg2), "--out", str(tmp_path / "o2")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert rows2["image"].iloc[1] in line and "sha256" in line


def test_atomic_dir_concurrent_writers_never_fail(tmp_path: Path) -> None:
    """3 processes × 150 replacements of one folder: no failure, no leftover, one complete write (the old
    rename-aside code failed ~5 % of these with ENOTEMPTY / ENOENT; benchmarks/bench_atomic.py)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_atomic import stress

    failures, leftovers, complete, _ = stress(tmp_path, procs=3, n=150)
    assert failures == {} and leftovers == [] and complete


def test_atomic_dir_never_replaces_foreign_data(tmp_path: Path) -> None:
    from medsynth.utils.atomic import MARKER, OutputError, atomic_dir

    user = tmp_path / "user"
    user.mkdir()
    (user / "precious.txt").write_text("mine")
    with pytest.raises(OutputError, match="did not write"), atomic_dir(user) as tmp:
        (tmp / "x").write_text("x")
    assert (user / "precious.txt").read_text(encoding="utf-8") == "mine"
    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(OutputError, match="not a folder"), atomic_dir(afile):
        pass
    assert afile.read_text(encoding="utf-8") == "mine" and sorted(p.name for p in tmp_path.iterdir()) == [
        "afile",
        "user",
    ]
    with atomic_dir(tmp_path / "ours") as tmp:
        (tmp / "a").write_text("1")
    assert (tmp_path / "ours" / MARKER).is_file()
    with atomic_dir(tmp_path / "ours") as tmp:  # its own output: replaced
        (tmp / "a").write_text("2")
    assert (tmp_path / "ours" / "a").read_text(encoding="utf-8") == "2"


def test_sigterm_leaves_no_temp_folder_and_no_lock(tmp_path: Path) -> None:
    out = tmp_path / "ph"
    proc = subprocess.Popen(
        [sys.executable, "-m", "medsynth.cli.main", "phantom", "--out", str(out), "--subjects", "40"],
        env=_env("http://127.0.0.1:9/api"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not _leftovers(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _leftovers(tmp_path), "the phantom finished before it could be terminated"
    proc.terminate()
    rc = proc.wait(timeout=60)
    err = proc.stderr.read()
    assert rc == 143, (rc, err[-1000:])
    assert err.strip().splitlines()[-1] == "medsynth: terminated"
    assert _leftovers(tmp_path) == [] and not out.exists()
    assert not (tmp_path / f".{out.name}.medsynth-lock").exists()


def test_unforeseen_exception_inside_a_flow_is_one_line_naming_the_log(
    prefect_api, tmp_path: Path, capsys, monkeypatch
) -> None:
    """Not a MedsynthError (a bug, say): still one last line, exit 2, the traceback in the run log."""
    from prefect import task

    import pipelines.tasks as tasks

    def broken_merge(work: str, subject_records: list) -> dict:
        raise RuntimeError("injected failure in merge-slices")

    monkeypatch.setattr(tasks, "merge_slices", task(broken_merge, name="merge-slices"))
    cfg = _config(tmp_path, evaluation={"fidelity": {"enabled": False}, "segmentation": {"enabled": False}})
    capsys.readouterr()
    assert main(["run", str(cfg), "--out", str(tmp_path / "o")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    log_path = tmp_path / "o" / ".medsynth-work" / "tiny" / "run.log"
    assert "RuntimeError: injected failure in merge-slices" in line and str(log_path) in line
    text = log_path.read_text(encoding="utf-8")
    assert "Traceback" in text and "injected failure" in text
    assert not (tmp_path / "o" / "tiny").exists()
