"""Decode benchmark: leanlm's engine at batch 1 next to the memory-bandwidth bound, transformers'
`generate` and torchao (with torch.compile) on the same model, prompt and token count.

    .venv/bin/python bench/decode.py                                    # both models, all variants
    .venv/bin/python bench/decode.py --models smollm2-135m --no-peers   # ours + HF generate only

Every variant runs in its own process (torchao's in its venv, bench/peers/setup.sh torchao). The
bound is bytes of weights read per decoded token / read bandwidth, where the bandwidth is a
large-array read measured just before and just after the variant (the better of the two: on this
shared machine it drifts by 1.5x within minutes); '% best' divides by the run's best reading instead. Writes a table to stdout and JSON to bench/results/decode.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
PEERS = ROOT / "bench" / "peers"
# variant -> (recipe or None, model dtype)
VARIANTS = {
    "float32": (None, "float32"),
    "bf16": (None, "bfloat16"),
    "int8": ("w8a16", "bfloat16"),
    "int4_g64": ("w4a16_rtn_g64", "bfloat16"),
    "int4_g128": ("w4a16_rtn", "bfloat16"),
}
HF_VARIANTS = ("float32", "bf16")
TORCHAO_VARIANTS = ("int8", "int4_g64", "int4_g128")


def prompt_ids(tok, n: int) -> list[int]:
    """The first `n` tokens of the wiki evaluation text: the same prompt for every toolkit."""
    from leanlm.data import split_text

    return tok(split_text("wiki", "eval")[:4000]).input_ids[:n]


def run_ours(args) -> dict:
    import torch

    import leanlm
    from leanlm.engine import Engine
    from leanlm.eval.bandwidth import weight_bytes_per_token
    from leanlm.eval.speed import peak_rss_bytes

    recipe, dtype = VARIANTS[args.one]
    model, tok = leanlm.load(args.model)
    if recipe:
        leanlm.quantize(model, recipe, progress=False)
    model = model.to(getattr(torch, dtype))
    ids = torch.tensor(json.loads(args.prompt_ids))
    eng = Engine(model, max_len=ids.numel() + args.new_tokens + 8, cpp_wrapper=not args.python_wrapper)
    t = time.perf_counter()
    eng.warmup()
    warm_s = time.perf_counter() - t
    runs = [eng.generate(ids, args.new_tokens) for _ in range(args.repeats)]
    best = max(runs, key=lambda g: g.decode_tokens_per_s)
    return {"toolkit": "leanlm", "variant": args.one, "decode_tokens_per_s": best.decode_tokens_per_s,
            "ttft_s": min(g.ttft_s for g in runs), "weight_bytes_per_token": weight_bytes_per_token(model),
            "compile_s": eng.compile_s, "warmup_s": warm_s, "compile_error": eng.compile_error,
            "peak_rss_bytes": peak_rss_bytes(), "tokens": best.tokens}


def run_hf(args) -> dict:
    import torch

    import leanlm
    from leanlm.eval.bandwidth import weight_bytes_per_token

    _, dtype = VARIANTS[args.one]
    model, tok = leanlm.load(args.model)
    model = model.to(getattr(torch, dtype))
    ids = torch.tensor(json.loads(args.prompt_ids))[None]
    n = args.new_tokens

    def gen(k):
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False)
        return time.perf_counter() - t, out[0, ids.shape[1]:].tolist()

    gen(4)
    first = min(gen(1)[0] for _ in range(args.repeats))
    full, tokens = min(gen(n) for _ in range(args.repeats))
    return {"toolkit": "transformers generate", "variant": args.one, "decode_tokens_per_s": (n - 1) / (full - first),
            "ttft_s": first, "weight_bytes_per_token": weight_bytes_per_token(model), "tokens": tokens}


def bench_parser(doc: str, variants, prompt_tokens: int) -> argparse.ArgumentParser:
    """The options decode benchmarks share: models, variants, token counts, repeats."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--variants", default=",".join(variants))
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=prompt_tokens)
    ap.add_argument("--repeats", type=int, default=2)
    return ap


