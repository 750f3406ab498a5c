"""Shared fixtures: tiny config-built models (dims divisible by 64) and the real default model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from tiny import tiny_llama

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The converted SmolLM2 folder (prepared by `make test` before pytest runs)."""
    from leanlm.models import prepare

    return prepare("smollm2-135m")


@pytest.fixture(scope="session")
def default_model(default_model_dir):
    import leanlm

    return leanlm.load(default_model_dir)


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture
def tiny_model_dir(tmp_path, default_model_dir) -> Path:
    """A tiny model with SmolLM2's vocabulary, saved as a HF folder with SmolLM2's tokenizer."""
    out = tmp_path / "tiny"
    tiny_llama(vocab=49152).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / f, out / f)
    return out
