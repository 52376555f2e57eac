"""The contract every generative family follows.

A family is a subclass of :class:`GenerativeModel` with a pydantic ``Config`` (unknown keys rejected),
registered by name in :mod:`medsynth.models.registry`. Callers only use this surface:

- ``model.fit(train, val=None, seed=0)`` on :class:`~medsynth.data.slices.SliceSet` s; returns a small report;
- ``model.sample(n, labels=None, seed=0)`` → :class:`Samples`; label-conditioned families
  (``conditional = True``) need ``labels`` (n, H, W); unconditional ones ignore it and may return labels;
- ``model.save(dir)`` / ``GenerativeModel.load(dir)``: ``model.json`` + ``weights.safetensors`` — no code
  runs on load;
- optional capabilities, declared in ``capabilities``: ``"score"`` (anomaly / likelihood scores per slice
  and pixel maps), ``"translate"`` (image-to-image), ``"context"`` (``sample(..., context=images)``
  keeps the real surroundings of (n, 1, H, W) images aligned with the label maps) and ``"scar"``
  (``insert_scar(images, labels, seed)``: new scar cases from healthy myocardium). Calling an undeclared
  capability raises :class:`CapabilityError`; callers check ``model.supports(...)`` instead of ``isinstance``.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from safetensors.numpy import load_file, save_file

from medsynth import __version__
from medsynth.config import StrictModel, validate
from medsynth.data.slices import SliceSet
from medsynth.errors import InputFileError, MedsynthError
from medsynth.utils.atomic import atomic_dir
from medsynth.utils.hashing import sha256_arrays, sha256_json

log = logging.getLogger(__name__)

MODEL_FILE = "model.json"
#: Config keys that change how a fit runs, not what it produces; left out of the model hash.
RUNTIME_CONFIG_KEYS = frozenset({"checkpoint_dir", "checkpoint_every", "progress"})
WEIGHTS_FILE = "weights.safetensors"


class CapabilityError(MedsynthError):
    """The family does not offer the requested capability (e.g. ``translate`` on a GMM)."""


@dataclass
class Samples:
    """Generated slices. ``images``: (n, 1, H, W) float32 on the SliceSet intensity scale;
    ``labels``: (n, H, W) uint8 canonical codes, or ``None`` for image-only families."""

    images: np.ndarray
    labels: np.ndarray | None = None


@dataclass
class AnomalyScores:
    """``slice_scores``: (N,) float, higher = more anomalous; ``pixel_maps``: (N, H, W) float32 or None."""

    slice_scores: np.ndarray
    pixel_maps: np.ndarray | None = None


class GenerativeModel(ABC):
    """Base class of every family. Subclasses set ``family``, ``Config`` and the class flags."""

    family: ClassVar[str] = ""
    Config: ClassVar[type[StrictModel]] = StrictModel
    conditional: ClassVar[bool] = False
    capabilities: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: StrictModel | dict[str, Any] | None = None) -> None:
        if isinstance(config, StrictModel):
            if not isinstance(config, self.Config):
                raise ValueError(f"config: expected {self.Config.__name__}, got {type(config).__name__}")
            self.config = config
        else:
            self.config = validate(self.Config, config or {}, source=f"{self.family} config")
        self.fitted = False

    # ---- the contract -------------------------------------------------------------------------------
    @abstractmethod
    def fit(self, train: SliceSet, val: SliceSet | None = None, seed: int = 0) -> dict[str, Any]:
        """Fit on ``train``; return a JSON-serialisable report (losses, held-out likelihood, ...)."""

    @abstractmethod
    def sample(self, n: int, labels: np.ndarray | None = None, seed: int = 0) -> Samples:
        """Draw ``n`` slices; same seed and state → identical output on CPU."""

    def score(self, slices: SliceSet) -> AnomalyScores:
        """Anomaly / likelihood scores; only for families declaring ``"score"``."""
        raise CapabilityError(f"family {self.family!r} cannot score (capabilities: {sorted(self.capabilities)})")

    def translate(self, images: np.ndarray, seed: int = 0, direction: str = "forward") -> np.ndarray:
        """Image-to-image translation of (N, 1, H, W) into the target domain (``"backward"``: into the source
        domain), same shape; only for families declaring ``"translate"``."""
        raise CapabilityError(f"family {self.family!r} cannot translate (capabilities: {sorted(self.capabilities)})")

    def translation_domains(self, slices: SliceSet, direction: str = "forward") -> tuple[str, str, str, np.ndarray]:
        """``(metadata column, from-domain, to-domain, mask (N,) of the slices in the from-domain)`` for
        ``direction``; only for families declaring ``"translate"``."""
        raise CapabilityError(f"family {self.family!r} cannot translate (capabilities: {sorted(self.capabilities)})")

    def insert_scar(self, images: np.ndarray, labels: np.ndarray, seed: int = 0) -> Samples:
        """Synthetic scar in the healthy myocardium of real LGE slices: images (n, 1, H, W), canonical labels
        (n, H, W) → new pairs in which only myocardium changed; only for families declaring ``"scar"``."""
        raise CapabilityError(f"family {self.family!r} cannot insert scar (capabilities: {sorted(self.capabilities)})")

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
            (tmp / MODEL_FILE).write_text(json.dumps(record, indent=2, default=_json_default), encoding="utf-8")
        log.info("saved %s model to %s (hash %s)", self.family, directory, record["model_hash"])
        return Path(directory)

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


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