CHILD_FLAGS = ("--one", "--model", "--result", "--prompt-ids")


def add_child_args(ap: argparse.ArgumentParser) -> None:
    """The hidden flags of a script's child mode (one variant per process)."""
    for flag in CHILD_FLAGS:
        ap.add_argument(flag, help=argparse.SUPPRESS)


def reject_child_args(ap: argparse.ArgumentParser, args) -> None:
    """Outside child mode the hidden flags are a mistake (`--model` for `--models`): say so, do not ignore it."""
    given = [f for f in CHILD_FLAGS if getattr(args, f[2:].replace("-", "_")) is not None]
    if given:
        ap.error(f"{', '.join(given)} is for the script's own child processes: pick models with --models")


def chosen_variants(ap: argparse.ArgumentParser, spec: str, known) -> list[str]:
    variants = [v for v in spec.split(",") if v]
    unknown = sorted(set(variants) - set(known))
    if unknown:
        ap.error(f"unknown variant(s) {unknown}: choose from {sorted(known)}")
    return variants


def report_header(args) -> dict:
    import torch

    return {"new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "threads": torch.get_num_threads(),
            "measured": time.strftime("%Y-%m-%d %H:%M:%S"), "models": {}}


def child(args) -> int:
    import torch

    torch.manual_seed(0)
    out = run_hf(args) if args.hf else run_ours(args)
    Path(args.result).write_text(json.dumps(out))
    return 0


def spawn(cmd: list[str], label: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        res = Path(d) / "r.json"
        t = time.perf_counter()
        p = subprocess.run(cmd + ["--result", str(res)], capture_output=True, text=True)
        wall = time.perf_counter() - t
        if p.returncode != 0 or not res.exists():
            tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"error": f"{label} failed: {tail[0][:300]}", "wall_s": wall}
        out = json.loads(res.read_text())
        out["wall_s"] = wall
        return out


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__, VARIANTS, prompt_tokens=32)
    ap.add_argument("--no-peers", action="store_true", help="skip torchao")
    ap.add_argument("--python-wrapper", action="store_true",
                    help="compile without inductor's C++ wrapper (faster cold compile, slower decode)")
    ap.add_argument("--out", default=str(RESULTS / "decode.json"))
    add_child_args(ap)
    ap.add_argument("--hf", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        return child(args)
    reject_child_args(ap, args)

    from transformers import AutoTokenizer

    from leanlm.models import prepare

    variants = chosen_variants(ap, args.variants, VARIANTS)
    torchao_py = PEERS / ".venv-torchao" / "bin" / "python"
    report = report_header(args)
    for name in [m for m in args.models.split(",") if m]:
        folder = str(prepare(name))
        ids = prompt_ids(AutoTokenizer.from_pretrained(folder), args.prompt_tokens)
        common = ["--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--prompt-ids", json.dumps(ids)]
        ours = common + (["--python-wrapper"] if args.python_wrapper else [])
        rows = []
        for v in variants:
            print(f"[{name}] leanlm {v} ...", flush=True)
            rows.append(bracketed(lambda: spawn([sys.executable, __file__, "--one", v, "--model", folder] + ours,
                                                f"leanlm {v}")))
            rows[-1].setdefault("toolkit", "leanlm")
            rows[-1].setdefault("variant", v)
        for v in [v for v in HF_VARIANTS if v in variants]:
            print(f"[{name}] transformers generate {v} ...", flush=True)
            rows.append(bracketed(lambda: spawn([sys.executable, __file__, "--one", v, "--hf", "--model", folder]
                                                + common, f"generate {v}")))
            rows[-1].setdefault("toolkit", "transformers generate")
            rows[-1].setdefault("variant", v)
        if not args.no_peers:
            for v in [v for v in TORCHAO_VARIANTS if v in variants]:
                print(f"[{name}] torchao {v} ...", flush=True)
                if not torchao_py.exists():
                    rows.append({"toolkit": "torchao", "variant": v,
                                 "error": "bench/peers/.venv-torchao missing: run bench/peers/setup.sh torchao"})
                    continue
                rows.append(bracketed(lambda: spawn([str(torchao_py), str(PEERS / "torchao_decode.py"), "--variant",
                                                     v, "--model", folder] + common, f"torchao {v}")))
                rows[-1].setdefault("toolkit", "torchao")
                rows[-1].setdefault("variant", v)
        bws = add_bounds(rows)
        hf32 = next((r.get("decode_tokens_per_s") for r in rows
                     if r["toolkit"] == "transformers generate" and r["variant"] == "float32"), None)
        for r in rows:
            if hf32 and r.get("decode_tokens_per_s"):
                r["vs_generate_float32"] = r["decode_tokens_per_s"] / hf32
        report["models"][name] = {"read_bandwidth_bytes_per_s": bws, "rows": rows}
        print(format_table(name, bws, rows), flush=True)
    return write_report(args.out, report)


def bracketed(run) -> dict:
    """`run()`'s result row, with the read bandwidth measured just before and just after it.

    This machine's read bandwidth drifts by 1.5x within minutes (31..57 GB/s seen in one run), so a
    variant's bound uses the readings of its own moment; the run's best reading gives a second,
    stricter fraction."""
    from leanlm.eval.bandwidth import measure_read_bandwidth

    before = measure_read_bandwidth()
    row = run()
    row["read_bandwidth_bytes_per_s"] = [before, measure_read_bandwidth()]
    return row


def add_bounds(rows: list[dict]) -> list[float]:
    """Each measured row's bound (bytes of weights per token / the better of its own two bandwidth
    readings) and fractions of it and of the run's best reading; returns every reading."""
    readings = [b for r in rows for b in r.get("read_bandwidth_bytes_per_s", [])]
    best = max(readings, default=float("nan"))
    for r in rows:
        if r.get("error") or not r.get("weight_bytes_per_token"):
            continue
        r["bound_tokens_per_s"] = max(r["read_bandwidth_bytes_per_s"]) / r["weight_bytes_per_token"]
        r["fraction_of_bound"] = r["decode_tokens_per_s"] / r["bound_tokens_per_s"]
        r["fraction_of_best_bound"] = r["decode_tokens_per_s"] * r["weight_bytes_per_token"] / best
    return readings


def write_report(path: str, report: dict) -> int:
    from leanlm.atomic import atomic_write_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=1))
    print(f"wrote {path}")
    return 0


