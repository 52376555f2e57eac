"""Registry of generative families by name. Configs, the CLI and the flows select families only here.

Three sources, looked up in this order:

1. families registered in this process with :func:`register_family`;
2. the built-ins below, listed as ``"module:Class"`` so importing the registry stays cheap (torch-based
   families are imported when first used);
3. third-party families advertised by installed distributions in the entry-point group
   ``medsynth.families`` (``name = "package.module:Class"`` in their ``pyproject.toml``). They are read from
   the installed metadata on first use, so every process that imports medsynth — a Dask worker included —
   sees them without registering anything by hand.

A new family is one module with a :class:`~medsynth.models.base.GenerativeModel` subclass plus one line here
(or one entry point).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from typing import Any

from medsynth.errors import ConfigError
from medsynth.models.base import GenerativeModel

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "medsynth.families"

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
    "ddpm": "medsynth.models.diffusion.ddpm:DDPMModel",
    "ddpm_uncond": "medsynth.models.diffusion.ddpm:DDPMUncondModel",
    "ddpm_joint": "medsynth.models.diffusion.ddpm:DDPMJointModel",
    "ldm": "medsynth.models.diffusion.ldm:LDMModel",
    "cut": "medsynth.models.translation.cut:CUTModel",
    "fastcut": "medsynth.models.translation.cut:FastCUTModel",
    "pix2pix": "medsynth.models.gan.pix2pix:Pix2PixModel",
    "spade": "medsynth.models.gan.spade:SpadeModel",
}
_LOADED: dict[str, type[GenerativeModel]] = {}


def register_family(cls: type[GenerativeModel]) -> type[GenerativeModel]:
    """Class decorator / function registering a family under ``cls.family`` in this process."""
    if not cls.family:
        raise ValueError(f"family: {cls.__name__} has an empty family name")
    _LOADED[cls.family] = cls
    return cls


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """Installed third-party families (read on every call: cheap, and a newly installed plug-in is seen)."""
    found = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _BUILTIN:
            log.warning("entry point %s = %s ignored: %r is a built-in family", ep.name, ep.value, ep.name)
            continue
        found[ep.name] = ep
    return found


def available_families() -> list[str]:
    return sorted(set(_BUILTIN) | set(_LOADED) | set(_entry_points()))


def get_family(name: str) -> type[GenerativeModel]:
    """The class registered as ``name``; :class:`ConfigError` (a ``ValueError``) naming the known families."""
    if name in _LOADED:
        return _LOADED[name]
    target = _BUILTIN.get(name)
    if target is not None:
        module_name, cls_name = target.split(":")
        cls = getattr(importlib.import_module(module_name), cls_name)
    else:
        ep = _entry_points().get(name)
        if ep is None:
            raise ConfigError(f"family: unknown generative family {name!r}; known: {available_families()}")
        try:
            cls = ep.load()
        except Exception as err:  # a broken plug-in must not look like an unknown family
            raise ConfigError(f"family: entry point {name} = {ep.value} failed to load: {err}") from None
        if not (isinstance(cls, type) and issubclass(cls, GenerativeModel)) or cls.family != name:
            raise ConfigError(
                f"family: entry point {name} = {ep.value} is not a GenerativeModel subclass with family {name!r}"
            )
    _LOADED[name] = cls
    return cls


def _names() -> list[str]:
    """Built-ins first in registry order, then the others by name."""
    return list(_BUILTIN) + sorted(set(available_families()) - set(_BUILTIN))


def families_with(capability: str) -> list[str]:
    """Names of the families declaring ``capability`` (imports every family: for messages and listings)."""
    return [n for n in _names() if capability in get_family(n).capabilities]


def default_family(capability: str) -> str:
    """The first registered family declaring ``capability`` (e.g. the scar model fitted when a scar
    evaluation is given no model): keeps family names out of the callers. Imports families only until one
    matches."""
    for name in _names():
        if capability in get_family(name).capabilities:
            return name
    raise ConfigError(f"family: no registered family declares {capability!r}")


def create_model(name: str, config: dict[str, Any] | None = None, checkpoint_dir: Any = None) -> GenerativeModel:
    """Instantiate family ``name`` with a validated config (:class:`ConfigError` naming the key otherwise).

    ``checkpoint_dir`` is a default for families that checkpoint their training (their config has a
    ``checkpoint_dir`` key): an interrupted fit then resumes from its last checkpoint when run again.
    """
    cls = get_family(name)
    config = dict(config or {})
    if checkpoint_dir is not None and "checkpoint_dir" in cls.Config.model_fields and not config.get("checkpoint_dir"):
        config["checkpoint_dir"] = str(checkpoint_dir)
    return cls(config)


def resolved_params(name: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Family ``name``'s validated config with every default filled in, runtime-only keys (device, checkpoints,
    progress) left out: what a fit computes with. The fit stage checks a cached fit against it, so a changed
    default refits instead of reusing a model fitted under the old one (:func:`medsynth.workflows.stage.
    resolved_inputs`; :class:`ConfigError` naming the key when ``config`` is invalid)."""
    from medsynth.config import validate
    from medsynth.models.base import RUNTIME_CONFIG_KEYS

    cfg = validate(get_family(name).Config, dict(config or {}), f"models[{name}].params")
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in RUNTIME_CONFIG_KEYS}


def load_model(directory: Any) -> GenerativeModel:
    """Load a saved model of any family."""
    return GenerativeModel.load(directory)
