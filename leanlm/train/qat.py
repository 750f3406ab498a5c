"""`qat` and `qad`: quantization-aware training and distillation, starting from PTQ calibration.

Both quantize with a recipe (same presets, same quantizers, same calibration as PTQ) but keep the
weights float and fake-quantized, train them through straight-through gradients (optionally the
per-block scales too, LSQ; gradients reach dynamic activation scales as well, `scale_grad`), then
freeze them into codes: the result saves, loads and exports exactly like a PTQ result.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..errors import LeanLMError
from ..quant.api import freeze_model, quantize
from ..quant.linear import QuantLinear
from ..quant.recipes import get_recipe
from .distill import DistillConfig, ce_loss_fn
from .distill import distill as distill_model
from .loop import TrainConfig, train

CALIB_SEQUENCES = 64  # PTQ initialisation samples, taken from the training data when no calib is given


def trainable_parameters(model: nn.Module, train_embeddings: bool = False) -> dict[str, nn.Parameter]:
    """Everything but the (often tied, vocabulary-sized) embeddings, which stay fixed unless asked."""
    frozen = set()
    if not train_embeddings:
        for m in (model.get_input_embeddings(), model.get_output_embeddings()):
            if m is not None:
                frozen.update(id(p) for p in m.parameters())
    params = {}
    for n, p in model.named_parameters():
        p.requires_grad_(id(p) not in frozen)
        if p.requires_grad:
            params[n] = p
    return params


def training_sequences(tokenizer, source: str, config: TrainConfig, model=None,
                       cache: str | Path | None = None, progress: bool = True) -> torch.Tensor:
    """`config.tokens` worth of `seq_len` sequences: non-overlapping windows from the calibration split of
    `source`, or for `generated[:PROMPTS]` text sampled from `model` (see `generated`), saved at `cache`."""
    from ..data import calibration_batches
    from .generated import generated_sequences, prompt_source

    n = max(config.batch_size, config.tokens // config.seq_len)
    prompts = prompt_source(source)
    if prompts is None:
        return calibration_batches(tokenizer, source, n, config.seq_len, seed=config.seed, model=model)
    if model is None:
        raise LeanLMError(f"training data '{source}' is sampled from the float model: pass model=...")
    from . import distributed as dist

    dist.init_from_env()  # one process writes the text, the others read it (or, without a cache, sample it too)
    if cache is None or dist.is_main():
        data = generated_sequences(model, tokenizer, n, config.seq_len, prompts, seed=config.seed, cache=cache,
                                   progress=progress)
    dist.barrier()
    if cache is not None and not dist.is_main():
        data = generated_sequences(model, tokenizer, n, config.seq_len, prompts, seed=config.seed, cache=cache,
                                   progress=False)
    return data


def _prepare(model, recipe, data, calib, learn_scales: bool, scale_grad: bool, progress: bool):
    recipe = get_recipe(recipe)
    if calib is None and recipe.needs_data:
        calib = data[:CALIB_SEQUENCES]
    quantize(model, recipe, calib=calib, progress=progress, freeze=False)
    for q in model.modules():
        if isinstance(q, QuantLinear):
            q.scale_grad = scale_grad
            if learn_scales:
                if q.weight_spec is not None and not q.weight_spec.symmetric:
                    raise LeanLMError(f"learned scales need symmetric weight formats; recipe '{recipe.name}' has "
                                      f"{q.weight_spec.format} asymmetric: drop learn_scales")
                q.learn_scales()
    return recipe


def _finish(model, history, config, planned, started, kind, extra):
    freeze_model(model)
    steps = max((h["step"] for h in history), default=0)
    model.leanlm_training = {"method": kind, "trained_steps": steps, "planned_steps": planned,
                             "seconds": round(time.perf_counter() - started, 1), "config": asdict(config),
                             "history": history, **extra}
    return model


def qat(model: nn.Module, recipe, train_data: torch.Tensor, calib=None, config: TrainConfig | None = None,
        learn_scales: bool = False, train_embeddings: bool = False, work: str | Path | None = None,
        eval_data: torch.Tensor | None = None, progress: bool = True, on_step=None,
        scale_grad: bool = True) -> nn.Module:
    """Quantization-aware training: PTQ-calibrate `model` by `recipe`, fine-tune it fake-quantized on
    its own next-token loss over `train_data` [N, L], freeze. Resumable through `work`.

    `learn_scales` trains the weights' block scales (LSQ). `scale_grad` lets gradients reach dynamic
    activation scales through each block's largest value (`fake_quantize`); plain straight-through
    gradients treat them as constants (on SmolLM2 NVFP4, 16k tokens: QAD's KL on unseen batches 2-5% lower)."""
    cfg = config or TrainConfig()
    started = time.perf_counter()
    recipe = _prepare(model, recipe, train_data, calib, learn_scales, scale_grad, progress)
    params = trainable_parameters(model, train_embeddings)
    extra = {"recipe": recipe.name, "learn_scales": learn_scales, "scale_grad": scale_grad}
    history = train(model, params, train_data, ce_loss_fn, cfg, work, eval_data, progress, f"QAT ({recipe.name})",
                    on_step, settings={"method": "qat", **extra})
    return _finish(model, history, cfg, cfg.steps(len(train_data)), started, "qat", extra)


def qad(student: nn.Module, teacher: nn.Module, recipe, train_data: torch.Tensor, calib=None,
        config: TrainConfig | None = None, distill: DistillConfig | None = None, learn_scales: bool = False,
        train_embeddings: bool = False, work: str | Path | None = None, eval_data: torch.Tensor | None = None,
        progress: bool = True, on_step=None, scale_grad: bool = True) -> nn.Module:
    """Quantization-aware distillation: like `qat`, but the fake-quantized student learns to match the
    frozen full-precision `teacher` (KL on logits, optional hidden-state and next-token terms)."""
    cfg, dcfg = config or TrainConfig(), distill or DistillConfig()
    if student is teacher:
        raise LeanLMError("the teacher must be a separate float copy of the model: load it again")
    started = time.perf_counter()
    recipe = _prepare(student, recipe, train_data, calib, learn_scales, scale_grad, progress)
    extra = {"recipe": recipe.name, "learn_scales": learn_scales, "scale_grad": scale_grad}
    distill_model(student, teacher, train_data, cfg, dcfg, work, eval_data, train_embeddings, progress, on_step,
                  f"QAD ({recipe.name})", {"method": "qad", **extra})
    history = student.leanlm_training["history"]
    return _finish(student, history, cfg, cfg.steps(len(train_data)), started, "qad", {**extra, "distill": asdict(dcfg)})
