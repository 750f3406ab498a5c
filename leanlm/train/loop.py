"""One training loop for QAT, QAD and distillation after pruning.

`train(model, params, data, loss_fn, config, work)` runs AdamW over fixed-length token sequences:
global batches of `batch_size` sequences split over processes (data parallel) and micro-batches
(gradient accumulation), bf16 autocast where it helps, cosine learning rate with warmup, gradient
clipping, a progress bar with loss and tokens/s, periodic evaluation, and checkpoints in `work` from
which a killed run resumes with the same result as an uninterrupted one.

`loss_fn(model, ids, index)` returns the loss summed over the batch's predicted tokens; `index` holds
the sequences' positions in `data` (for cached teacher outputs). The loop divides by the global
batch's token count, so the result does not depend on how the batch is split.

With `fsdp` the processes shard the model, its gradients and AdamW moments instead of each holding
them whole (`sharding`); the result is the same, up to float summation order.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..atomic import atomic_write_text
from ..errors import LeanLMError
from . import distributed as dist
from . import sharding
from .checkpoint import has_checkpoint, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TrainConfig:
    """Training settings. `batch_size` is global (all processes together), in sequences."""

    tokens: int = 100_000  # training budget: sequences of seq_len drawn from the data
    seq_len: int = 256
    batch_size: int = 8
    micro_batch: int = 4  # sequences per forward on each process
    epochs: int = 1
    lr: float = 2e-5
    warmup: float = 0.05  # fraction of the steps
    min_lr: float = 0.1  # final learning rate as a fraction of lr (cosine)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    bf16: bool = True  # autocast matmuls to bfloat16 where the hardware has it (see bf16_is_native)
    eval_every: int = 0  # steps between evaluations (0: only at the end, when eval data is given)
    checkpoint_every: int = 25
    seed: int = 0
    max_minutes: float | None = None  # stop early (with a checkpoint) after this long
    fsdp: bool = False  # shard model, gradients and optimizer state over the processes (FSDP2)

    def steps(self, n_sequences: int) -> int:
        return max(1, (n_sequences // self.batch_size) * self.epochs)


@functools.cache
def bf16_is_native(device_type: str) -> bool:
    """Whether bf16 matmuls run in hardware: a GPU with bf16, or a CPU with AVX512-BF16 or AMX.

    Elsewhere PyTorch emulates them: on an AVX2 CPU (AMD Zen 1) a bf16 matmul ran at 0.8 GFLOP/s
    against 28 in float32, so autocast there would make training some 30x slower, not faster.
    """
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return True


def autocast(model: nn.Module, enabled: bool):
    """bf16 autocast when `enabled` and the model's device computes bf16 natively; float32 otherwise."""
    device = next(model.parameters()).device.type
    if enabled and not bf16_is_native(device):
        _say_once(f"bf16 autocast is off: this {device.upper()} has no native bf16 matmuls "
                  "(AVX512-BF16 or AMX on a CPU), where it would be far slower; training runs in float32")
        enabled = False
    return torch.autocast(device, dtype=torch.bfloat16, enabled=enabled)


@functools.cache
def _say_once(message: str) -> None:
    log.warning(message)


