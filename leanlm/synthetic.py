"""Random-weight Llama models written straight to disk, one decoder layer per safetensors shard, so a
model far larger than memory can be made (scale tests and benchmarks of streaming quantization)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .atomic import atomic_dir


def write_random_llama(out: str | Path, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                       vocab: int, tokenizer_from: str | Path | None = None, seed: int = 0,
                       overwrite: bool = False) -> Path:
    """A Llama-architecture HF folder of N(0, 0.02) weights (norms at 1, tied embeddings), written one
    layer at a time: memory holds one layer's float32 weights. `tokenizer_from` copies a tokenizer in."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=hidden // heads, max_position_embeddings=4096, tie_word_embeddings=True)
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    groups: dict[str, dict[str, torch.Size]] = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":  # tied to the embeddings: stored once
            continue
        shard = f"layer{int(name.split('.')[2]):04d}" if name.startswith("model.layers.") else "rest"
        groups.setdefault(shard, {})[name] = p.shape
    g = torch.Generator().manual_seed(seed)
    weight_map = {}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        config.save_pretrained(tmp)
        for i, (shard, shapes) in enumerate(groups.items()):
            file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            tensors = {n: torch.ones(s) if n.endswith("norm.weight") else torch.randn(s, generator=g) * 0.02
                       for n, s in shapes.items()}
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in shapes})
            del tensors
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                      indent=2))
        if tokenizer_from is not None:
            for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if (Path(tokenizer_from) / f).is_file():
                    shutil.copy(Path(tokenizer_from) / f, tmp / f)
    return Path(out)
