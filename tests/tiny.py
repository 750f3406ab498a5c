"""Tiny config-built models for unit tests (dims divisible by 64)."""

import torch


def tiny_llama(seed: int = 0, vocab: int = 256, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def tiny_qwen2(seed: int = 0, vocab: int = 256, layers: int = 2):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).eval()


def tiny_gemma3(seed: int = 0, vocab: int = 256, layers: int = 3, sliding_window: int = 8):
    """Gemma-3 text model with sliding-window layers (window 8) and a full-attention layer."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                              max_position_embeddings=256, sliding_window=sliding_window,
                              layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"])
    return Gemma3ForCausalLM(config).eval()
