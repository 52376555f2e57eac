"""Registry of generative families by name. Configs, the CLI and the flows select families only here.

Built-in families are listed as ``"module:Class"`` so importing the registry stays cheap (torch-based
families are imported when first used). Third-party families register with :func:`register_family`.
"""

from __future__ import annotations

import importlib
from typing import Any

from medsynth.models.base import GenerativeModel

_BUILTIN: dict[str, str] = {
    # family name -> "module:Class"
    "gmm": "medsynth.models.gmm.model:GMMModel",
    "pca": "medsynth.models.latent.pca:PCAModel",
    "ppca": "medsynth.models.latent.pca:PPCAModel",
    "shape_pca": "medsynth.models.latent.shape:ShapeModel",
    "ae": "medsynth.models.latent.autoencoder:AEModel",
    "dae": "medsynth.models.latent.autoencoder:DAEModel",
    "vae": "medsynth.models.latent.autoencoder:VAEModel",
    "cvae": "medsynth.models.latent.autoencoder:CVAEModel",
    "flow": "medsynth.models.flow.model:FlowModel",
    "cyclegan": "medsynth.models.translation.cyclegan:CycleGANModel",
}
_LOADED: dict[str, type[GenerativeModel]] = {}


def register_family(cls: type[GenerativeModel]) -> type[GenerativeModel]:
    """Class decorator / function registering a family under ``cls.family``."""
    if not cls.family:
        raise ValueError(f"family: {cls.__name__} has an empty family name")
    _LOADED[cls.family] = cls
    return cls


def available_families() -> list[str]:
    return sorted(set(_BUILTIN) | set(_LOADED))


def get_family(name: str) -> type[GenerativeModel]:
    """The class registered as ``name``; ``ValueError`` naming the known families otherwise."""
    if name in _LOADED:
        return _LOADED[name]
    target = _BUILTIN.get(name)
    if target is None:
        raise ValueError(f"family: unknown generative family {name!r}; known: {available_families()}")
    module_name, cls_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    _LOADED[name] = cls
    return cls


def create_model(name: str, config: dict[str, Any] | None = None, checkpoint_dir: Any = None) -> GenerativeModel:
    """Instantiate family ``name`` with a validated config.

    ``checkpoint_dir`` is a default for families that checkpoint their training (their config has a
    ``checkpoint_dir`` key): an interrupted fit then resumes from its last checkpoint when run again.
    """
    cls = get_family(name)
    config = dict(config or {})
    if checkpoint_dir is not None and "checkpoint_dir" in cls.Config.model_fields and not config.get("checkpoint_dir"):
        config["checkpoint_dir"] = str(checkpoint_dir)
    return cls(config)


def load_model(directory: Any) -> GenerativeModel:
    """Load a saved model of any family."""
    return GenerativeModel.load(directory)
