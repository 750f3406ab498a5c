"""Where benchmarks keep what is slow to rebuild: generated text, teacher caches, trained heads, checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

from leanlm.models import leanlm_home


def work_dir(name: str = "") -> Path:
    """`LEANLM_BENCH_WORK`, else `bench/` under `LEANLM_HOME` (~/.cache/leanlm), beside the converted models:
    a fresh clone of the repository reuses what an earlier one built (an EAGLE-3 head, generated training
    text) instead of spending most of an hour rebuilding it."""
    root = Path(os.environ.get("LEANLM_BENCH_WORK") or leanlm_home() / "bench")
    return root / name if name else root
