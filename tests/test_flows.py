"""The Prefect flows end to end on a tiny phantom config, under one session-scoped test harness."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medsynth.data.manifest import COLUMNS, load_manifest
from medsynth.workflows.config import RunConfig

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
    "synthesis": {"n": 6, "context": True},
    "evaluation": {
        "fidelity": {"bootstrap": 5},
        "segmentation": {
            "arms": ["real", "real+synthetic"],
            "seeds": [0],
            "n_real_patients": [1, "all"],
            "params": {"image_size": 32, "iterations": 8},
        },
    },
}


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):  # PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
        yield


def _config(**overrides) -> dict:
    cfg = json.loads(json.dumps(TINY))
    cfg.update(overrides)
    return RunConfig.model_validate(cfg).model_dump(mode="json")


def _task_states(flow_state) -> dict[str, list[str]]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = flow_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    states: dict[str, list[str]] = {}
    for r in runs:
        states.setdefault(r.name.rsplit("-", 1)[0], []).append(r.state.name)
    return states


def _check_dataset(run_dir: Path) -> None:
    ds = json.loads((run_dir / "dataset" / "dataset.json").read_text(encoding="utf-8"))
    for key in ("channel_names", "labels", "numTraining", "file_ending"):
        assert key in ds, key
    images = sorted((run_dir / "dataset" / "imagesTr").glob("*_0000.nii.gz"))
    labels = sorted((run_dir / "dataset" / "labelsTr").glob("*.nii.gz"))
    assert ds["numTraining"] == len(images) == len(labels)
    assert sorted(ds["labels"].values()) == list(range(len(ds["labels"])))
    for img_path in images:
        case = img_path.name[: -len("_0000.nii.gz")]
        img, lab = nib.load(img_path), nib.load(run_dir / "dataset" / "labelsTr" / f"{case}.nii.gz")
        assert img.shape == lab.shape
        assert np.allclose(img.affine, lab.affine)
        assert set(np.unique(np.asarray(lab.dataobj)).tolist()) <= set(ds["labels"].values())
    manifest, _ = load_manifest(run_dir / "manifest.csv")
    assert set(COLUMNS) <= set(manifest.columns)
    assert len(manifest) == ds["numTraining"]
    assert set(manifest["source"]) == {"real", "synthetic"}
    syn = manifest[manifest["source"] == "synthetic"]
    assert (syn["family"] == "gmm").all() and (syn["model_hash"] != "").all() and (syn["source_case"] != "").all()
    assert manifest["config_hash"].nunique() == 1


def test_augment_flow_writes_dataset_and_reruns_from_cache(prefect_harness, tmp_path: Path) -> None:
    from pipelines.run import run_flow

    cfg = _config()
    work, out = tmp_path / "work", tmp_path / "out"
    state = run_flow(cfg, str(work), str(out), None, return_state=True)
    assert state.is_completed(), state
    result = state.result()
    run_dir = Path(result["path"])
    assert run_dir == out / "tiny"
    _check_dataset(run_dir)
    assert result["synthetic_cases"] == 6
    fid = pd.read_csv(run_dir / "metrics" / "fidelity.csv")
    assert {"fd", "rfd", "kid", "precision", "recall", "memorised_fraction"} <= set(fid["metric"])
    seg = pd.read_csv(run_dir / "metrics" / "segmentation.csv")
    assert set(seg["arm"]) == {"real", "real+gmm"}  # one real+synthetic arm per synthetic set
    assert sorted(set(zip(seg["arm"], seg["n_real_patients"], strict=True))) == [
        ("real", 1), ("real", 2), ("real+gmm", 1), ("real+gmm", 2)
    ]  # fmt: skip
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    assert report.startswith("# medsynth run")
    assert "### Learning curve" in report and "figures/learning_curve.png" in report
    assert "–, reference" in report and "Dice points" in report and "HD95 (mm)" in report
    assert not re.search(r"\bnan\b", report, re.IGNORECASE)
    assert (run_dir / "figures" / "samples.png").stat().st_size > 0
    assert (run_dir / "figures" / "learning_curve.png").stat().st_size > 0
    assert (run_dir / "figures" / "same_labels.png").stat().st_size > 0  # the GMM renders held-out label maps
    assert "figures/same_labels.png" in report
    protocol = pd.read_csv(run_dir / "metrics" / "segmentation_protocol.csv")
    assert protocol["mixing"].iloc[0] == "pool" and protocol["synthetic_ratio"].iloc[0] == 1.0
    assert json.loads((run_dir / "versions.json").read_text(encoding="utf-8"))["torch"].startswith("2.13")

    # a rerun reuses every expensive task from Prefect's cache
    again = run_flow(cfg, str(work), str(out), None, return_state=True)
    assert again.is_completed()
    states = _task_states(again)
    for name in ("prepare-manifest", "preprocess-subject", "fit-model", "synthesize", "segmentation-arm"):
        assert states[name] and all(s == "Cached" for s in states[name]), (name, states[name])
    _check_dataset(run_dir)


def test_failure_leaves_no_partial_dataset(prefect_harness, tmp_path: Path, monkeypatch) -> None:
    import medsynth.workflows.outputs as outputs
    from pipelines.run import run_flow

    real_writer = outputs.write_nnunet_dataset

    def failing_writer(out_dir, cases, **kw):
        real_writer(out_dir, cases[:1], **kw)  # some files are on disk when the failure hits
        raise OSError("disk full (injected)")

    monkeypatch.setattr(outputs, "write_nnunet_dataset", failing_writer)
    cfg = _config(evaluation={"fidelity": {"enabled": False}, "segmentation": {"enabled": False}})
    state = run_flow(cfg, str(tmp_path / "work"), str(tmp_path / "out"), None, return_state=True)
    assert state.is_failed()
    out = tmp_path / "out"
    leftovers = [p.name for p in out.iterdir()] if out.exists() else []
    assert leftovers == [], leftovers


def test_dask_task_runner_on_local_cluster(prefect_harness, tmp_path: Path) -> None:
    from pipelines.run import run_flow

    cfg = _config(
        evaluation={"fidelity": {"enabled": False}, "segmentation": {"enabled": False}},
        runner={"kind": "dask", "n_workers": 2, "threads_per_worker": 1},
        synthesis={"n": 6, "context": False},
    )
    state = run_flow(cfg, str(tmp_path / "work"), str(tmp_path / "out"), None, return_state=True)
    assert state.is_completed(), state
    _check_dataset(Path(state.result()["path"]))


def test_cli_run_rejects_bad_config(tmp_path: Path, capsys) -> None:
    from medsynth.cli.main import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("run_name: x\nmodels:\n  - family: gmm\n    paramz: {}\n")
    assert main(["run", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medsynth: error:") and "paramz" in err and "\n" not in err
    assert not (tmp_path / "out" / "x").exists()


def test_anomaly_flow_on_phantom_lge(prefect_harness, tmp_path: Path) -> None:
    from pipelines.run import run_flow

    cfg = _config(
        flow="anomaly",
        data={
            "source": "phantom",
            "phantom": {"subjects": 6, "contrast": "lge"},
            "splits": {"train": 0.5, "test": 0.5},
        },
        models=[{"family": "ppca", "params": {"n_components": 4, "image_size": 32}}],
    )
    state = run_flow(cfg, str(tmp_path / "work"), str(tmp_path / "out"), None, return_state=True)
    assert state.is_completed(), state
    run_dir = Path(state.result()["path"])
    metrics = pd.read_csv(run_dir / "metrics" / "anomaly_metrics.csv")
    assert {"ppca", "ppca[wall]", "nsd2", "nsd3", "nsd5", "fwhm"} <= set(metrics["method"])
    scores = pd.read_csv(run_dir / "metrics" / "ppca_slice_scores.csv")
    assert np.isfinite(scores["score"]).all() and len(scores) > 0
    assert "AUROC" in (run_dir / "report.md").read_text(encoding="utf-8")


def test_augment_flow_on_acdc_layout(prefect_harness, acdc_root: Path, tmp_path: Path) -> None:
    """The real-data path: ACDC layout under a data root, a stratified subset of patients, patient-level splits."""
    from pipelines.run import run_flow

    cfg = _config(
        run_name="acdc_tiny",
        data={
            "source": "layout",
            "layout": "acdc",
            "root": acdc_root.name,
            "max_subjects": 6,
            "splits": {"train": 0.5, "test": 0.5},
        },
        evaluation={"fidelity": {"bootstrap": 5}, "segmentation": {"enabled": False}},
    )
    state = run_flow(cfg, str(tmp_path / "work"), str(tmp_path / "out"), str(acdc_root.parent), return_state=True)
    assert state.is_completed(), state
    run_dir = Path(state.result()["path"])
    _check_dataset(run_dir)
    manifest, _ = load_manifest(run_dir / "manifest.csv")
    real = manifest[manifest["source"] == "real"]
    assert real["dataset"].eq("acdc").all() and real["subject_id"].nunique() == 3
    # the 3 training patients' ED and ES volumes, no test patient
    assert len(real) == 6


def test_augment_flow_adds_scar_cases_on_lge(prefect_harness, tmp_path: Path) -> None:
    """LGE: the GMM's scar model inserts scar into healthy training myocardium; those cases reach the dataset."""
    from pipelines.run import run_flow

    cfg = _config(
        run_name="lge_scar",
        data={
            "source": "phantom",
            "phantom": {"subjects": 6, "contrast": "lge"},
            "splits": {"train": 0.5, "test": 0.5},
        },
        synthesis={"n": 4, "scar": {"enabled": True, "n": 5}},
        evaluation={"fidelity": {"enabled": False}, "segmentation": {"enabled": False}},
    )
    state = run_flow(cfg, str(tmp_path / "work"), str(tmp_path / "out"), None, return_state=True)
    assert state.is_completed(), state
    run_dir = Path(state.result()["path"])
    _check_dataset(run_dir)
    manifest, root = load_manifest(run_dir / "manifest.csv")
    scar_rows = manifest[manifest["subject_id"].str.startswith("syn_gmm+scar_")]
    assert len(scar_rows) == 5 and (scar_rows["pathology"] == "infarct").all()
    ds = json.loads((run_dir / "dataset" / "dataset.json").read_text(encoding="utf-8"))
    for rel in scar_rows["label"]:
        lab = np.asarray(nib.load(root / rel).dataobj)
        assert (lab == ds["labels"]["scar"]).any()


