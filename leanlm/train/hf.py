"""Hugging Face `Trainer` integration: drop leanlm's QAT / QAD into an existing training script.

QAT needs no special trainer: quantize with ``freeze=False`` (fake-quantized weights with straight-
through gradients are ordinary parameters; gradients reach dynamic activation scales too, unless a
layer's `scale_grad` is turned off), train with any `Trainer`, then `leanlm.freeze_model` and
`leanlm.save`. QAD and distillation add a frozen teacher: `DistillationTrainer` computes the KL on
logits (plus the optional next-token term) in `compute_loss`, and keeps the teacher on the device.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from .distill import DistillConfig
from .losses import kd_loss


class DistillationTrainer(Trainer):
    """A `transformers.Trainer` whose loss is distillation from `teacher` (see `DistillConfig`)."""

    def __init__(self, *args, teacher: torch.nn.Module, distill: DistillConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.distill = distill or DistillConfig()
        if self.distill.topk or self.distill.hidden_weight:
            raise ValueError("DistillationTrainer supports live logit distillation only (topk=0, hidden_weight=0)")
        self.teacher = teacher.to(self.args.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg = self.distill
        outputs = model(**inputs)
        with torch.no_grad():
            t_logits = self.teacher(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        mask = inputs.get("attention_mask")
        n = max(float(mask[:, :-1].sum()) if mask is not None else outputs.logits[:, :-1, 0].numel(), 1.0)
        loss = cfg.kd_weight * kd_loss(outputs.logits, t_logits, cfg.temperature, mask) / n
        if cfg.ce_weight:
            if outputs.loss is None:
                raise ValueError("ce_weight needs labels in the batch")
            loss = loss + cfg.ce_weight * outputs.loss
        return (loss, outputs) if return_outputs else loss
