"""Speed at batch 1 through the generation engine: prefill and decode tokens per second, and peak RSS."""

from __future__ import annotations

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


def measure_speed(model, prompt_tokens: int = 128, new_tokens: int = 32, repeats: int = 2,
                  compile: bool = True) -> dict:
    """Prefill and decode tokens/s at batch 1 through the generation engine (best of `repeats` after
    a warm-up that compiles the decode step), and peak RSS. The model is given back unchanged."""
    from ..engine import Engine

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.get_text_config(decoder=True).vocab_size, (prompt_tokens,), generator=g)
    _reset_peak_rss()
    with Engine(model, max_len=prompt_tokens + new_tokens + 8, compile=compile) as eng:
        eng.warmup()
        runs = [eng.generate(prompt, new_tokens) for _ in range(repeats)]
        compile_s, compile_error = eng.compile_s, eng.compile_error
    return {"prefill_tokens_per_s": prompt_tokens / min(r.ttft_s for r in runs),
            "decode_tokens_per_s": max(r.decode_tokens_per_s for r in runs),
            "speed_prompt_tokens": prompt_tokens, "speed_new_tokens": new_tokens,
            "compile_seconds": compile_s, "compile_error": compile_error,
            "peak_rss_bytes": peak_rss_bytes(), "threads": torch.get_num_threads()}
