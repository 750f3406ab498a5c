"""Speculative decoding: drafters propose, the target verifies in one step, output unchanged."""

from .decode import SpecGeneration, speculative_generate, verify
from .drafters import ModelDrafter, NGramDrafter, same_tokenizer
from .eagle3 import Eagle3Config, Eagle3Drafter, Eagle3Head, load_eagle3, save_eagle3
from .train import Eagle3TrainConfig, train_eagle3

__all__ = ["Eagle3Config", "Eagle3Drafter", "Eagle3Head", "Eagle3TrainConfig", "ModelDrafter", "NGramDrafter",
           "SpecGeneration", "load_eagle3", "same_tokenizer", "save_eagle3", "speculative_generate", "train_eagle3",
           "verify"]