def test_translate_flow_on_phantom_cine_and_lge(prefect_harness, tmp_path: Path) -> None:
    """cine → LGE on the phantom: translated training slices keep their labels and join the real LGE cases;
    metrics before / after; a family without ``translate`` is refused by name when the config is validated."""
    from pipelines.run import run_flow

    cyclegan = {
        "family": "cyclegan",
        "params": {"image_size": 32, "channels": [8, 16], "n_res_blocks": 1, "disc_channels": 8, "steps": 6},
    }
    cfg = _config(
        flow="translate",
        data={
            "source": "phantom",
            "phantom": {"subjects": 4, "contrast": "cine+lge"},
            "splits": {"train": 0.5, "test": 0.5},
        },
        models=[cyclegan],
        evaluation={"translation": {"bootstrap": 5, "segmentation": {"image_size": 32, "iterations": 5}}},
    )
    state = run_flow(cfg, str(tmp_path / "work"), str(tmp_path / "out"), None, return_state=True)
    assert state.is_completed(), state
    run_dir = Path(state.result()["path"])
    metrics = pd.read_csv(run_dir / "metrics" / "translation_metrics.csv")
    assert set(metrics["metric"]) == {"fd_random_cnn", "target_unet_dice"}
    assert (metrics["direction"] == "cine->lge").all() and metrics[["before", "after"]].notna().all().all()
    manifest, _ = load_manifest(run_dir / "manifest.csv")
    assert (manifest["modality"] == "lge").all()  # real LGE cases + translated cine slices
    syn = manifest[manifest["source"] == "synthetic"]
    assert len(syn) > 0 and (syn["family"] == "cyclegan").all() and (syn["source_case"] != "").all()
    assert (run_dir / "figures" / "samples.png").is_file()

    # a family without ``translate`` is refused when the config is validated, before any stage runs
    with pytest.raises(ValueError, match="'pca' cannot translate"):
        _config(flow="translate", data=cfg["data"], models=[{"family": "pca"}])
