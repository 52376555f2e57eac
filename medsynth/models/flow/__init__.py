"""Normalizing-flow family (Glow-style)."""
