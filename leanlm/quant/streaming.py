"""Streaming PTQ: quantize a model whose float weights do not fit in memory.

The model is built on the meta device (no weights). Calibration inputs of the first decoder layer are
captured with every decoder layer replaced by a pass-through, so only the embeddings are ever real
outside the layer being worked on. Then, one decoder layer at a time: its float weights are read from
the model's safetensors files (that layer's bytes only, see `WeightFiles`), the layer is calibrated on the
outputs of the previous quantized layer exactly as `quantize` does (same `calibrate_layer`), its codes
go to a work folder, its outputs spill to disk as the next layer's inputs, and the layer is freed.

A killed run resumes from the last finished layer: the work folder holds each finished layer's
tensors, the inputs of the next one and a progress file (written last) keyed by a fingerprint of the
model, recipe and calibration inputs. The result is one ``model.safetensors`` streamed together from
the per-layer files, the same folder `leanlm.save` writes after `quantize` (tensor for tensor).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import shutil
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..atomic import atomic_dir, atomic_write_text, save_tensors
from ..errors import LeanLMError
from ..memory import release_free_memory
from ..models import safetensors_header
from .api import forward_loop_from_batches, prepare_quantizers, quantize_without_data
from .embedding import tie_quantized_embedding
from .kv import KVQuantizer
from .linear import QuantLinear
from .recipes import Recipe, get_recipe
from .sequential import bypassed, capture_inputs, decoder_layers, layer_output, passing_through

log = logging.getLogger(__name__)

PROGRESS = "progress.json"


class WeightFiles:
    """Where each tensor of a safetensors model folder lives; reads the tensors asked for.

    Reads go through pread(2) into memory of each tensor's own size: a memory map would tie the whole
    file's mapping to the tensors taken from it (a private writable mapping, counted as the process's
    data), however little of it is used."""

    def __init__(self, folder: Path):
        self.files = sorted(folder.glob("*.safetensors"))
        self.where = {k: f for f in self.files for k in safetensors_header(f)[1] if k != "__metadata__"}

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The named tensors as `dtype`, each file opened once for all of its tensors asked for."""
        from safetensors import safe_open

        missing = [n for n in names if n not in self.where]
        if missing:
            raise LeanLMError(f"the model's safetensors files lack tensor '{missing[0]}': the folder does not match "
                              "its config.json; re-save the model")
        out = {}
        for f in dict.fromkeys(self.where[n] for n in names):
            with safe_open(str(f), "pt", backend="pread") as h:
                for n in names:
                    if self.where[n] == f:
                        t = h.get_tensor(n)
                        out[n] = t.to(dtype) if t.is_floating_point() else t
        return out

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f.name}:{f.stat().st_size}".encode())
        return h.hexdigest()


