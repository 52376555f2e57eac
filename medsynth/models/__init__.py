"""Generative families behind one contract (:class:`~medsynth.models.base.GenerativeModel`) and a registry."""

from medsynth.models.base import AnomalyScores, GenerativeModel, Samples
from medsynth.models.registry import available_families, create_model, get_family, load_model

__all__ = [
    "AnomalyScores",
    "GenerativeModel",
    "Samples",
    "available_families",
    "create_model",
    "get_family",
    "load_model",
]
