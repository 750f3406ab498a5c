"""Training losses, each returned as a sum over predicted tokens (the loop divides by the global count).

- `next_token_loss`: the ordinary causal LM loss.
- `kd_loss`: forward KL(teacher || student) on temperature-softened logits, times T^2 (Hinton).
- `kd_loss_topk`: the same against cached teacher top-k log-probabilities, with the remaining
  probability mass as one more bucket, so it is exactly zero when the student equals the teacher.
- `HiddenLoss`: normalized MSE between hidden states, through a learned projection when widths differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of logits [B, L, V] predicting ids [B, L] shifted by one."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Summed forward KL over the predicting positions (all but the last; where `mask` [B, L] is set)."""
    t = temperature
    s = F.log_softmax(student_logits[:, :-1].float() / t, dim=-1)
    p = F.log_softmax(teacher_logits[:, :-1].float() / t, dim=-1)
    kl = (p.exp() * (p - s)).sum(-1)
    if mask is not None:
        kl = kl * mask[:, :-1].to(kl.dtype)
    return kl.sum() * t * t


def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0):
    """What `kd_loss_topk` needs from the teacher: top-k log-probs [B, L-1, k] (float) and indices (int32)."""
    logp = F.log_softmax(teacher_logits[:, :-1].float() / temperature, dim=-1)
    values, indices = logp.topk(k, dim=-1)
    return values, indices.to(torch.int32)


def _log1mexp(logsum: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable near 0."""
    x = logsum.clamp(max=-1e-7)
    return torch.where(x > -0.693, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def kd_loss_topk(student_logits: torch.Tensor, top_logp: torch.Tensor, top_idx: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """Summed KL over k+1 buckets: the teacher's top-k tokens, and everything else as one."""
    t = temperature
    s = F.log_softmax(student_logits[:, :-1].float() / t, dim=-1).gather(-1, top_idx.long())
    p_rest = _log1mexp(torch.logsumexp(top_logp, dim=-1))
    s_rest = _log1mexp(torch.logsumexp(s, dim=-1))
    kl = (top_logp.exp() * (top_logp - s)).sum(-1) + p_rest.exp() * (p_rest - s_rest)
    return kl.sum() * t * t


HIDDEN_LAYERS = ("all", "final")  # which layers `hidden_pairs` pairs


def hidden_pairs(student_layers: int, teacher_layers: int, which: str = "all",
                 kept: list[int] | None = None) -> list[tuple[int, int]]:
    """Student-to-teacher indices into `output_hidden_states` for `HiddenLoss`.

    "final": the final (normed) outputs only. "all": also each student layer's output against the
    teacher layer it came from: `kept` (the teacher layers a depth-pruned student kept, in order), or
    else evenly spaced teacher layers. Index 0 is the embeddings, i + 1 the output of layer i, and -1
    the final normed output, which is why the last layer pairs through -1.
    """
    if which == "final":
        return [(-1, -1)]
    if which not in HIDDEN_LAYERS:
        raise ValueError(f"hidden layers '{which}': use one of {', '.join(HIDDEN_LAYERS)}")
    if kept is None:
        kept = [round((j + 1) * teacher_layers / student_layers) - 1 for j in range(student_layers)]
    if len(kept) != student_layers or not all(0 <= k < teacher_layers for k in kept):
        raise ValueError(f"kept layers {kept} do not map {student_layers} student layers into {teacher_layers}")
    return [(j + 1, k + 1) for j, k in enumerate(kept[:-1])] + [(-1, -1)]


class HiddenLoss(nn.Module):
    """Normalized MSE between student and teacher hidden states at paired layers, summed over tokens.

    `pairs` maps student layer outputs to teacher ones (indices into `output_hidden_states`). When the
    widths differ (a width-pruned student) a learned linear projection maps the student's states.
    """

    def __init__(self, pairs: list[tuple[int, int]], student_width: int, teacher_width: int):
        super().__init__()
        self.pairs = list(pairs)
        self.proj = None if student_width == teacher_width else nn.Linear(student_width, teacher_width, bias=False)

    def forward(self, student_hidden, teacher_hidden) -> torch.Tensor:
        total = 0.0
        for si, ti in self.pairs:
            s, t = student_hidden[si].float(), teacher_hidden[ti].float()
            if self.proj is not None:
                s = self.proj(s)
            total = total + ((s - t) ** 2).mean(-1).div(t.pow(2).mean(-1).clamp(min=1e-6)).sum()
        return total / max(len(self.pairs), 1)
