"""Training: one loop (checkpoints, resume, data parallel) serving QAT, QAD and distillation."""

from .distill import DistillConfig, distill
from .generated import generated_sequences
from .loop import TrainConfig, train
from .qat import qad, qat, trainable_parameters, training_sequences

__all__ = ["DistillConfig", "distill", "generated_sequences", "TrainConfig", "qad", "qat", "train",
           "trainable_parameters", "training_sequences"]
