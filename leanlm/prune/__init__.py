"""Structured pruning (so far: dropping whole decoder layers into a genuinely smaller HF model)."""

from .depth import drop_layers

__all__ = ["drop_layers"]
