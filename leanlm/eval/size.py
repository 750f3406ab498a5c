"""Model size: parameters, bytes of weights as stored, resident memory."""

from __future__ import annotations

import psutil
from torch import nn


def parameter_count(model: nn.Module) -> int:
    """Logical parameters: a quantized weight counts its original elements once."""
    from ..quant.linear import QuantLinear

    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.frozen:
            total += module.in_features * module.out_features
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.nbytes)
        if key not in seen:
            seen.add(key)
            total += t.nbytes
    return total


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the state dict as stored (codes and scales for quantized layers; tied tensors once)."""
    return _unique_bytes(model.state_dict().values())


def held_tensors(model: nn.Module) -> list:
    """Every tensor the model holds to run: parameters, buffers, and packed-kernel layouts."""
    import torch

    from ..quant.linear import QuantLinear

    extra = [t for m in model.modules() if isinstance(m, QuantLinear) and m._kernel is not None
             for t in m._kernel[1:] if isinstance(t, torch.Tensor)]
    return [*model.parameters(), *model.buffers(), *extra]


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of memory the model's tensors take (shared storage counted once)."""
    return _unique_bytes(held_tensors(model))


def resident_bytes() -> int:
    return psutil.Process().memory_info().rss


def model_size(model: nn.Module) -> dict:
    return {"parameters": parameter_count(model), "weight_bytes": weight_bytes(model),
            "resident_bytes": resident_bytes()}
