"""Streaming PTQ of a model larger than comfortable memory: peak RSS and time per layer.

    .venv/bin/python bench/scale.py                       # ~3B Llama (12 GB float32), w4a16_awq
    .venv/bin/python bench/scale.py --layers 2 --hidden 1024 --intermediate 4096 --heads 16 --kv-heads 4  # quick

Writes a random-weight Llama model (hidden 3072, MLP 8192, 24 heads / 8 KV heads, SmolLM2's tokenizer
and vocabulary, tied embeddings: about 3.0B parameters) to the bench work folder (`scale/`, see
bench/workdir.py) once, layer by layer, then
quantizes it with `leanlm.quant.streaming.quantize_streaming` in a child process on real calibration
text (wiki), so the peak resident memory measured is that of the quantization alone. Prints a table
and writes bench/results/scale.json. Target (issue 8): peak RSS under 4 GB.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from result_rows import ResultRows  # noqa: E402  (bench/ sits first on sys.path when run as a script)
from workdir import work_dir  # noqa: E402

RESULTS = ROOT / "bench" / "results"
WORK = work_dir("scale")  # outlives a fresh clone: see bench/workdir.py
TARGET_PEAK_GB = 4.0


def child(args) -> None:
    """The measured process: stream-quantize and report per-layer seconds and peak RSS as JSON."""
    import torch

    import leanlm
    from leanlm.memory import peak_rss_bytes
    from leanlm.quant.streaming import quantize_streaming

    src, out = Path(args.model_dir), Path(args.out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    calib = leanlm.calibration_batches(tok, "wiki", args.calib_samples, args.seq_len)
    seconds: list[float] = []
    t = time.perf_counter()
    quantize_streaming(src, args.recipe, calib, out, overwrite=True, progress=True,
                       on_layer=lambda i, s: seconds.append(s))
    total = time.perf_counter() - t
    print(json.dumps({"seconds_per_layer": seconds, "total_seconds": total, "peak_rss_bytes": peak_rss_bytes(),
                      "threads": torch.get_num_threads()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--recipe", default="w4a16_awq")
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--keep", action="store_true", help="keep the quantized output (else removed after measuring)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.model_dir or args.out:
        p.error("--model-dir and --out are for the script's own child process: set the model's shape with "
                "--layers, --hidden, --intermediate, --heads, --kv-heads")

    from leanlm.models import prepare, safetensors_header
    from leanlm.synthetic import write_random_llama

    shape = {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers, "heads": args.heads,
             "kv_heads": args.kv_heads, "vocab": 49152}
    model_dir = WORK / "model-{hidden}x{intermediate}x{layers}-h{heads}-kv{kv_heads}".format(**shape)
    gen_seconds = None
    if not (model_dir / "config.json").is_file():
        t = time.perf_counter()
        write_random_llama(model_dir, **shape, tokenizer_from=prepare("smollm2-135m"))
        gen_seconds = time.perf_counter() - t
    float_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    out = WORK / f"quantized-{args.recipe}"
    cmd = [sys.executable, __file__, "--child", "--model-dir", str(model_dir), "--out", str(out),
           "--recipe", args.recipe, "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len)]
    run = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    if not args.keep:
        shutil.rmtree(out)
    sec = measured["seconds_per_layer"]
    lay = args.layers
    params = sum(math.prod(t["shape"]) for f in model_dir.glob("*.safetensors")
                 for k, t in safetensors_header(f)[1].items() if k != "__metadata__")
    row = {
        "recipe": args.recipe, "params": params, "layers": lay, "float32_gb": float_bytes / 1e9,
        "quantized_gb": out_bytes / 1e9, "calib_tokens": args.calib_samples * args.seq_len,
        "total_s": measured["total_seconds"], "mean_s_per_layer": statistics.mean(sec),
        "median_s_per_layer": statistics.median(sec), "max_s_per_layer": max(sec),
        "peak_rss_gb": measured["peak_rss_bytes"] / 1e9, "target_peak_gb": TARGET_PEAK_GB,
        "meets_target": measured["peak_rss_bytes"] / 1e9 < TARGET_PEAK_GB, "threads": measured["threads"],
        "model_write_s": gen_seconds, "seconds_per_layer": sec,
    }
    print(f"\nStreaming PTQ, {row['params'] / 1e9:.2f}B-parameter random Llama ({row['float32_gb']:.1f} GB float32 "
          f"on disk), {args.recipe}, {row['calib_tokens']} calibration tokens, {row['threads']} threads")
    print(f"| {'layers':>6} | {'total s':>8} | {'s/layer (median)':>16} | {'s/layer (max)':>13} | "
          f"{'peak RSS GB':>11} | {'target':>7} | {'output GB':>9} |")
    print(f"| {lay:>6} | {row['total_s']:>8.0f} | {row['median_s_per_layer']:>16.1f} | {row['max_s_per_layer']:>13.1f} | "
          f"{row['peak_rss_gb']:>11.2f} | {'< 4 GB' if row['meets_target'] else 'MISSED':>7} | "
          f"{row['quantized_gb']:>9.2f} |")
    settings = {**shape, "recipe": args.recipe, "calib_samples": args.calib_samples, "seq_len": args.seq_len}
    ResultRows(RESULTS / "scale.json", settings, ("recipe",), fresh=True).add(row)
    print(f"wrote {RESULTS / 'scale.json'}")


if __name__ == "__main__":
    from entry import run_script  # bench/ is first on sys.path when run as a script

    run_script(main)
