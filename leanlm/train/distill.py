"""Distillation losses bound to a teacher: live teacher forwards, or teacher top-k cached once.

`DistillConfig` says how the student learns from the teacher; `distill_loss_fn` turns it into the
training loop's `loss_fn`. QAD (quantized student) and distillation after pruning both use it.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import LeanLMError
from .losses import HIDDEN_LAYERS, HiddenLoss, hidden_pairs, kd_loss, kd_loss_topk, next_token_loss, teacher_topk

log = logging.getLogger(__name__)


@dataclass
class DistillConfig:
    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0  # mix in the ordinary next-token loss
    hidden_weight: float = 0.0  # hidden-state loss (see HiddenLoss)
    hidden_layers: str = "all"  # "final": final outputs only; "all": every layer against its teacher layer
    topk: int = 0  # > 0: precompute the teacher's top-k log-probs once (cache) instead of live forwards
    cache: str | None = None  # where the top-k cache lives (default: the run's work folder)

    def __post_init__(self):
        if self.temperature <= 0:
            raise LeanLMError(f"temperature {self.temperature} must be positive")
        if min(self.kd_weight, self.ce_weight, self.hidden_weight) < 0:
            raise LeanLMError("loss weights must be >= 0")
        if self.hidden_layers not in HIDDEN_LAYERS:
            raise LeanLMError(f"hidden layers '{self.hidden_layers}': use one of {', '.join(HIDDEN_LAYERS)}")
        if self.topk and self.hidden_weight:
            raise LeanLMError("the hidden-state loss needs live teacher forwards: drop --topk or --hidden-weight")


def fingerprint(model: nn.Module, data: torch.Tensor, settings: str) -> str:
    """A key for outputs of `model` on `data` under `settings`, stored beside them to tell when they are stale."""
    h = hashlib.sha256(data.numpy().tobytes())
    for p in list(model.parameters())[::7]:
        h.update(f"{p.shape}:{float(p.detach().float().sum()):.6e}".encode())
    h.update(settings.encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def build_topk_cache(teacher: nn.Module, data: torch.Tensor, cfg: DistillConfig, path: Path,
                     batch: int = 4, progress: bool = True) -> dict[str, torch.Tensor]:
    """The teacher's top-k log-probabilities for every training sequence, computed once and saved."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    key = fingerprint(teacher, data, f"T={cfg.temperature},k={cfg.topk}")
    path = Path(path)
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                log.info(f"reusing teacher top-{cfg.topk} cache {path}")
                return {k: f.get_tensor(k) for k in f.keys()}
    device = next(teacher.parameters()).device
    values, indices = [], []
    for i in tqdm(range(0, len(data), batch), desc=f"teacher top-{cfg.topk}", disable=not progress, unit="batch"):
        v, ix = teacher_topk(teacher(data[i:i + batch].to(device), use_cache=False).logits, cfg.topk, cfg.temperature)
        values.append(v.cpu())
        indices.append(ix.cpu())
    tensors = {"values": torch.cat(values), "indices": torch.cat(indices)}
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"key": key})
    tmp.replace(path)
    return tensors


def distill_loss_fn(teacher: nn.Module, cfg: DistillConfig, cache: dict[str, torch.Tensor] | None = None,
                    hidden: HiddenLoss | None = None):
    """The loop's loss_fn: weighted KD (+ CE, + hidden) for the student against `teacher`.

    Training sequences (index >= 0) read the top-k cache when there is one; evaluation sequences
    (negative index) always run the teacher.
    """
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    want_hidden = hidden is not None and cfg.hidden_weight > 0

    def loss_fn(model, ids, index):
        out = model(ids, use_cache=False, output_hidden_states=want_hidden)
        total = 0.0
        if cfg.ce_weight:
            total = total + cfg.ce_weight * next_token_loss(out.logits, ids)
        if cache is not None and bool((index >= 0).all()):
            v, ix = cache["values"][index].to(ids.device), cache["indices"][index].to(ids.device)
            total = total + cfg.kd_weight * kd_loss_topk(out.logits, v, ix, cfg.temperature)
        else:
            with torch.no_grad():
                t_out = teacher(ids, use_cache=False, output_hidden_states=want_hidden)
            if cfg.kd_weight:
                total = total + cfg.kd_weight * kd_loss(out.logits, t_out.logits, cfg.temperature)
            if want_hidden:
                total = total + cfg.hidden_weight * hidden(out.hidden_states, t_out.hidden_states)
        return total

    return loss_fn


