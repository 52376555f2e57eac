"""Small real and phantom slice sets shared by the evaluation tests (not a test module)."""

from __future__ import annotations

from medsynth.data.slices import SliceSet


def acdc_slices(acdc_root, tmp_dir, n_patients: int = 8, size: int = 128) -> SliceSet:
    from medsynth.data.layouts import build_manifest
    from medsynth.data.manifest import write_manifest
    from medsynth.data.preprocess import PreprocessConfig, load_slices

    df = build_manifest("acdc", acdc_root, verify=False)
    keep = sorted(df["subject_id"].unique())[:: max(1, 30 // n_patients)][:n_patients]
    df = df[df["subject_id"].isin(keep)]
    write_manifest(df, tmp_dir / "acdc.csv", acdc_root)
    return load_slices(tmp_dir / "acdc.csv", data_root=acdc_root, cfg=PreprocessConfig(size=size))


def phantom_slices(tmp_dir, subjects: int = 8, seed: int = 0) -> SliceSet:
    from medsynth.data.preprocess import PreprocessConfig, load_slices
    from medsynth.phantom import generate_dataset

    m = generate_dataset(
        tmp_dir, subjects=subjects, contrast="cine", scanner="A", seed=seed, shape=(64, 64, 8), spacing=(3.0, 3.0, 8.0)
    )
    return load_slices(m, cfg=PreprocessConfig(size=64, spacing_mm=3.0))
