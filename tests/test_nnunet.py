"""nnU-Net v2 as the client: a dataset written by the augment flow's writer passes nnU-Net's own integrity check
and its 2-D experiment planning plans at the true spacing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nnunetv2", reason="nnunetv2 is not installed (make setup installs nnunetv2==2.8.1)")

from medsynth.data.preprocess import PreprocessConfig, load_slices  # noqa: E402
from medsynth.phantom import generate_dataset  # noqa: E402
from medsynth.workflows.outputs import write_run_outputs  # noqa: E402

SOURCE_SPACING = (2.0, 2.0, 8.0)  # phantom voxel size (mm)
TARGET_MM = 1.25  # preprocessing in-plane spacing: neither the source's nor nnU-Net's 1 mm fallback
DATASET = "Dataset501_MedsynthTest"


def _nnunet(steps: list[tuple[str, list[str]]], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run nnunetv2's console entry points (name, argv) in order in one fresh interpreter: nnU-Net reads its
    ``nnUNet_*`` paths at import, and one interpreter pays the torch import once."""
    lines = ["import sys", "from nnunetv2.experiment_planning import plan_and_preprocess_entrypoints as e"]
    for entry, args in steps:
        lines += [f"sys.argv = {[entry, *args]!r}", f"e.{entry}()"]
    return subprocess.run(
        [sys.executable, "-c", "\n".join(lines)], env=env, capture_output=True, text=True, timeout=600, check=False
    )


def _synthetic_like(train):
    """Three training slices relabelled as a family's synthetic output (their meta carries the source records,
    as ``workflows.stages.synthesize`` does): single-slice cases in the dataset."""
    synth = train.subset(np.arange(len(train)) < 3)
    meta = synth.meta.copy()
    meta["subject_id"] = meta["case"] = [f"syn_t_{i:05d}" for i in range(len(meta))]
    meta["slice_index"] = "0"
    meta["source"], meta["family"], meta["model_hash"], meta["seed"] = "synthetic", "gmm", "h", "0"
    meta["source_case"] = synth.meta["case"].to_numpy()
    return type(train)(synth.images, synth.labels, meta)


def test_nnunet_integrity_check_and_2d_plan_use_the_true_spacing(tmp_path: Path) -> None:
    manifest = generate_dataset(
        tmp_path / "phantom", subjects=2, contrast="cine", seed=0, shape=(64, 64, 5), spacing=SOURCE_SPACING
    )
    train = load_slices(manifest, cfg=PreprocessConfig(size=48, spacing_mm=TARGET_MM))
    train.meta["split"] = "train"
    train.save(tmp_path / "train.npz")
    _synthetic_like(train).save(tmp_path / "synth.npz")
    run = write_run_outputs(
        str(tmp_path / "out"),
        "nn",
        {"run_name": "nn", "preprocess": {"spacing_mm": TARGET_MM}},
        "cfg",
        {"train": str(tmp_path / "train.npz")},
        [{"path": str(tmp_path / "synth.npz"), "has_labels": True, "name": "t"}],
        {},
        "",
        [],
    )
    assert run["synthetic_cases"] == 3 and run["cases"] > 3

    raw, pre, res = tmp_path / "nnUNet_raw", tmp_path / "nnUNet_preprocessed", tmp_path / "nnUNet_results"
    for d in (raw, pre, res):
        d.mkdir()
    shutil.copytree(Path(run["path"]) / "dataset", raw / DATASET)
    env = {
        **os.environ,
        "nnUNet_raw": str(raw),
        "nnUNet_preprocessed": str(pre),
        "nnUNet_results": str(res),
        "nnUNet_n_proc_DA": "1",
        "OMP_NUM_THREADS": "1",
    }
    dataset_id = DATASET[len("Dataset") : len("Dataset") + 3]
    done = _nnunet(
        [
            ("extract_fingerprint_entry", ["-d", dataset_id, "-np", "1", "--verify_dataset_integrity", "--no_pbar"]),
            ("plan_experiment_entry", ["-d", dataset_id]),
        ],
        env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    plans = json.loads((pre / DATASET / "nnUNetPlans.json").read_text(encoding="utf-8"))
    fingerprint = json.loads((pre / DATASET / "dataset_fingerprint.json").read_text(encoding="utf-8"))
    # nnU-Net orders axes (z, y, x) after its transpose; the 2-D configuration plans the two in-plane axes
    assert plans["configurations"]["2d"]["spacing"] == pytest.approx([TARGET_MM, TARGET_MM], abs=1e-4)
    # every case (real stacks, synthetic slices) has the source slice spacing through-plane
    for spacing in fingerprint["spacings"]:
        assert sorted(spacing) == pytest.approx(sorted([TARGET_MM, TARGET_MM, SOURCE_SPACING[2]]), abs=1e-4)
