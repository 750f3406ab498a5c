"""PTQ benchmark: leanlm's recipes next to the peers' equivalents on the same model, calibration
samples and evaluation tokens, in one run.

    .venv/bin/python bench/ptq.py --model smollm2-135m                      # full settings
    .venv/bin/python bench/ptq.py --model smollm2-135m --calib-samples 16 --eval-tokens 4096 --no-peers
    .venv/bin/python bench/ptq.py --recipes int8_sq@sequential=false --no-peers   # a preset with other options

Every variant runs in its own process (ours with this venv, each peer in its venv under
bench/peers/, set up by bench/peers/setup.sh), so peak RSS and calibration time belong to it alone.
Writes a table to stdout and JSON to bench/results/ptq_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
PEERS = ROOT / "bench" / "peers"
OURS = ["w4a16_rtn_g64", "w4a16_awq_g64", "w4a16_gptq_g64", "w4a16_rtn", "w4a16_awq", "w4a16_gptq",
        "fp8", "fp8_dynamic", "fp8_block", "int8_sq", "int8_sq_dynamic", "w4a8_awq", "nvfp4", "nvfp4_awq", "mxfp4", "mxfp8", "fp8_kv_fp8"]
# peer -> schemes (named like our recipes they correspond to)
PEER_SCHEMES = {
    "modelopt": ["fp8", "fp8_dynamic", "int8_sq", "w4a16_awq_g64", "w4a16_awq", "w4a8_awq", "nvfp4"],
    "llmcompressor": ["w4a16_gptq_g64", "w4a16_gptq", "w4a16_awq_g64", "int8_sq_dynamic", "fp8", "fp8_dynamic"],
}


def recipe_with_options(name: str):
    """A preset, optionally with options after '@': ``int8_sq@sequential=false,alpha=0.5``."""
    import yaml

    from leanlm.quant.recipes import get_recipe, recipe_from_dict

    base, _, extra = name.partition("@")
    if not extra:
        return base
    d = get_recipe(base).to_dict()
    d["name"] = name
    d["options"].update({k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in extra.split(","))})
    return recipe_from_dict(d, name=name)


def run_one(args) -> None:
    """Child process: quantize with one of our recipes (or none) and evaluate."""
    import torch
    from safetensors.torch import load_file

    import leanlm
    from leanlm.eval.perplexity import perplexity
    from leanlm.eval.speed import peak_rss_bytes

    model, tok = leanlm.load(args.model_dir)
    ev = load_file(args.eval)
    seconds = 0.0
    if args.one != "float":
        calib = load_file(args.calib)["ids"]
        t = time.perf_counter()
        leanlm.quantize(model, recipe_with_options(args.one), calib=calib, progress=False)
        seconds = time.perf_counter() - t
    with torch.no_grad():
        r = perplexity(model, ev["ids"], ev["bytes"], window=args.window, progress=False)
    out = {"toolkit": "leanlm", "scheme": args.one, "perplexity": r["perplexity"], "bits_per_byte": r["bits_per_byte"],
           "scored_tokens": r["scored_tokens"], "calibration_seconds": seconds, "peak_rss_bytes": peak_rss_bytes(),
           "error": None}
    Path(args.result).write_text(json.dumps(out))


def _child(cmd: list[str], result: Path, label: str, timeout: int) -> dict:
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout}s"}
    if result.is_file():
        r = json.loads(result.read_text())
        result.unlink()
    else:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
        r = {"error": f"exit {p.returncode}: {tail[0][:200]}"}
    r["wall_seconds"] = time.perf_counter() - t
    print(f"  {label}: " + (f"ppl {r['perplexity']:.4f}, calib {r.get('calibration_seconds', 0):.1f}s"
                             if not r.get("error") else f"error: {r['error']}"), flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="wiki")
    ap.add_argument("--recipes", default=",".join(OURS))
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=20480)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--peers", default="modelopt,llmcompressor")
    ap.add_argument("--peer-schemes", help="only these peer schemes (comma-separated), e.g. fp8,int8_sq")
    ap.add_argument("--fresh", action="store_true",
                    help="discard earlier rows; by default rows of an earlier run with the same settings are "
                         "kept and the variants run now replace theirs, so a long benchmark can run in parts")
    ap.add_argument("--timeout", type=int, default=7200)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--calib", help=argparse.SUPPRESS)
    ap.add_argument("--eval", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return run_one(args)

    import torch
    from safetensors.torch import save_file

    import leanlm
    from leanlm.atomic import atomic_write_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    work = RESULTS / "tmp"
    work.mkdir(exist_ok=True)
    model_dir = leanlm.prepare(args.model) if args.model in leanlm.BUILTIN_MODELS else Path(args.model)
    _, tok = leanlm.load(model_dir)
    calib_file, eval_file = work / f"{args.model}_calib.safetensors", work / f"{args.model}_eval.safetensors"
    save_file({"ids": leanlm.calibration_batches(tok, args.data, args.calib_samples, args.seq_len).contiguous()}, calib_file)
    ids, nbytes = leanlm.eval_tokens(tok, args.data, args.eval_tokens)
    save_file({"ids": ids, "bytes": nbytes}, eval_file)
    common = ["--model-dir", str(model_dir), "--calib", str(calib_file), "--eval", str(eval_file),
              "--window", str(args.window)]
    print(f"{args.model}: {args.calib_samples} x {args.seq_len} calibration tokens, {args.eval_tokens} evaluation "
          f"tokens ({args.data}), torch threads {torch.get_num_threads()}", flush=True)

    settings = {"model": args.model, "data": args.data, "calib_samples": args.calib_samples, "seq_len": args.seq_len,
                "eval_tokens": args.eval_tokens, "window": args.window}
    out = RESULTS / f"ptq_{args.model}.json"
    if args.fresh:
        out.unlink(missing_ok=True)
    rows = []

    def save() -> list[dict]:
        """Write this run's rows over the file's rows for the same settings, read again at every save
        (after each variant), so a run stopped part-way keeps what it measured and two runs keep theirs."""
        earlier = json.loads(out.read_text()) if out.is_file() else {}
        kept = earlier.get("rows", []) if all(earlier.get(k) == v for k, v in settings.items()) else []
        ran = {(r["toolkit"], r["scheme"]) for r in rows}
        merged = [r for r in kept if (r["toolkit"], r["scheme"]) not in ran] + rows
        order = {"leanlm": 0, "modelopt": 1, "llmcompressor": 2}
        merged.sort(key=lambda r: (order.get(r["toolkit"], 9), r["scheme"] != "float", r["scheme"]))
        base = next((r["perplexity"] for r in merged if r["scheme"] == "float"), None)
        for r in merged:
            if r.get("perplexity") and base:
                r["delta_pct"] = 100 * (r["perplexity"] / base - 1)
        atomic_write_text(out, json.dumps({**settings, "rows": merged}, indent=2))
        return merged

    for scheme in ["float"] + [r for r in args.recipes.split(",") if r]:
        res = work / f"ours_{scheme}.json"
        r = _child([sys.executable, __file__, "--one", scheme, "--result", str(res)] + common, res,
                   f"leanlm {scheme}", args.timeout)
        rows.append({"toolkit": "leanlm", "scheme": scheme, **r, "measured": time.strftime("%Y-%m-%d %H:%M")})
        save()
    if not args.no_peers:
        for peer in args.peers.split(","):
            py = PEERS / f".venv-{peer}" / "bin" / "python"
            for scheme in PEER_SCHEMES[peer]:
                if args.peer_schemes and scheme not in args.peer_schemes.split(","):
                    continue
                if not py.exists():
                    rows.append({"toolkit": peer, "scheme": scheme,
                                 "error": f"venv missing: run bench/peers/setup.sh {peer}"})
                    continue
                res = work / f"{peer}_{scheme}.json"
                cmd = [str(py), str(PEERS / "run_peer.py"), "--peer", peer, "--scheme", scheme, "--model", str(model_dir),
                       "--calib", str(calib_file), "--eval", str(eval_file), "--window", str(args.window),
                       "--out", str(res)]
                r = _child(cmd, res, f"{peer} {scheme}", args.timeout)
                rows.append({**r, "toolkit": peer, "scheme": scheme, "measured": time.strftime("%Y-%m-%d %H:%M")})
                save()

    rows = save()
    print()
    print(format_rows(rows))
    print(f"\nwrote {out}")


def format_rows(rows: list[dict]) -> str:
    head = f"{'toolkit':<14} {'scheme':<18} {'ppl':>9} {'Δ vs float':>10} {'calib s':>8} {'peak RSS MB':>11}  error"
    lines = [head, "-" * len(head)]
    for r in rows:
        ppl = f"{r['perplexity']:.4f}" if r.get("perplexity") else "–"
        d = f"{r['delta_pct']:+.2f}%" if "delta_pct" in r else "–"
        cs = f"{r['calibration_seconds']:.1f}" if r.get("calibration_seconds") is not None and not r.get("error") else "–"
        rss = f"{r['peak_rss_bytes'] / 1e6:.0f}" if r.get("peak_rss_bytes") else "–"
        lines.append(f"{r['toolkit']:<14} {r['scheme']:<18} {ppl:>9} {d:>10} {cs:>8} {rss:>11}  {r.get('error') or ''}")
    return "\n".join(lines)


if __name__ == "__main__":
    from entry import run_script  # bench/ is first on sys.path when run as a script

    run_script(main)
