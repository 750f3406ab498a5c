"""Export a leanlm model into checkpoints that serving runtimes load.

`export(model_dir, format, out)` loads the model (float or quantized by leanlm), writes the format
into a temporary folder, validates what was written by reading it back independently of the writer,
records a manifest (file sizes and SHA-256) last, and only then renames the folder into place. A folder
without a valid manifest is an incomplete or corrupt export: `verify_export` refuses it.

Formats (one module each, with ``write(model, tokenizer, out, **options) -> dict`` and
``validate(out, model, tokenizer) -> dict``):
- ``compressed-tensors``: vLLM's native format; transformers loads it with the compressed-tensors package.
- ``modelopt``: the unified HF checkpoint with ``hf_quant_config.json`` (TensorRT-LLM, vLLM ``modelopt``).
- ``gguf``: a single GGUF file for llama.cpp (Q8_0, Q4_0, ...).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
from pathlib import Path

from ..atomic import atomic_dir
from ..errors import LeanLMError

FORMATS = {
    "compressed-tensors": "compressed_tensors",
    "modelopt": "modelopt",
    "gguf": "gguf",
}
MANIFEST = "leanlm_export.json"


def _module(format: str):
    if format not in FORMATS:
        raise LeanLMError(f"unknown export format '{format}': use one of {', '.join(FORMATS)}")
    return importlib.import_module(f".{FORMATS[format]}", __name__)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(out: Path, format: str, summary: dict) -> None:
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(out.iterdir()) if p.is_file() and p.name != MANIFEST}
    (out / MANIFEST).write_text(json.dumps({"format": format, "files": files, **summary}, indent=2))


def verify_export(path: str | os.PathLike) -> dict:
    """Check an export folder against its manifest; a clear error if it is partial or corrupt."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise LeanLMError(f"'{path}' has no {MANIFEST}: it is not a finished leanlm export (interrupted or "
                          "copied partially): export again") from None
    except (ValueError, KeyError, TypeError) as e:
        raise LeanLMError(f"'{path / MANIFEST}' is unreadable ({e}): export again") from None
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            raise LeanLMError(f"export '{path}' is missing '{name}': export again")
        if f.stat().st_size != meta["bytes"] or _sha256(f) != meta["sha256"]:
            raise LeanLMError(f"export file '{f}' is corrupt (size or checksum differs from the manifest): export again")
    return manifest


def export(model, format: str, out: str | os.PathLike, overwrite: bool = False, tokenizer=None,
           trust_remote_code: bool = False, **options) -> Path:
    """Export `model` (a model folder or built-in name, or a loaded model with `tokenizer`) as `format` into `out`.

    Returns `out`. Options go to the format's writer (gguf: ``qtype``).
    """
    mod = _module(format)
    if isinstance(model, (str, os.PathLike)):
        from ..models import load

        model, tokenizer = load(model, trust_remote_code=trust_remote_code, packed=False)
    elif tokenizer is None:
        raise LeanLMError("export of a loaded model needs its tokenizer: export(model, fmt, out, tokenizer=tok)")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        summary = mod.write(model, tokenizer, tmp, **options)
        checks = mod.validate(tmp, model, tokenizer)
        _write_manifest(tmp, format, {"summary": summary, "validation": checks})
    return Path(out)


__all__ = ["FORMATS", "MANIFEST", "export", "verify_export"]


class _CallableModule(type(sys.modules[__name__])):
    """`leanlm.export(model, fmt, out)` calls `export`; `leanlm.export.gguf` etc. stay reachable."""

    def __call__(self, *args, **kwargs):
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
