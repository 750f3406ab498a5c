"""Native CPU kernels, compiled on first use with the system's C++ compiler (cached by PyTorch).

`rows_linear(x, w)`: a product of a few rows (2..16) with a float32 or bf16 weight that reads the
weight once; what verifying k drafted tokens in one step needs (see leanlm/csrc/rows_linear.cpp).
`fake_quant_module()`: fused fake quantization (forward and backward) for QAT/QAD on CPUs
(leanlm/csrc/fake_quant.cpp). If a kernel cannot be built (no compiler), callers fall back to the
generic paths, with one warning.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "rows_linear.cpp"
DECODE_SOURCE = Path(__file__).parent / "csrc" / "decode_step.cpp"
FAKE_QUANT_SOURCE = Path(__file__).parent / "csrc" / "fake_quant.cpp"


ROWS_LINEAR = False  # set by rows_linear_available(); compiled code reads this flag, never builds


def _build(name: str, source: Path, python_module: bool):
    """Compile `source` (or load its cached build); raises whatever the toolchain raises."""
    import os
    import shutil
    import sys

    if shutil.which("ninja") is None:  # the `ninja` wheel's binary sits beside this interpreter
        os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    from torch.utils.cpp_extension import load

    # -fopenmp: at::parallel_for is inlined from headers and runs on one thread without it.
    return load(name=name, sources=[str(source)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"], is_python_module=python_module, verbose=False)


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


@functools.cache
def rows_linear_available() -> bool:
    """Build (or load the cached build of) the kernel; call it before compiling code that uses it."""
    global ROWS_LINEAR
    try:
        _build("leanlm_rows_linear", SOURCE, python_module=False)
    except Exception as e:  # noqa: BLE001 - a missing compiler or toolchain: fall back, say so once
        warnings.warn(f"leanlm's native kernel could not be built ({_why(e)}); multi-token steps use generic "
                      "kernels", stacklevel=2)
        return False

    @torch.library.register_fake("leanlm_kernels::rows_linear")
    def _(x, w):
        return x.new_empty(x.shape[0], w.shape[0])

    ROWS_LINEAR = True
    return True


def rows_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x [M, K] float32 @ w[N, K].T`` for M <= 16 (w float32, bf16 or int8 codes), reading `w` once."""
    return torch.ops.leanlm_kernels.rows_linear(x, w)


@functools.cache
def decode_step_module():
    """The compiled `decode_step` extension (see leanlm/csrc/decode_step.cpp), or the reason it is not
    usable here (a string: no compiler, or a CPU without AVX512-BF16)."""
    try:
        mod = _build("leanlm_decode_step", DECODE_SOURCE, python_module=True)
    except Exception as e:  # noqa: BLE001 - the engine falls back to its compiled step and reports this
        return f"the native decode step could not be built ({_why(e)})"
    if not mod.available():
        return "the native decode step needs a CPU with AVX512-BF16"
    return mod


FAKE_QUANT = None  # the fake-quantization extension once `fake_quant_module()` has built it


@functools.cache
def fake_quant_module():
    """The compiled fused fake-quantization extension, or None (no compiler: PyTorch ops serve, slower)."""
    global FAKE_QUANT
    try:
        FAKE_QUANT = _build("leanlm_fake_quant", FAKE_QUANT_SOURCE, python_module=True)
        return FAKE_QUANT
    except Exception as e:  # noqa: BLE001 - a missing compiler or toolchain: fall back, say so once
        warnings.warn(f"leanlm's fused fake-quantization kernel could not be built ({_why(e)}); QAT and QAD "
                      "fake-quantize with PyTorch ops (slower)", stacklevel=2)
        return None
