"""leanlm: make language models cheaper and faster to serve, on a laptop CPU as well as a GPU.

Public API::

    model, tok = leanlm.load("smollm2-135m")          # built-in name, HF folder, or a leanlm output
    leanlm.quantize(model, "w4a16_rtn")               # preset, recipe file, dict or Recipe
    result = leanlm.evaluate(model, tok, data="wiki", max_tokens=8192, speed=True)
    leanlm.save(model, tok, "out/smollm2-w4")         # atomic; load() restores it quantized
    leanlm.quantize_streaming("big-model/", "w4a16_awq", calib_ids, "out/big-w4")  # one layer in memory
    text, gen = leanlm.generate(model, tok, "The capital of France", max_new_tokens=32)
    leanlm.qad(student, teacher, "nvfp4", train_ids)    # or leanlm.qat(model, recipe, train_ids)
    small = leanlm.prune(model, calib_ids, params="70%") # then leanlm.distill(small, model, train_ids)
    leanlm.export("out/smollm2-w4", "gguf", "out/smollm2-gguf")  # or "compressed-tensors", "modelopt"
"""

from .data import calibration_batches, documents, eval_tokens, split_text
from .engine import Engine, generate
from .errors import LeanLMError
from .eval import evaluate, measure_speed, model_size, perplexity
from .eval.report import format_table, load_results, write_report
from .models import BUILTIN_MODELS, DEFAULT_MODEL, convert_gguf, list_models, load, prepare, save
from .quant.api import freeze_model, pack_model, quantize
from .quant.formats import QuantSpec
from .quant.recipes import PRESETS, Recipe, get_recipe
from .quant.streaming import quantize_streaming
from . import export, prune
from .export import verify_export
from .prune import sparsify
from .train import DistillConfig, TrainConfig, distill, qad, qat

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_MODELS", "DEFAULT_MODEL", "DistillConfig", "Engine", "LeanLMError", "PRESETS", "QuantSpec", "Recipe",
    "TrainConfig", "calibration_batches", "convert_gguf", "distill", "documents", "eval_tokens", "evaluate", "export", "format_table",
    "freeze_model", "generate", "get_recipe", "list_models", "load", "load_results", "measure_speed", "model_size",
    "pack_model", "perplexity", "prepare", "prune", "qad", "qat", "quantize", "quantize_streaming", "save", "sparsify", "split_text", "verify_export", "write_report",
]
