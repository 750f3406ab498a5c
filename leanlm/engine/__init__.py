"""Batch-1 generation: a compiled decode step over a rollback-able static KV cache."""

from .cache import RollbackCache
from .engine import Engine, Generation, sample

__all__ = ["Engine", "Generation", "RollbackCache", "sample"]