def table_title(name: str, bws: list[float], note: str = "") -> str:
    if not bws:
        return f"\n{name}: no bandwidth readings (every variant failed){note}"
    return (f"\n{name}: read bandwidth {min(bws) / 1e9:.1f}..{max(bws) / 1e9:.1f} GB/s over {len(bws)} readings "
            f"(a row's bound uses the readings just before and after it; '% best' the run's best){note}")


def format_table(name: str, bws: list[float], rows: list[dict]) -> str:
    lines = [table_title(name, bws),
             f"{'toolkit':<22} {'variant':<10} {'MB/token':>9} {'decode tok/s':>13} {'bound':>7} {'% bound':>8} "
             f"{'% best':>7} "
             f"{'x generate fp32':>16} {'TTFT ms':>8} {'compile s':>10}"]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['toolkit']:<22} {r['variant']:<10} ERROR {r['error']}")
            continue
        lines.append(f"{r['toolkit']:<22} {r['variant']:<10} {r['weight_bytes_per_token'] / 1e6:>9.1f} "
                     f"{r['decode_tokens_per_s']:>13.1f} {r.get('bound_tokens_per_s', float('nan')):>7.1f} "
                     f"{100 * r.get('fraction_of_bound', float('nan')):>7.0f}% "
                     f"{100 * r.get('fraction_of_best_bound', float('nan')):>6.0f}% "
                     f"{r.get('vs_generate_float32', float('nan')):>15.2f}x {1e3 * r.get('ttft_s', float('nan')):>8.0f} "
                     f"{r.get('compile_s', 0.0):>10.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    from entry import run_script  # bench/ is first on sys.path when run as a script

    run_script(main)