def _load_into(module: nn.Module, prefix: str, files: WeightFiles, dtype: torch.dtype) -> None:
    """Give `module`'s meta parameters and persistent buffers their tensors from the files (tied
    tensors, listed once under their first name, stay tied)."""
    meta = [(n, t) for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    tensors = files.read([prefix + n for n, _ in meta], dtype)
    real = {}
    for n, t in meta:
        value = tensors[prefix + n]
        if tuple(value.shape) != tuple(t.shape):
            raise LeanLMError(f"tensor '{prefix + n}' has shape {tuple(value.shape)} in the files but "
                              f"{tuple(t.shape)} in config.json: re-save the model")
        real[id(t)] = nn.Parameter(value, requires_grad=False) if isinstance(t, nn.Parameter) else value
    for mod in module.modules():
        for table in (mod._parameters, mod._buffers):
            for key, t in table.items():
                if t is not None and id(t) in real:
                    table[key] = real[id(t)]


class SpilledTensors(Sequence):
    """A list of tensors kept in one safetensors file, read back one at a time."""

    def __init__(self, path: Path):
        self.path = path
        self.n = sum(k != "__metadata__" for k in safetensors_header(path)[1])

    @staticmethod
    def write(path: Path, tensors: list[torch.Tensor]) -> "SpilledTensors":
        save_tensors(path, {str(i): t for i, t in enumerate(tensors)})
        return SpilledTensors(path)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        from safetensors import safe_open

        if not 0 <= i < self.n:
            raise IndexError(i)
        with safe_open(str(self.path), "pt", backend="pread") as h:
            return h.get_tensor(str(i))


def _fingerprint(files: WeightFiles, config, recipe, hidden: list[torch.Tensor]) -> str:
    h = hashlib.sha256(files.fingerprint().encode())
    h.update(config.to_json_string().encode())
    h.update(json.dumps(recipe.to_dict(), sort_keys=True).encode())
    for t in hidden:
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def quantize_streaming(model_dir, recipe, calib=None, out=None, work=None, overwrite: bool = False,
                       dtype: torch.dtype = torch.float32, progress: bool = True, trust_remote_code: bool = False,
                       on_layer: Callable[[int, float], None] | None = None) -> Path:
    """Quantize the model in `model_dir` (a local safetensors HF folder or built-in name) by `recipe`
    into `out`, holding one decoder layer's float weights at a time; returns `out`.

    `calib` is what `quantize` takes (a LongTensor [N, L] or a `forward_loop(model)`). Work files go to
    `work` (default ``OUT.work``); a run killed part-way resumes there from the last finished layer, and
    the folder is removed once `out` is complete. `on_layer(i, seconds)` is called as each layer ends.
    The result loads with `leanlm.load(out)` and equals ``save(quantize(load(model_dir)))``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..models import resolve
    from .state import STATE_FILE, write_quant_state

    recipe = get_recipe(recipe)
    if out is None:
        raise LeanLMError("streaming quantization writes its result to disk: pass out=DIR (CLI: --out DIR)")
    out = Path(out)
    if out.exists() and not overwrite:
        raise LeanLMError(f"output '{out}' already exists: choose another path or pass --overwrite")
    if recipe.needs_data and calib is None:
        raise LeanLMError(f"recipe '{recipe.name}' calibrates on data: pass calibration data (calib=..., CLI: --calib wiki)")
    path = resolve(model_dir)
    if (path / STATE_FILE).is_file():
        raise LeanLMError(f"'{model_dir}' is already quantized: stream-quantize the float model it came from")
    work = Path(work) if work is not None else out.with_name(out.name + ".work")
    files = WeightFiles(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # rotary tables real, weights on meta
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers) + "."
    selected = prepare_quantizers(model, recipe)
    _load_outside(model, layers, files, dtype)
    tied = tie_quantized_embedding(model)  # as `quantize` does: before calibration reads the embeddings

    run = _Run(files, prefix, dtype, recipe, work)
    hidden, start = _start(run, model, layers, config, calib)
    bar = tqdm(total=len(layers), initial=start, desc=f"streaming {recipe.name}", unit="layer", disable=not progress)
    for i in range(start, len(layers)):
        t0 = time.perf_counter()
        hidden = _quantize_layer(run, layers, i, hidden)
        seconds = time.perf_counter() - t0
        bar.set_postfix(s_per_layer=f"{seconds:.1f}")
        bar.update(1)
        if on_layer is not None:
            on_layer(i, seconds)
    bar.close()

    for n, q in selected.items():  # weight-only layers outside the decoder stack (a recipe that quantizes lm_head)
        if not n.startswith(prefix):
            quantize_without_data(q, recipe)
    rest = work / "rest.safetensors"
    _save_without_layers(model, layers, rest)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        merge_safetensors(tmp / "model.safetensors",
                          [rest] + [work / f"layer_{i:04d}.safetensors" for i in range(len(layers))])
        write_quant_state(tmp, {n: (q.weight_spec, q.input_spec, q.output_spec) for n, q in selected.items()},
                          recipe, tied_embedding=tied)
    shutil.rmtree(work)
    return out


@dataclass
class _Run:
    """One streaming run: where weights come from and work goes, and what every layer shares."""

    files: WeightFiles
    prefix: str  # of the decoder layers' names, e.g. "model.layers."
    dtype: torch.dtype
    recipe: Recipe
    work: Path
    fingerprint: str = ""
    kwargs: list[dict] | None = None  # each decoder layer's call kwargs (masks, positions)


def _start(run: _Run, model: nn.Module, layers: nn.ModuleList, config, calib) -> tuple[SpilledTensors | None, int]:
    """The inputs of the first layer still to do, and its index: from the start, or from where a killed
    run with the same inputs stopped. The first layer's inputs are captured either way (cheap: every
    layer passes through): they fingerprint the calibration set, and the capture yields the kwargs."""
    if not run.recipe.needs_data:
        run.fingerprint = _fingerprint(run.files, config, run.recipe, [])
        start = _resume_point(run.work, run.fingerprint, len(layers), hidden=False)
        run.work.mkdir(parents=True, exist_ok=True)
        return None, start
    loop = calib if callable(calib) else forward_loop_from_batches(calib)
    quantizers = [m for m in model.modules() if isinstance(m, (QuantLinear, KVQuantizer))]
    with torch.no_grad(), passing_through(layers), bypassed(quantizers):
        captured = capture_inputs(model, layers, loop)
    run.kwargs = captured.kwargs
    run.fingerprint = _fingerprint(run.files, config, run.recipe, captured.hidden)
    start = _resume_point(run.work, run.fingerprint, len(layers), hidden=True)
    if start == 0:
        run.work.mkdir(parents=True, exist_ok=True)
        return SpilledTensors.write(run.work / "hidden_0000.safetensors", captured.hidden), 0
    log.info("resuming streaming quantization at layer %d/%d from %s", start, len(layers), run.work)
    return SpilledTensors(run.work / f"hidden_{start:04d}.safetensors"), start


def _quantize_layer(run: _Run, layers: nn.ModuleList, i: int,
                    hidden: SpilledTensors | None) -> SpilledTensors | None:
    """Load, calibrate, freeze and write decoder layer `i`, then free it; returns the next layer's inputs.

    Files are written layer, outputs, progress, in that order, each atomically: progress names only
    finished layers whose outputs are on disk."""
    from .ptq import calibrate_layer

    layer, work = layers[i], run.work
    _load_into(layer, f"{run.prefix}{i}.", run.files, run.dtype)
    with torch.no_grad():
        if hidden is not None:
            outputs = calibrate_layer(layer, hidden, run.kwargs[i], run.recipe)
            if outputs is None:
                outputs = [layer_output(layer, h, run.kwargs[i]) for h in hidden]
        else:
            for q in [m for m in layer.modules() if isinstance(m, QuantLinear)]:
                quantize_without_data(q, run.recipe)
    save_tensors(work / f"layer_{i:04d}.safetensors",
                 {f"{run.prefix}{i}.{k}": v for k, v in layer.state_dict().items()})
    if hidden is not None:
        hidden = SpilledTensors.write(work / f"hidden_{i + 1:04d}.safetensors", outputs)
        del outputs
    atomic_write_text(work / PROGRESS, json.dumps({"fingerprint": run.fingerprint, "done": i + 1}))
    (work / f"hidden_{i:04d}.safetensors").unlink(missing_ok=True)
    for q in layer.modules():  # freed: the next layer reuses the memory
        if isinstance(q, QuantLinear):
            q.drop_dequantized()
    layers[i] = layer.to("meta")
    del layer
    gc.collect()
    release_free_memory()
    return hidden


def _load_outside(model: nn.Module, layers: nn.ModuleList, files: WeightFiles, dtype: torch.dtype) -> None:
    """Real embeddings, final norm and head; the decoder layers stay on meta."""
    if getattr(model.config, "tie_word_embeddings", False):
        out_emb = model.get_output_embeddings()
        if out_emb is not None:  # the meta build does not keep the tie; the files hold one copy
            out_emb.weight = model.get_input_embeddings().weight
    with passing_through(layers):
        _load_into(model, "", files, dtype)


def _save_without_layers(model: nn.Module, layers: nn.ModuleList, path: Path) -> None:
    """Everything but the decoder layers, named and de-duplicated as `leanlm.save` would."""
    from safetensors.torch import save_model

    tmp = path.with_name(path.name + ".tmp")
    with passing_through(layers):
        save_model(model, str(tmp))
    tmp.replace(path)


def merge_safetensors(dest: Path, sources: list[Path], chunk: int = 1 << 24) -> None:
    """Write one safetensors file holding every tensor of `sources`, copying bytes in chunks (never a
    whole tensor in memory). Tensor names must not repeat."""
    entries, offset = {}, 0
    plan = []
    for src in sources:
        start, header = safetensors_header(src)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in entries:
                raise LeanLMError(f"tensor '{name}' appears in two streamed parts: delete the work folder and re-run")
            b, e = info["data_offsets"]
            entries[name] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [offset, offset + e - b]}
            plan.append((src, start + b, e - b))
            offset += e - b
    head = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header to 8 bytes
    with open(dest, "wb") as out:
        out.write(struct.pack("<Q", len(head)))
        out.write(head)
        handles: dict[Path, object] = {}
        try:
            for src, pos, size in plan:
                f = handles.get(src) or handles.setdefault(src, open(src, "rb"))
                f.seek(pos)
                while size:
                    data = f.read(min(chunk, size))
                    if not data:
                        raise LeanLMError(f"streamed part '{src}' is truncated: delete the work folder and re-run")
                    out.write(data)
                    size -= len(data)
        finally:
            for f in handles.values():
                f.close()


def _resume_point(work: Path, fingerprint: str, n_layers: int, hidden: bool) -> int:
    """The first layer still to do: 0 unless `work` holds progress of this very run."""
    file = work / PROGRESS
    if not file.is_file():
        return 0
    try:
        state = json.loads(file.read_text())
    except ValueError:
        raise LeanLMError(f"'{file}' is unreadable: delete the work folder '{work}' to start over") from None
    if state.get("fingerprint") != fingerprint:
        raise LeanLMError(f"work folder '{work}' holds a streaming run of another model, recipe or calibration set: "
                          "delete it to start over, or resume with the same inputs")
    done = int(state["done"])
    needed = [work / f"layer_{i:04d}.safetensors" for i in range(done)]
    if hidden:  # the inputs of the next layer (the outputs of the last)
        needed.append(work / f"hidden_{done:04d}.safetensors")
    if not all(p.is_file() for p in needed) or done > n_layers:
        raise LeanLMError(f"work folder '{work}' is incomplete (files of finished layers are missing): delete it "
                          "to start over")
    return done
