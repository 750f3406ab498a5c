"""QAT / QAD step speed on CPU: the fused fake-quantization kernel against the PyTorch ops it replaces.

    .venv/bin/python bench/qat_speed.py                  # smollm2-135m: float, nvfp4, w4a16_rtn_g64
    .venv/bin/python bench/qat_speed.py --reps 5 --micro-batch 2

One training micro-batch (forward, loss, backward; the embeddings frozen as `qat` leaves them) of the
PTQ-initialised fake-quant model, timed with the kernel and without (`formats.FUSED_KERNEL`) in
alternation within one process (which goes first alternates too), so both see the same machine
state; the median of `--reps` each.
The float model's step is the floor. Writes a table to stdout and JSON to bench/results/qat_speed.json.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipes", nargs="+", default=["nvfp4", "w4a16_rtn_g64"])
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS / "qat_speed.json"))
    args = p.parse_args()

    import torch

    import leanlm
    from leanlm.data import calibration_batches
    from leanlm.native import fake_quant_module
    from leanlm.quant import formats
    from leanlm.train import trainable_parameters
    from leanlm.train.distill import ce_loss_fn
    from leanlm.train.qat import _prepare

    if fake_quant_module() is None:
        sys.exit("the fused fake-quantization kernel could not be built here (see the warning): nothing to compare")
    base, tok = leanlm.load(args.model)
    data = calibration_batches(tok, "wiki", 64, args.seq_len, seed=0, model=base)
    batch = data[:args.micro_batch]

    def step(model) -> float:
        t = time.perf_counter()
        ce_loss_fn(model, batch, None).backward()
        seconds = time.perf_counter() - t
        model.zero_grad(set_to_none=True)
        return seconds

    trainable_parameters(base)
    step(base)  # warm-up (allocator, thread pool)
    rows = [{"recipe": "-", "variant": "float", "seconds": statistics.median(step(base) for _ in range(args.reps))}]
    for recipe in args.recipes:
        model = copy.deepcopy(base)
        _prepare(model, recipe, data, None, learn_scales=False, scale_grad=True, progress=False)
        trainable_parameters(model)
        times = {True: [], False: []}
        for rnd in range(args.reps + 1):  # the first round warms up; the order alternates
            for fused in ((True, False) if rnd % 2 else (False, True)):
                formats.FUSED_KERNEL = fused
                times[fused].append(step(model))
        formats.FUSED_KERNEL = True
        for fused, name in ((False, "pytorch ops"), (True, "fused kernel")):
            rows.append({"recipe": recipe, "variant": name, "seconds": statistics.median(times[fused][1:])})

    tokens = args.micro_batch * args.seq_len
    print(f"\n{args.model}: one training step of {args.micro_batch} x {args.seq_len} tokens, median of {args.reps}, "
          f"{torch.get_num_threads()} threads\n")
    print("| recipe | fake quantization | step (s) | tokens/s | vs float | kernel speedup |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        ops = next((x["seconds"] for x in rows if x["recipe"] == r["recipe"] and x["variant"] == "pytorch ops"), None)
        r["tokens_per_s"] = tokens / r["seconds"]
        r["vs_float"] = r["seconds"] / rows[0]["seconds"]
        speedup = f"{ops / r['seconds']:.2f}x" if r["variant"] == "fused kernel" else ""
        print(f"| {r['recipe']} | {r['variant']} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['vs_float']:.2f}x | {speedup} |")
    out = Path(args.out)
    atomic_write_text(out, json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "model": args.model,
                                       "micro_batch": args.micro_batch, "seq_len": args.seq_len, "reps": args.reps,
                                       "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    from entry import run_script  # bench/ is first on sys.path when run as a script

    run_script(main)
