"""The contract every generative family follows: one base class and declared capability interfaces.

A family is a subclass of :class:`GenerativeModel` with a pydantic ``Config`` (unknown keys and cross-field
inconsistencies rejected when the config is validated), registered by name in :mod:`medsynth.models.registry`
(or through the ``medsynth.families`` entry-point group). Every family implements:

- ``fit(train, val=None, seed=0)`` on :class:`~medsynth.data.slices.SliceSet` s; returns a small JSON report;
- ``get_state()`` / ``set_state(arrays, meta)``: named numpy arrays + JSON metadata, so ``save(dir)`` /
  ``GenerativeModel.load(dir)`` write ``model.json`` + ``weights.safetensors`` and no code runs on load.

What a family can do beyond that it declares by inheriting capability interfaces, each with one signature:

=================  ==========  =====================================================================================
interface          capability  method(s)
=================  ==========  =====================================================================================
:class:`Sampler`   ``sample``  ``sample(n, labels=None, seed=0) -> Samples``; ``conditional`` families need labels
:class:`ContextSampler` ``context`` ``sample_in_context(labels, context, seed=0) -> Samples`` (real surroundings)
:class:`Scorer`    ``score``   ``score(slices) -> AnomalyScores``
:class:`Translator` ``translate`` ``translate(images, seed=0, direction="forward")``,
                               ``translation_domains(slices, direction="forward") -> TranslationDomains``
:class:`ScarInserter` ``scar`` ``insert_scar(images, labels, seed=0) -> Samples``
:class:`StyleTransfer` ``style`` ``sample_with_style(labels, reference_images, seed=0) -> Samples``
=================  ==========  =====================================================================================

Callers ask ``model.supports("sample")`` (a fitted model may lack one its family declares, e.g. a GMM fitted
without scar labels cannot ``score``) or call :func:`require`, which raises :class:`CapabilityError` naming the
family and the capability; calling an undeclared capability's method raises the same error. No caller tests
``isinstance`` against a family class or names a family.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
from safetensors.numpy import load_file, save_file

from medsynth import __version__
from medsynth.config import StrictModel, validate
from medsynth.data.slices import SliceSet
from medsynth.errors import CapabilityError, InputFileError, MedsynthError
from medsynth.utils.atomic import atomic_dir
from medsynth.utils.hashing import sha256_arrays, sha256_json

log = logging.getLogger(__name__)

MODEL_FILE = "model.json"
#: Config keys that change how a fit runs, not what it produces; left out of the model hash.
RUNTIME_CONFIG_KEYS = frozenset({"checkpoint_dir", "checkpoint_every", "progress", "device"})
WEIGHTS_FILE = "weights.safetensors"


@dataclass
class Samples:
    """Generated slices. ``images``: (n, 1, H, W) float32 on the SliceSet intensity scale;
    ``labels``: (n, H, W) uint8 canonical codes, or ``None`` for image-only families."""

    images: np.ndarray
    labels: np.ndarray | None = None


@dataclass
class AnomalyScores:
    """``slice_scores``: (N,) float, higher = more anomalous; ``pixel_maps``: (N, H, W) float32 or None.

    ``pixel_threshold``: set by families whose pixel maps are calibrated (e.g. a posterior probability, 0.5)
    — a pixel above it is called anomalous; ``None`` (likelihoods, reconstruction errors): callers derive a
    threshold from reference data instead."""

    slice_scores: np.ndarray
    pixel_maps: np.ndarray | None = None
    pixel_threshold: float | None = None


class TranslationDomains(NamedTuple):
    """The domains of a translation direction on a slice set: metadata column ``key``, the ``source`` value
    translated from, the ``target`` value translated to, and ``mask`` (N,) bool of the from-domain slices."""

    key: str
    source: str
    target: str
    mask: np.ndarray


# ---- capability interfaces ----------------------------------------------------------------------------
class Capability(ABC):  # noqa: B024 - a marker base: the interfaces below carry the abstract methods
    """Base of the capability interfaces; ``capability`` is the name a family declares by inheriting one."""

    capability: ClassVar[str] = ""


class Sampler(Capability):
    """Draws new slices (capability ``sample``)."""

    capability: ClassVar[str] = "sample"

    @abstractmethod
    def sample(self, n: int, labels: np.ndarray | None = None, seed: int = 0) -> Samples:
        """Draw ``n`` slices; label-conditioned families (``conditional = True``) need ``labels`` (n, H, W)
        canonical codes and raise :class:`~medsynth.errors.LabelError` without them; unconditional ones ignore
        them. Same seed and state → identical output on CPU."""


class ContextSampler(Capability):
    """Synthesises the heart into real surroundings (capability ``context``)."""

    capability: ClassVar[str] = "context"

    @abstractmethod
    def sample_in_context(self, labels: np.ndarray, context: np.ndarray, seed: int = 0) -> Samples:
        """One image per label map ``labels`` (n, H, W); the surroundings (label 0) of ``context`` (n, 1, H, W),
        real images aligned with the labels, are kept and only the heart is synthesised."""


class Scorer(Capability):
    """Anomaly / likelihood scores (capability ``score``)."""

    capability: ClassVar[str] = "score"

    @abstractmethod
    def score(self, slices: SliceSet) -> AnomalyScores:
        """Per-slice scores (N,) and pixel maps (N, H, W) of ``slices``, higher = more anomalous."""


class Translator(Capability):
    """Image-to-image translation between two domains of the slice metadata (capability ``translate``)."""

    capability: ClassVar[str] = "translate"
    #: the directions ``translate`` accepts (one-sided families such as CUT: ``("forward",)``)
    directions: ClassVar[tuple[str, ...]] = ("forward", "backward")

    @abstractmethod
    def translate(self, images: np.ndarray, seed: int = 0, direction: str = "forward") -> np.ndarray:
        """(N, 1, H, W) from-domain images → the to-domain (``"backward"``: target → source), same shape."""

    @abstractmethod
    def translation_domains(self, slices: SliceSet, direction: str = "forward") -> TranslationDomains:
        """Which metadata column and values ``direction`` translates between, and which of ``slices`` are in
        its from-domain."""


class ScarInserter(Capability):
    """New scar cases from real slices (capability ``scar``)."""

    capability: ClassVar[str] = "scar"

    @abstractmethod
    def insert_scar(self, images: np.ndarray, labels: np.ndarray, seed: int = 0) -> Samples:
        """Synthetic scar in the healthy myocardium of real LGE slices: images (n, 1, H, W), canonical labels
        (n, H, W) → new pairs in which only myocardium changed."""


class StyleTransfer(Capability):
    """Label-conditioned synthesis in the appearance of reference images (capability ``style``)."""

    capability: ClassVar[str] = "style"

    @abstractmethod
    def sample_with_style(self, labels: np.ndarray, reference_images: np.ndarray, seed: int = 0) -> Samples:
        """One image per label map ``labels`` (n, H, W) in the appearance (scanner / contrast style) of
        ``reference_images`` (n, 1, H', W'), one reference per label map, on the slice intensity scale; the
        references' anatomy is not copied."""


