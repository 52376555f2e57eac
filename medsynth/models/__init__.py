"""Generative families behind one contract (:class:`~medsynth.models.base.GenerativeModel` plus declared
capability interfaces) and a registry."""

from medsynth.errors import CapabilityError
from medsynth.models.base import (
    AnomalyScores,
    ContextSampler,
    GenerativeModel,
    Sampler,
    Samples,
    ScarInserter,
    Scorer,
    TranslationDomains,
    Translator,
    require,
)
from medsynth.models.registry import available_families, create_model, get_family, load_model

__all__ = [
    "AnomalyScores",
    "CapabilityError",
    "ContextSampler",
    "GenerativeModel",
    "Samples",
    "Sampler",
    "ScarInserter",
    "Scorer",
    "TranslationDomains",
    "Translator",
    "available_families",
    "create_model",
    "get_family",
    "load_model",
    "require",
]