def hidden_loss(student: nn.Module, teacher: nn.Module, layers: str = "all") -> HiddenLoss:
    """The hidden-state loss between `student` and `teacher`: see `hidden_pairs`. A student pruned from
    this teacher pairs its layers with the teacher layers they were kept from."""
    pruned_from = getattr(student, "leanlm_pruned_from", None) or {}
    n_s, n_t = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    kept = pruned_from.get("kept_layers") if pruned_from.get("layers") == n_t else None
    return HiddenLoss(hidden_pairs(n_s, n_t, layers, kept), student.config.hidden_size, teacher.config.hidden_size)


def distill(student: nn.Module, teacher: nn.Module, train_data: torch.Tensor, config=None,
            distill: DistillConfig | None = None, work: str | Path | None = None,
            eval_data: torch.Tensor | None = None, train_embeddings: bool = False, progress: bool = True,
            on_step=None, desc: str = "distillation", settings: dict | None = None) -> nn.Module:
    """Knowledge distillation of a (pruned, sparse) `student` from `teacher` on `train_data` [N, L].

    The embeddings (and a tied lm_head) stay fixed unless `train_embeddings`: SmolLM2 depth-pruned to
    21 of 30 layers distills to 24.37 with them fixed against 24.81 trained (79,872 tokens).
    Weights that are exactly zero (a sparsity mask) stay zero. The hidden-state loss pairs each student
    layer with the teacher layer it was pruned from (`hidden_layers="all"`) or only the final outputs;
    when widths differ a learned projection maps the student's states onto the teacher's (trained
    along, dropped afterwards). Resumable through `work`; returns the student, trained in place.
    """
    import time

    from ..prune.sparsity import sparsity_masks
    from . import distributed as dist
    from .loop import TrainConfig, train
    from .qat import trainable_parameters

    cfg, dcfg = config or TrainConfig(), distill or DistillConfig()
    if student is teacher:
        raise LeanLMError("the teacher must be a separate model: load it again")
    if teacher.config.vocab_size != student.config.vocab_size:
        raise LeanLMError(f"teacher vocabulary ({teacher.config.vocab_size}) differs from the student's "
                          f"({student.config.vocab_size}): distill from a model with the same tokenizer")
    started = time.perf_counter()
    cache = None
    if dcfg.topk:
        if work is None and dcfg.cache is None:
            raise LeanLMError("a teacher top-k cache needs a place: pass work=... or DistillConfig(cache=...)")
        path = Path(dcfg.cache) if dcfg.cache else Path(work) / "teacher_topk.safetensors"
        dist.init_from_env()
        if dist.is_main():
            cache = build_topk_cache(teacher, train_data, dcfg, path, progress=progress)
        dist.barrier()
        if not dist.is_main():
            cache = build_topk_cache(teacher, train_data, dcfg, path, progress=False)
    params = trainable_parameters(student, train_embeddings)
    hidden = None
    if dcfg.hidden_weight:
        hidden = hidden_loss(student, teacher, dcfg.hidden_layers)
        params.update({f"hidden_loss.{n}": p for n, p in hidden.named_parameters()})
    history = train(student, params, train_data, distill_loss_fn(teacher, dcfg, cache, hidden), cfg, work,
                    eval_data, progress, desc, on_step, grad_masks=sparsity_masks(student, params),
                    settings={"method": "distill", **asdict(dcfg), **(settings or {})})
    student.leanlm_training = {"method": "distill", "trained_steps": max((h["step"] for h in history), default=0),
                               "planned_steps": cfg.steps(len(train_data)),
                               "seconds": round(time.perf_counter() - started, 1), "config": asdict(cfg),
                               "distill": asdict(dcfg), "history": history}
    return student


def ce_loss_fn(model, ids, index):
    """The loop's loss_fn for plain training (QAT): next-token cross-entropy."""
    return next_token_loss(model(ids, use_cache=False).logits, ids)
