"""Speed at batch 1: prefill and decode tokens per second after a warm-up, and peak RSS."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import torch


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux) so the peak belongs to this measurement alone."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return psutil.Process().memory_info().rss


@torch.inference_mode()
def _generate(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Greedy decode with the KV cache; returns (prefill seconds, decode seconds)."""
    t0 = time.perf_counter()
    out = model(prompt, use_cache=True)
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(nxt, past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return t1 - t0, time.perf_counter() - t1


def measure_speed(model, prompt_tokens: int = 128, new_tokens: int = 32, repeats: int = 2) -> dict:
    """Prefill and decode tokens/s at batch 1 (best of `repeats` after one warm-up) and peak RSS."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=g)
    _reset_peak_rss()
    _generate(model, prompt[:, :16], 4)  # warm-up: first-call allocations and dispatch
    prefill, decode = [], []
    for _ in range(repeats):
        p, d = _generate(model, prompt, new_tokens)
        prefill.append(p)
        decode.append(d)
    return {"prefill_tokens_per_s": prompt_tokens / min(prefill), "decode_tokens_per_s": new_tokens / min(decode),
            "speed_prompt_tokens": prompt_tokens, "speed_new_tokens": new_tokens,
            "peak_rss_bytes": peak_rss_bytes(), "threads": torch.get_num_threads()}
