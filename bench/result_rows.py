"""Benchmark results kept row by row: a rerun with the same settings skips the rows already done."""

from __future__ import annotations

import json
import time
from pathlib import Path

from leanlm.atomic import atomic_write_text


class ResultRows:
    """Rows of one results file; `keys` name the fields that identify a row."""

    def __init__(self, path: Path, settings: dict, keys: tuple[str, ...], fresh: bool = False, **meta):
        self.path, self.settings, self.keys, self.meta = Path(path), settings, keys, meta
        self.rows: list[dict] = []
        if self.path.is_file() and not fresh:
            before = json.loads(self.path.read_text())
            if before.get("settings") == settings:
                self.rows = before["rows"]

    def done(self, *key) -> bool:
        return any(tuple(r[k] for k in self.keys) == key for r in self.rows)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.save()

    def save(self) -> None:
        """Written atomically after every row: a killed run keeps what it finished."""
        atomic_write_text(self.path, json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), **self.meta,
                                                 "settings": self.settings, "rows": self.rows}, indent=2) + "\n")