def cosine_lr(lr: float, step: int, total: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to `min_ratio * lr` at `total`."""
    warm = max(1, warmup_steps)
    if step < warm:
        return lr * (step + 1) / warm
    frac = min(1.0, (step - warm) / max(1, total - warm))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def step_indices(n: int, cfg: TrainConfig, step: int) -> torch.Tensor:
    """The global batch of one step: a seeded permutation per epoch, cut into batches."""
    per_epoch = n // cfg.batch_size
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
    return perm[pos * cfg.batch_size:(pos + 1) * cfg.batch_size]


@torch.no_grad()
def evaluate_loss(model: nn.Module, data: torch.Tensor, loss_fn: LossFn, cfg: TrainConfig) -> float:
    """Mean per-token loss on `data` (index tensor passed as -1 - position: not training sequences)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # Sharded, every forward is a collective: all processes run as many, the ones past the end on
    # a sequence whose loss is not counted.
    lockstep = any(sharding.is_sharded(p) for p in model.parameters())
    total, count, stride = 0.0, 0, cfg.micro_batch * dist.world_size()
    for start in range(0, len(data), stride):
        i = start + dist.rank() * cfg.micro_batch
        if i >= len(data) and not lockstep:
            break
        ids = data[i:i + cfg.micro_batch] if i < len(data) else data[:1]
        with autocast(model, cfg.bf16):
            loss = float(loss_fn(model, ids.to(device), -1 - torch.arange(i, i + len(ids))).detach())
        if i < len(data):
            total += loss
            count += ids.numel() - len(ids)
    model.train(was_training)
    return dist.sum_scalar(total) / max(dist.sum_scalar(count), 1)


def _check_settings(work: Path, settings: dict) -> None:
    file = work / "train_config.json"
    if file.is_file() and has_checkpoint(work):
        before = json.loads(file.read_text())
        changed = sorted(k for k in settings if before.get(k) != settings[k])
        if "world_size" in changed:
            n = before["world_size"]
            raise LeanLMError(f"'{work}' holds a checkpoint of a run on {n} process(es): resume it on {n} "
                              "processes in all, or delete the folder to start over")
        if changed:
            raise LeanLMError(f"'{work}' holds a checkpoint of a run with other {', '.join(changed)}: resume with "
                              f"the settings in {file}, or delete the folder to start over")
    if dist.is_main():
        # Atomic: the other processes may be reading the previous file at this moment.
        atomic_write_text(file, json.dumps(settings, indent=2))


def train(model: nn.Module, params: dict[str, nn.Parameter], data: torch.Tensor, loss_fn: LossFn,
          config: TrainConfig | None = None, work: str | Path | None = None, eval_data: torch.Tensor | None = None,
          progress: bool = True, desc: str = "training", on_step: Callable[[int, dict], None] | None = None,
          settings: dict | None = None, grad_masks: dict[str, torch.Tensor] | None = None) -> list[dict]:
    """Train `params` (named, a subset of `model`'s) on `data` [N, seq_len]; returns the history.

    With `work`, checkpoints go there every `checkpoint_every` steps and an existing one is resumed.
    `settings` (JSON-able) are recorded beside the checkpoint; resuming with other settings is an error.
    `on_step(step, record)` is called after every optimizer step. `grad_masks` (0/1, by name) multiply
    those parameters' gradients every step: zeros of a pruned weight stay zero.

    With `config.fsdp` and several processes, `model` holds no weights during training (a sharded twin
    trains; `on_step` cannot inspect them); the trained ones are back in it, on every process, on return.
    """
    from tqdm.auto import tqdm

    cfg = config or TrainConfig()
    dist.init_from_env()
    world = dist.world_size()
    if data.ndim != 2 or data.shape[1] < 2:
        raise LeanLMError(f"training data must be token sequences [N, L >= 2], got shape {tuple(data.shape)}")
    if len(data) < cfg.batch_size:
        raise LeanLMError(f"{len(data)} training sequences are fewer than one batch of {cfg.batch_size}: "
                          "raise --tokens or lower --batch-size")
    if cfg.batch_size % world:
        raise LeanLMError(f"batch size {cfg.batch_size} does not split over {world} processes: make it a multiple")
    if not params:
        raise LeanLMError("nothing to train: no parameter requires a gradient")
    total = cfg.steps(len(data))
    per_step_tokens = cfg.batch_size * (data.shape[1] - 1)
    device = next(model.parameters()).device
    masks = {n: m.to(device) for n, m in (grad_masks or {}).items()}
    sharded = cfg.fsdp and world > 1
    net = model  # what trains: `model`, or its sharded twin
    if sharded:
        net, params, masks = sharding.shard(model, params, masks)
    elif cfg.fsdp:
        log.info("fsdp: a single process, nothing to shard")
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    step, history = 0, []
    if work is not None:
        work = Path(work)
        work.mkdir(parents=True, exist_ok=True)
        # Settings that change the result; when to stop, evaluate or checkpoint do not.
        result_settings = {k: v for k, v in asdict(cfg).items() if k not in ("max_minutes", "eval_every",
                                                                             "checkpoint_every")}
        _check_settings(work, {**(settings or {}), **result_settings, "world_size": world})
        if has_checkpoint(work):
            state = load_checkpoint(work, params, opt)
            step, history = state["step"], state["history"]
            log.info(f"resuming {desc} at step {step}/{total} from {work}")
    net.train()
    bar = tqdm(total=total, initial=step, desc=desc, unit="step", disable=not (progress and dist.is_main()))
    t_start, tokens_seen = time.perf_counter(), 0

    def checkpoint():
        if work is not None and (sharded or dist.is_main()):
            save_checkpoint(work, params, opt, {"step": step, "history": history}, sharded=sharded)
        dist.barrier()

    while step < total:
        # Contiguous shares: with micro_batch = share, the ranks run exactly the micro-batches one process would.
        share = cfg.batch_size // world
        batch = step_indices(len(data), cfg, step)[dist.rank() * share:(dist.rank() + 1) * share]
        for g in opt.param_groups:
            g["lr"] = cosine_lr(cfg.lr, step, total, int(cfg.warmup * total), cfg.min_lr)
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for i in range(0, len(batch), cfg.micro_batch):
            idx = batch[i:i + cfg.micro_batch]
            with autocast(net, cfg.bf16):
                loss = loss_fn(net, data[idx].to(device), idx)
            (loss / per_step_tokens).backward()  # sharded: reduce-scattered (summed) in here
            loss_sum += float(loss.detach())
        dist.sum_gradients(p for p in params.values() if not sharding.is_sharded(p))
        for n, m in masks.items():
            if params[n].grad is not None:
                params[n].grad.mul_(m)
        if sharded:
            grad_norm = sharding.clip_grad_norm(params.values(), cfg.grad_clip or float("inf"))
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip or float("inf")))
        opt.step()
        step += 1
        tokens_seen += per_step_tokens
        record = {"step": step, "loss": dist.sum_scalar(loss_sum) / per_step_tokens, "lr": opt.param_groups[0]["lr"],
                  "grad_norm": grad_norm}
        if eval_data is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            record["eval_loss"] = evaluate_loss(net, eval_data, loss_fn, cfg)
        history.append(record)
        elapsed = time.perf_counter() - t_start
        shown = {"loss": f"{record['loss']:.4f}", "tok_s": f"{tokens_seen / elapsed:.0f}"}
        if "eval_loss" in record:
            shown["eval"] = f"{record['eval_loss']:.4f}"
        bar.set_postfix(shown)
        bar.update(1)
        if on_step is not None:
            on_step(step, record)
        if step % cfg.checkpoint_every == 0 and step < total:
            checkpoint()
        # Every process stops at the same step (checkpointing is collective), whichever clock ran out.
        if cfg.max_minutes is not None and step < total and dist.sum_scalar(float(elapsed > cfg.max_minutes * 60)):
            log.info(f"stopping {desc} at step {step}/{total}: max_minutes {cfg.max_minutes} reached")
            checkpoint()
            break
    bar.close()
    if eval_data is not None:
        history.append({"step": step, "eval_loss": evaluate_loss(net, eval_data, loss_fn, cfg)})
    if sharded:
        sharding.unshard(model, net)
    model.eval()
    return history
