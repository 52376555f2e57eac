"""The run configuration (``configs/*.yaml``), validated as a whole when the YAML is read.

Every nested section is checked then, before any stage runs: the typed sections below, the dict-valued ones
by the config of the component that uses them (``evaluation.segmentation.params`` and
``evaluation.translation.segmentation`` by :class:`medsynth.evaluation.segmentation.SegmentationConfig`,
``models[i].params`` by the family's ``Config``), and cross-field rules (each model's family must declare the
capability its flow uses). A problem anywhere is one :class:`~medsynth.errors.ConfigError` line naming the full
key path, e.g. ``configs/x.yaml: unknown key 'evaluation.segmentation.params.iteration'; allowed keys: …``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from medsynth.config import KeyProblem, StrictModel, check_with, load_config, nested
from medsynth.data.preprocess import PreprocessConfig


class PhantomSource(StrictModel):
    subjects: int = Field(8, ge=2)
    #: ``cine+lge``: both contrasts (``subjects`` each, different subjects), the two domains of a translate run
    contrast: Literal["cine", "lge", "cine+lge"] = "cine"
    #: ``A+B``: the same hearts (same seed and subject ids) rendered by both scanners, a *paired* pair of
    #: domains (``vendor`` phantom-A / phantom-B) whose test slices have their true translation
    scanner: Literal["A", "B", "A+B"] = "A"

    @model_validator(mode="after")
    def _one_pair(self) -> PhantomSource:
        if "+" in self.contrast and "+" in self.scanner:
            raise KeyProblem("scanner", "scanner: 'A+B' cannot be combined with contrast 'cine+lge'")
        return self


class DataConfig(StrictModel):
    """Where the real data comes from: the built-in phantom, a dataset layout under a root, or a manifest."""

    source: Literal["phantom", "layout", "manifest"] = "phantom"
    phantom: PhantomSource = PhantomSource()
    layout: str | None = None  # e.g. acdc, png-slices, mnms, emidec, nnunet
    root: str | None = None  # layout root, relative to the data root
    #: manifest CSV, relative to the data root; or an existing path from the working directory (e.g.
    #: data_manifests/acdc_emidec.csv) whose image paths are relative to the data root
    manifest: str | None = None
    data_root_env: str = "MEDSYNTH_DATA_ROOT"
    splits: dict[str, float] = {"train": 0.6, "val": 0.1, "test": 0.3}
    max_subjects: int | None = Field(None, ge=2)  # subsample subjects (stratified) for quick runs
    lenient: bool = False

    @model_validator(mode="after")
    def _check_source(self) -> DataConfig:
        if self.source == "layout" and not self.layout:
            raise ValueError("data.layout is required when data.source is 'layout'")
        if self.source == "manifest" and not self.manifest:
            raise ValueError("data.manifest is required when data.source is 'manifest'")
        return self

    @field_validator("splits")
    @classmethod
    def _check_splits(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = set(v) - {"train", "val", "test"}
        if unknown:
            raise ValueError(f"unknown split name(s) {sorted(unknown)}; allowed: train, val, test")
        if "train" not in v or "test" not in v:
            raise ValueError("splits need at least 'train' and 'test'")
        if abs(sum(v.values()) - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1, got {sum(v.values())}")
        return v


#: Keys of :class:`medsynth.evaluation.segmentation.SegmentationConfig` (imported when a config is validated).
SegmentationParams = nested("medsynth.evaluation.segmentation:SegmentationConfig")

#: The capability each flow uses of every configured model.
FLOW_CAPABILITY = {"augment": "sample", "anomaly": "score", "translate": "translate"}


class ModelSpec(StrictModel):
    """One generative family to fit. ``params`` is validated by the family's own config."""

    family: str
    name: str | None = None
    params: dict[str, Any] = {}
    fit_on: Literal["train", "healthy_train"] = "train"

    @model_validator(mode="after")
    def _check_family(self) -> ModelSpec:
        from medsynth.models.registry import get_family

        try:
            cls = get_family(self.family)
        except ValueError as err:
            raise KeyProblem("family", str(err)) from None
        check_with(cls.Config, self.params, key="params")
        return self

    @property
    def label(self) -> str:
        return self.name or self.family


class LabelSourceConfig(StrictModel):
    """Label maps for label-conditioned families: real training maps, randomly deformed (seeded)."""

    rotate_deg: float = Field(15.0, ge=0)
    scale: float = Field(0.1, ge=0, lt=0.5)
    translate_px: float = Field(4.0, ge=0)
    flip: bool = False
    #: share of the deformed scar-free maps (LV blood pool + healthy myocardium) that get a label-level scar
    #: (and MVO core) drawn from the training maps' scar shapes before a label-conditioned family renders them,
    #: so a healthy anatomy becomes a new scar case (LGE data with scar labels; 0 = off)
    scar_fraction: float = Field(0.0, ge=0, le=1)


class ScarInsertionConfig(StrictModel):
    """New scar cases: synthetic scar inserted into the healthy myocardium of real training LGE slices, by
    every fitted family declaring the ``scar`` capability (the GMM, fitted on slices with scar labels)."""

    enabled: bool = False
    n: int = Field(64, ge=1)


class SynthesisConfig(StrictModel):
    n: int = Field(64, ge=1)
    scar: ScarInsertionConfig = ScarInsertionConfig()
    labels: LabelSourceConfig = LabelSourceConfig()
    #: True: families declaring the ``context`` capability keep the real (equally deformed) surroundings of the
    #: source slice and synthesise only the heart. Off by default: on ACDC (6 training patients) it improved
    #: fidelity (rFD 0.56 vs 0.72) but the randomised surroundings helped the downstream U-Net more.
    context: bool = False


