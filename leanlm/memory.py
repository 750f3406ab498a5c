"""Process memory: peak resident size, and handing freed memory back to the OS."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource
import sys


@functools.cache  # find_library runs ldconfig: once per process is enough
def _libc():
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None  # glibc only


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc otherwise keeps many freed temporaries)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def peak_rss_bytes() -> int:
    """The largest resident set this process has had."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB
