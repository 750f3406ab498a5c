"""torchao's CPU weight-only paths on a HF model, compiled, decoding at batch 1 (run in bench/peers/.venv-torchao).

Int8WeightOnlyConfig and PrototypeInt4WeightOnlyConfig (PyTorch's CPU tinygemm int4 kernel) on a
bf16 model; the forward is compiled with torch.compile and `generate` uses a static cache, as
torchao's own examples do. Prints nothing; writes one JSON result (bench/decode.py reads it).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import time
from pathlib import Path

import torch
from peer_args import decode_args


def _memory():
    """leanlm/memory.py (standard library only), without importing leanlm into this venv."""
    path = Path(__file__).resolve().parents[2] / "leanlm" / "memory.py"
    spec = importlib.util.spec_from_file_location("leanlm_memory", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def stored_bytes(model) -> int:
    """Bytes of parameters and buffers as stored, looking inside torchao's tensor subclasses."""

    def size(t) -> int:
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()

    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += size(t)
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or out.weight is not emb.weight:  # an untied embedding lookup reads one row
        total -= size(emb.weight) - emb.weight.shape[-1] * 2
    return total


def main() -> int:
    args = decode_args("--model", ["int8", "int4_g64", "int4_g128"])

    import psutil
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from transformers import AutoModelForCausalLM

    if args.variant == "int8":
        config = Int8WeightOnlyConfig()
    else:
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

        config = PrototypeInt4WeightOnlyConfig(group_size=int(args.variant.split("_g")[1]))
    ids = torch.tensor(json.loads(args.prompt_ids))[None]

    def load():
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
        quantize_(m, config)  # linear layers of the decoder; lm_head too, as torchao's default filter does
        with torch.inference_mode():
            m(ids)  # every weight touched, before compiling
        return m

    # As bench/speed.py measures leanlm: code imported on first use is not the model, so the model is
    # loaded once and freed, and a second load is measured from a settled heap.
    warm = load()
    del warm
    gc.collect()
    _memory().release_free_memory()
    rss_base = psutil.Process().memory_info().rss
    model = load()
    resident = psutil.Process().memory_info().rss - rss_base
    # generate() calls the forward with a prefill shape and a decode shape (and Gemma-3 with
    # per-layer-type masks): allow the recompiles rather than failing on the default limit.
    torch._dynamo.config.cache_size_limit = 64
    model.forward = torch.compile(model.forward, dynamic=False)
    n = args.new_tokens

    def gen(k):
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                                 cache_implementation="static")
        return time.perf_counter() - t, out[0, ids.shape[1]:].tolist()

    t = time.perf_counter()
    gen(n)  # compiles prefill and decode
    warm = time.perf_counter() - t
    first = min(gen(1)[0] for _ in range(args.repeats))
    full, tokens = min(gen(n) for _ in range(args.repeats))
    out = {"toolkit": "torchao", "variant": args.variant, "decode_tokens_per_s": (n - 1) / (full - first),
           "ttft_s": first, "weight_bytes_per_token": stored_bytes(model), "warmup_s": warm, "tokens": tokens,
           "resident_bytes": resident, "rss_after_generate_bytes": psutil.Process().memory_info().rss - rss_base,
           "prefill_tokens_per_s": ids.shape[1] / first}
    Path(args.result).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
