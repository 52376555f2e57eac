"""Transforms, one per file. A random transform samples its parameters and hands them to a deterministic
twin, so every random result can be replayed from the recorded parameters."""

from medsynth.transforms.label_deformation import LabelDeformation, RandomLabelDeformation

__all__ = ["LabelDeformation", "RandomLabelDeformation"]
