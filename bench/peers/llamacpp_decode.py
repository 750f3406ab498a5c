"""llama.cpp (llama-cpp-python) on a GGUF file exported by leanlm, batch 1 (run in bench/peers/.venv-llamacpp).

Prefill is one `eval` of the prompt; decode is greedy, one token per `eval`, timed after the first.
Writes one JSON result (bench/speed.py reads it).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from peer_args import decode_args


def main() -> int:
    args = decode_args("--gguf")

    import numpy as np
    import psutil
    from llama_cpp import Llama

    rss_base = psutil.Process().memory_info().rss
    ids = json.loads(args.prompt_ids)
    llm = Llama(model_path=args.gguf, n_ctx=len(ids) + args.new_tokens + 8, n_threads=os.cpu_count() or 2,
                n_batch=512, logits_all=False, verbose=False)

    def run(n: int):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        first = time.perf_counter() - t
        out = [tok]
        t = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(tok)
        return first, time.perf_counter() - t, out

    run(8)  # warm up (every weight touched)
    resident = psutil.Process().memory_info().rss - rss_base
    runs = [run(args.new_tokens) for _ in range(args.repeats)]
    first = min(r[0] for r in runs)
    decode = min(r[1] for r in runs)
    res = {"toolkit": "llama.cpp", "variant": args.variant, "ttft_s": first, "prefill_tokens_per_s": len(ids) / first,
           "decode_tokens_per_s": (args.new_tokens - 1) / decode, "tokens": runs[0][2],
           "weight_bytes_per_token": os.path.getsize(args.gguf),
           "resident_bytes": resident}
    Path(args.result).write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
