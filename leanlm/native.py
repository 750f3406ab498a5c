"""Native CPU kernels, compiled on first use with the system's C++ compiler (cached by PyTorch).

`rows_linear(x, w)`: a product of a few rows (2..16) with a float32 or bf16 weight that reads the
weight once; what verifying k drafted tokens in one step needs (see leanlm/csrc/rows_linear.cpp).
If the kernel cannot be built (no compiler), callers fall back to the generic paths, with one
warning.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "rows_linear.cpp"


ROWS_LINEAR = False  # set by rows_linear_available(); compiled code reads this flag, never builds


@functools.cache
def rows_linear_available() -> bool:
    """Build (or load the cached build of) the kernel; call it before compiling code that uses it."""
    global ROWS_LINEAR
    import os
    import shutil
    import sys

    if shutil.which("ninja") is None:  # the `ninja` wheel's binary sits beside this interpreter
        os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    try:
        from torch.utils.cpp_extension import load

        # -fopenmp: at::parallel_for is inlined from headers and runs on one thread without it.
        load(name="leanlm_rows_linear", sources=[str(SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
             extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except Exception as e:  # noqa: BLE001 - a missing compiler or toolchain: fall back, say so once
        warnings.warn(f"leanlm's native kernel could not be built ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); multi-token steps use generic kernels",
                      stacklevel=2)
        return False

    @torch.library.register_fake("leanlm_kernels::rows_linear")
    def _(x, w):
        return x.new_empty(x.shape[0], w.shape[0])

    ROWS_LINEAR = True
    return True


def rows_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x [M, K] float32 @ w[N, K].T`` for M <= 16 (w float32 or bf16), reading `w` once."""
    return torch.ops.leanlm_kernels.rows_linear(x, w)