#: Methods of each capability, so calling one a family does not declare raises CapabilityError.
CAPABILITY_METHODS: dict[str, str] = {
    method: iface.capability
    for iface in (Sampler, ContextSampler, Scorer, Translator, ScarInserter, StyleTransfer)
    for method in sorted(iface.__abstractmethods__)
}
CAPABILITIES: tuple[str, ...] = ("sample", "context", "score", "translate", "scar", "style")


def declared_capabilities(cls: type) -> frozenset[str]:
    """The capabilities a family class declares (the capability interfaces it inherits)."""
    return frozenset(
        vars(b)["capability"] for b in cls.__mro__ if issubclass(b, Capability) and vars(b).get("capability")
    )


def require(model: GenerativeModel, capability: str, detail: str = "") -> GenerativeModel:
    """``model`` when it offers ``capability``; :class:`CapabilityError` naming family and capability else."""
    if capability not in CAPABILITIES:
        raise ValueError(f"capability: unknown {capability!r}; known: {list(CAPABILITIES)}")
    if not model.supports(capability):
        raise CapabilityError(model.family, capability, detail)
    return model


class GenerativeModel(ABC):
    """Base class of every family. Subclasses set ``family``, ``Config``, ``conditional`` and inherit the
    capability interfaces they implement (``capabilities`` is derived from them)."""

    family: ClassVar[str] = ""
    Config: ClassVar[type[StrictModel]] = StrictModel
    conditional: ClassVar[bool] = False
    capabilities: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.capabilities = declared_capabilities(cls)

    def __init__(self, config: StrictModel | dict[str, Any] | None = None) -> None:
        if isinstance(config, StrictModel):
            if not isinstance(config, self.Config):
                raise ValueError(f"config: expected {self.Config.__name__}, got {type(config).__name__}")
            self.config = config
        else:
            self.config = validate(self.Config, config or {}, source=f"{self.family} config")
        self.fitted = False
        #: what the last ``sample`` call says beside its samples (JSON-able; e.g. the label maps a plausibility
        #: filter rejected: ``n``, ``rejected``, ``rejected_fraction``, ``reasons``); empty when nothing to say
        self.last_sample_report: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        # only reached when normal lookup fails: a capability method this family does not implement
        capability = CAPABILITY_METHODS.get(name)
        if capability is not None:
            raise CapabilityError(self.family, capability, f"its capabilities are {sorted(self.capabilities)}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ---- the contract -------------------------------------------------------------------------------
    @abstractmethod
    def fit(self, train: SliceSet, val: SliceSet | None = None, seed: int = 0) -> dict[str, Any]:
        """Fit on ``train``; return a JSON-serialisable report (losses, held-out likelihood, ...)."""

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        """Config keys for a seconds-long fit on tiny (e.g. 32 × 32) slices, used by the family contract test
        (``tests/test_contract.py``) so a new family is tested without editing the test."""
        return {}

    def supports(self, capability: str) -> bool:
        """Whether this model offers ``capability`` (a fitted model may lack one its family can have)."""
        return capability in self.capabilities

    def supported(self) -> list[str]:
        return sorted(c for c in self.capabilities if self.supports(c))

    # ---- state: subclasses turn themselves into arrays + JSON metadata and back ----------------------
    @abstractmethod
    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Return ``(arrays, meta)``: named numpy arrays and JSON-serialisable metadata."""

    @abstractmethod
    def set_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Restore from :meth:`get_state` output."""

    @property
    def model_hash(self) -> str:
        """Content hash of the state and the config, leaving out runtime-only keys (where checkpoints go)."""
        arrays, meta = self.get_state()
        config = {k: v for k, v in self.config.model_dump().items() if k not in RUNTIME_CONFIG_KEYS}
        return sha256_json({"arrays": sha256_arrays(arrays), "meta": meta, "config": config})[:16]

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise MedsynthError(f"family {self.family!r}: the model is not fitted (call fit or load)")

    def save(self, directory: str | Path) -> Path:
        """Write ``model.json`` and ``weights.safetensors`` into ``directory`` atomically."""
        self._require_fitted()
        arrays, meta = self.get_state()
        arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        record = {
            "family": self.family,
            "medsynth_version": __version__,
            "config": self.config.model_dump(mode="json"),
            "meta": meta,
            "model_hash": self.model_hash,
            # names, dtypes and shapes of the weights: load checks them before any code uses the arrays
            "arrays": {k: [str(v.dtype), list(v.shape)] for k, v in sorted(arrays.items())},
        }
        with atomic_dir(directory) as tmp:
            if arrays:
                save_file(arrays, str(tmp / WEIGHTS_FILE))
            self.write_artifacts(tmp)
            (tmp / MODEL_FILE).write_text(json.dumps(record, indent=2, default=json_default), encoding="utf-8")
        log.info("saved %s model to %s (hash %s)", self.family, directory, record["model_hash"])
        return Path(directory)

    def write_artifacts(self, directory: Path) -> None:
        """Hook: extra files beside the weights (e.g. training curves), written by :meth:`save` inside its atomic
        directory. Default: nothing."""
        return None

    @classmethod
    def load(cls, directory: str | Path) -> GenerativeModel:
        """Load any family's model from ``directory`` (dispatching on ``model.json``'s ``family``)."""
        from medsynth.models.registry import get_family

        directory = Path(directory)
        record = read_model_record(directory)
        try:
            family_cls = get_family(record["family"])
        except ValueError as err:
            raise InputFileError(f"{directory / MODEL_FILE}: {err}") from None
        if cls is not GenerativeModel and not issubclass(family_cls, cls):
            raise InputFileError(f"{directory}: holds a {record['family']!r} model, not {cls.family!r}")
        model = family_cls(record.get("config") or {})
        weights = directory / WEIGHTS_FILE
        try:
            arrays = load_file(str(weights)) if weights.exists() else {}
        except Exception as err:  # safetensors raises its own error types on truncated files
            raise InputFileError(f"{weights}: corrupt or truncated weights: {err}") from None
        expected = record.get("arrays")
        if isinstance(expected, dict):
            found = {k: [str(v.dtype), list(v.shape)] for k, v in arrays.items()}
            if found != expected:
                what = "missing" if not weights.exists() else "not the layout model.json records"
                diff = sorted(set(expected) ^ set(found)) or sorted(k for k in expected if expected[k] != found.get(k))
                raise InputFileError(f"{weights}: weights {what} (arrays {diff[:4]} differ)")
        try:
            model.set_state(arrays, record.get("meta") or {})
        except (KeyError, ValueError, TypeError, IndexError) as err:  # missing or another family's arrays
            what = "missing" if not weights.exists() else "not this family's layout"
            raise InputFileError(
                f"{weights}: weights {what} for a {record['family']!r} model ({type(err).__name__}: {err})"
            ) from None
        model.fitted = True
        return model


def read_model_record(directory: str | Path) -> dict[str, Any]:
    """Parse ``model.json`` in ``directory`` with clear errors."""
    path = Path(directory) / MODEL_FILE
    if not path.is_file():
        raise InputFileError(f"{path}: no model here (missing {MODEL_FILE})")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputFileError(f"{path}: corrupt model record: {err}") from None
    if not isinstance(record, dict) or "family" not in record:
        raise InputFileError(f"{path}: model record has no 'family'")
    return record


def json_default(obj: Any) -> Any:
    """``json.dumps`` fallback for the records medsynth writes (model records, fit reports): numpy values
    and paths; anything else is an error rather than a silent ``str``."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
