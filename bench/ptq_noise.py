"""How much PTQ perplexity moves when the float weights change in their last bits.

    .venv/bin/python bench/ptq_noise.py                       # smollm2-135m: nvfp4, w4a16_rtn_g64, 3 nudges
    .venv/bin/python bench/ptq_noise.py --recipes nvfp4 --nudges 5

Every decoder weight is multiplied by (1 + eps * N(0, 1)) with eps = 6e-8, which in float32 moves
about half of them by one ulp: the float model's perplexity does not move in its first five digits,
but values sitting near a rounding boundary of the low-bit grid fall the other way. That is what a different CPU's matrix kernels (other
summation orders) do to a quantized model's activations too, so the spread is the noise floor under
any PTQ figure, and under the "gap recovered" of QAT and QAD, which divide by the PTQ gap.
Writes a table to stdout and JSON to bench/results/ptq_noise_<model>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leanlm.atomic import atomic_write_text  # noqa: E402

RESULTS = ROOT / "bench" / "results"
EPS = 6e-8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipes", nargs="+", default=["nvfp4", "w4a16_rtn_g64"])
    p.add_argument("--nudges", type=int, default=3, help="nudged copies per recipe (seeds 1..N)")
    p.add_argument("--eval-tokens", type=int, default=8192)
    args = p.parse_args()

    import torch

    import leanlm
    from leanlm.eval.perplexity import perplexity

    base, tok = leanlm.load(args.model)
    ev_ids, ev_bytes = leanlm.eval_tokens(tok, "wiki", args.eval_tokens)

    def nudged(seed: int):
        m = copy.deepcopy(base)
        if seed:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for name, w in m.named_parameters():
                    if ".layers." in name and w.ndim == 2:
                        w.mul_(1 + EPS * torch.randn(w.shape, generator=g))
        return m

    def ppl(m) -> float:
        return perplexity(m, ev_ids, ev_bytes, progress=False)["perplexity"]

    rows = []
    for seed in range(args.nudges + 1):
        m = nudged(seed)
        row = {"seed": seed, "float": ppl(m)}
        for recipe in args.recipes:
            q = copy.deepcopy(m)
            leanlm.quantize(q, recipe, progress=False)
            row[recipe] = ppl(q)
        rows.append(row)
        print(f"nudge {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "seed"), flush=True)

    print(f"\n{args.model}: wiki perplexity ({args.eval_tokens} eval tokens); weights x (1 + {EPS:g} N(0,1)), "
          f"seeds 1..{args.nudges} (seed 0: untouched)\n")
    cols = ["float", *args.recipes]
    print("| nudge | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for r in rows:
        print(f"| {r['seed'] or 'none'} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    spread = {c: max(r[c] for r in rows) - min(r[c] for r in rows) for c in cols}
    print("| max - min | " + " | ".join(f"{spread[c]:.3f}" for c in cols) + " |")
    print("| stdev | " + " | ".join(f"{statistics.stdev(r[c] for r in rows):.3f}" for c in cols) + " |")
    out = RESULTS / f"ptq_noise_{args.model}.json"
    atomic_write_text(out, json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "model": args.model, "eps": EPS,
                                       "eval_tokens": args.eval_tokens, "rows": rows, "spread": spread}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    from entry import run_script  # bench/ is first on sys.path when run as a script

    run_script(main)