def _extractor_spec(v: str) -> str:
    """``random_cnn`` or a saved extractor folder (:func:`medsynth.evaluation.features.get_extractor`)."""
    if v != "random_cnn" and not Path(v).is_dir():
        raise ValueError(f"expected 'random_cnn' or a saved extractor folder, got {v!r}")
    return v


class FidelityStageConfig(StrictModel):
    enabled: bool = True
    extractor: str = "random_cnn"
    bootstrap: int = Field(100, ge=0)

    _check_extractor = field_validator("extractor")(_extractor_spec)


class SegmentationStageConfig(StrictModel):
    """Downstream U-Net arms. ``real+synthetic`` and ``synthetic`` run once per labelled synthetic set (one
    per fitted family, e.g. ``real+gmm``); the real arms run for every learning-curve point of
    ``n_real_patients`` (numbers of real training patients, or ``all``), each with every seed."""

    enabled: bool = True
    arms: list[Literal["real", "real+synthetic", "synthetic"]] = ["real", "real+synthetic"]
    seeds: list[int] = [0, 1, 2]
    n_real_patients: list[PositiveInt | Literal["all"]] = ["all"]
    params: SegmentationParams = {}

    @field_validator("n_real_patients")
    @classmethod
    def _check_curve(cls, v: list) -> list:
        from medsynth.evaluation.segmentation import check_n_real_patients

        return check_n_real_patients(v)

    @model_validator(mode="after")
    def _stage_keys(self) -> SegmentationStageConfig:
        for key in ("arms", "seeds", "n_real_patients", "n_train_patients"):
            if key in self.params:
                where = "n_real_patients" if key == "n_train_patients" else key
                raise KeyProblem(f"params.{key}", f"set evaluation.segmentation.{where} instead (the stage sets it)")
        return self


class AnomalyStageConfig(StrictModel):
    enabled: bool = True
    baselines: bool = True


class TranslationStageConfig(StrictModel):
    """Translate flow: FD to the target domain and target-U-Net Dice before / after translation (keys of
    :class:`medsynth.evaluation.translation.TranslationEvalConfig`)."""

    enabled: bool = True
    extractor: str = "random_cnn"
    bootstrap: int = Field(100, ge=0)
    direction: Literal["forward", "backward"] = "forward"
    segmentation: SegmentationParams = {}

    _check_extractor = field_validator("extractor")(_extractor_spec)


class EvaluationConfig(StrictModel):
    fidelity: FidelityStageConfig = FidelityStageConfig()
    segmentation: SegmentationStageConfig = SegmentationStageConfig()
    anomaly: AnomalyStageConfig = AnomalyStageConfig()
    translation: TranslationStageConfig = TranslationStageConfig()


class RunnerConfig(StrictModel):
    """Prefect task runner: ``local`` (threads), or ``dask`` on a new LocalCluster or an existing scheduler."""

    kind: Literal["local", "dask"] = "local"
    max_workers: int = Field(2, ge=1)
    address: str | None = None  # e.g. tcp://scheduler:8786; None starts a LocalCluster
    n_workers: int = Field(2, ge=1)
    threads_per_worker: int = Field(1, ge=1)


class OutputConfig(StrictModel):
    dir: str = "runs"
    dataset_id: int = Field(901, ge=1, le=999)
    dataset_name: str = "MedsynthAugmented"


class RunConfig(StrictModel):
    """A whole pipeline run. ``flow`` selects the Prefect flow (augment, anomaly, translate)."""

    run_name: str = "run"
    flow: Literal["augment", "anomaly", "translate"] = "augment"
    seed: int = 0
    data: DataConfig = DataConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    #: default: the registry's first family that can sample (looked up when a config leaves ``models`` out)
    models: list[ModelSpec] = Field(default_factory=lambda: [ModelSpec(family=_default_family())])
    synthesis: SynthesisConfig = SynthesisConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    runner: RunnerConfig = RunnerConfig()
    output: OutputConfig = OutputConfig()

    @field_validator("run_name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\") or v.startswith("."):
            raise ValueError("run_name must be a plain folder name")
        return v

    @model_validator(mode="after")
    def _unique_models(self) -> RunConfig:
        labels = [m.label for m in self.models]
        if len(set(labels)) != len(labels):
            raise ValueError(f"models: names must be unique, got {labels}; set 'name' to tell them apart")
        return self

    @model_validator(mode="after")
    def _flow_capabilities(self) -> RunConfig:
        """Every model can do what its flow asks of it (a CycleGAN cannot sample, so not in ``augment``)."""
        from medsynth.models.registry import families_with, get_family

        needed = FLOW_CAPABILITY[self.flow]
        for i, spec in enumerate(self.models):
            if needed not in get_family(spec.family).capabilities:
                raise KeyProblem(
                    f"models.{i}.family",
                    f"family {spec.family!r} cannot {needed}, which the {self.flow} flow needs of every model; "
                    f"families that can: {families_with(needed)}",
                )
        scarring = [m for m in self.models if "scar" in get_family(m.family).capabilities]
        if self.flow == "augment" and self.synthesis.scar.enabled and not scarring:
            raise KeyProblem(
                "synthesis.scar.enabled",
                f"no configured model can insert scar; families that can: {families_with('scar')}",
            )
        return self


def _default_family() -> str:
    from medsynth.models.registry import default_family

    return default_family("sample")


def load_run_config(path: str | Path) -> RunConfig:
    """Load and validate a run YAML, every nested section included (see the module docstring)."""
    return load_config(RunConfig, path)


def resolve_data_root(cfg: RunConfig, cli_root: str | None) -> Path | None:
    """``--data-root`` beats the environment variable named in the config."""
    if cli_root:
        return Path(cli_root)
    env = os.environ.get(cfg.data.data_root_env)
    return Path(env) if env else None
