"""Batch-1 generation: a compiled decode step over a rollback-able static KV cache."""

from .cache import RollbackCache
from .engine import Engine, Generation, sample
from .text import StreamingText, generate

__all__ = ["Engine", "Generation", "RollbackCache", "StreamingText", "generate", "sample"]
