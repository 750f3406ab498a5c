"""Pruning: Minitron-style structured pruning (width and depth) into smaller HF models, and
unstructured / 2:4 sparsity (magnitude, Wanda, SparseGPT)."""

import sys

from .api import choose, parse_fraction, prune, shape_for_target
from .depth import drop_layers
from .importance import Importance, importance, layer_loss_importance
from .shapes import non_embedding_parameters
from .sparsity import sparsify, sparsity_masks, sparsity_report
from .structured import Keep, apply_keep

__all__ = ["Importance", "Keep", "apply_keep", "choose", "drop_layers", "importance", "layer_loss_importance",
           "non_embedding_parameters", "parse_fraction", "prune", "shape_for_target", "sparsify", "sparsity_masks",
           "sparsity_report"]


class _CallableModule(type(sys.modules[__name__])):
    """`leanlm.prune(model, calib, ...)` calls `prune`, while `leanlm.prune.importance` etc. stay reachable."""

    def __call__(self, *args, **kwargs):
        return prune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
