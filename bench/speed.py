"""Packed low-bit inference on CPU: prefill and decode tokens/s at batch 1, resident memory, perplexity.

    .venv/bin/python bench/speed.py                                  # both models, all variants, peers
    .venv/bin/python bench/speed.py --models smollm2-135m --no-peers

Every leanlm variant is quantized once and saved (`speed/` in the bench work folder, see
bench/workdir.py), then measured in a fresh
process the way a user runs it: ``leanlm.load(folder)`` gives the packed model (int4 / int8 / W8A8
kernels, no float copies) and the decode engine generates from it. Resident memory is the process's
RSS after loading and one forward pass (every weight touched) minus its RSS before loading (Python,
torch, transformers and the code a load imports excluded: each process loads the model once, frees it
and measures a second load); the RSS after compiling and generating is reported too. Perplexity of each packed model is compared with its fake-quant twin (the
same saved folder loaded unpacked, in float32: the reference semantics). Quantized variants quantize
every linear layer, lm_head included as torchao's `quantize_` does by default (INT8 per channel in
the INT4 variants: a 4-bit output layer costs small models several perplexity points). Both models tie
their embedding to lm_head, so the lookups read the quantized table too (no float copy of it). INT4
scales are stored as bf16, what PyTorch's CPU int4 kernel reads, and quantized models run with
float32 activations elsewhere, so the packed model computes what its twin does but for the bf16 inputs
of the int8/int4 prefill kernels (decode runs the native float32 step).

Peers in the same run: torchao's int8 and int4 weight-only paths (bench/peers/setup.sh torchao) and
llama.cpp on leanlm's GGUF export (bench/peers/setup.sh llamacpp, built from source). The bound is
bytes of weights read per token / the large-array read bandwidth measured just before and after the
variant (see bench/decode.py).
Writes a table to stdout and JSON to bench/results/speed.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from decode import (add_bounds, add_child_args, bench_parser, bracketed, chosen_variants, prompt_ids,  # noqa: E402
                    reject_child_args, report_header, spawn, table_title, write_report)
from workdir import work_dir  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PEERS = ROOT / "bench" / "peers"
WORK = work_dir("speed")  # outlives a fresh clone: see bench/workdir.py


def _all_linears(weight: dict, input: dict | None = None, head: dict | None = None) -> dict:
    rules = [{"pattern": "*", "weight": weight, **({"input": input} if input else {})}]
    if head:  # later rules override earlier ones
        rules.append({"pattern": "lm_head", "weight": head})
    return {"exclude": [], "rules": rules}


INT8 = {"format": "int8", "block_size": -1}


# variant -> (recipe or None, dtype)
VARIANTS = {
    "float32": (None, "float32"),
    "bf16": (None, "bfloat16"),
    "int8": (_all_linears(INT8), "float32"),
    "int4_g64": (_all_linears({"format": "int4", "block_size": 64, "scale_format": "bf16"}, head=INT8), "float32"),
    "int4_g128": (_all_linears({"format": "int4", "block_size": 128, "scale_format": "bf16"}, head=INT8), "float32"),
    "w8a8": (_all_linears(INT8, {"format": "int8", "block_size": -1, "dynamic": True}), "float32"),
}
SAVED_LAYOUT = 2  # bump when leanlm saves these variants differently (2: tied embeddings read the quantized lm_head)
TORCHAO_VARIANTS = ("int8", "int4_g64", "int4_g128")
LLAMACPP_VARIANTS = {"Q8_0": "float32", "Q4_0": "float32"}  # GGUF type -> the leanlm variant exported (llama.cpp's own RTN from float)


def saved_variant(model: str, variant: str) -> Path:
    """The quantized folder of `variant` (built once by a child process, then reused)."""
    recipe, _ = VARIANTS[variant]
    out = WORK / Path(model).name / variant
    if recipe is None:
        return Path(model)
    stamp, made = out / "bench_recipe.json", {"recipe": recipe, "layout": SAVED_LAYOUT}
    if stamp.is_file() and json.loads(stamp.read_text()) == made:
        return out
    code = ("import json, sys, leanlm; m, t = leanlm.load(sys.argv[1]); "
            "leanlm.quantize(m, {'name': sys.argv[3], **json.loads(sys.argv[2])}, progress=False); "
            "leanlm.save(m, t, sys.argv[4], overwrite=True)")
    subprocess.run([sys.executable, "-c", code, model, json.dumps(recipe), variant, str(out)], check=True)
    stamp.write_text(json.dumps(made))
    return out


def settle_memory() -> None:
    """Free what is unreachable, drop leanlm's layout caches and hand the freed heap back to the OS."""
    import gc

    from leanlm.kernels import _int4_layout
    from leanlm.memory import release_free_memory

    gc.collect()
    _int4_layout.cache_clear()
    release_free_memory()


def run_ours(args) -> dict:
    import gc

    import torch

    import leanlm
    from leanlm.engine import Engine
    from leanlm.eval.bandwidth import weight_bytes_per_token
    from leanlm.eval.size import resident_bytes, tensor_bytes

    _, dtype = VARIANTS[args.one]
    dtype = getattr(torch, dtype)
    ids = torch.tensor(json.loads(args.prompt_ids))
    # Code imported on first use (transformers' model classes, tokenizers, leanlm's kernels) is not the
    # model: load it once and free it, then measure a second load from a settled heap.
    warm, _ = leanlm.load(args.model, dtype=dtype)
    with torch.inference_mode():
        warm(ids[None])
    del warm, _
    settle_memory()
    rss0 = resident_bytes()
    model, tok = leanlm.load(args.model, dtype=dtype)
    with torch.inference_mode():
        model(ids[None])  # touches every weight (safetensors pages are mapped lazily)
    gc.collect()
    loaded = resident_bytes() - rss0
    eng = Engine(model, max_len=ids.numel() + args.new_tokens + 8, cpp_wrapper=True)
    t = time.perf_counter()
    eng.warmup()
    warm_s = time.perf_counter() - t
    runs = [eng.generate(ids, args.new_tokens) for _ in range(args.repeats)]
    best = max(runs, key=lambda g: g.decode_tokens_per_s)
    ttft = min(g.ttft_s for g in runs)
    res = {"toolkit": "leanlm", "variant": args.one, "decode_tokens_per_s": best.decode_tokens_per_s,
           "ttft_s": ttft, "prefill_tokens_per_s": ids.numel() / ttft, "weight_bytes_per_token": weight_bytes_per_token(model),
           "tensor_bytes": tensor_bytes(model), "resident_bytes": loaded, "rss_after_generate_bytes": resident_bytes() - rss0,
           "kernels": getattr(model, "leanlm_kernels", None), "compile_s": eng.compile_s, "warmup_s": warm_s,
           "compile_error": eng.compile_error, "tokens": best.tokens}
    eng.close()
    if args.ppl_tokens:
        ev, _ = leanlm.eval_tokens(tok, "wiki", max_tokens=args.ppl_tokens)
        res["ppl"] = leanlm.perplexity(model, ev, progress=False)["perplexity"]
        if VARIANTS[args.one][0] is not None:
            del model, eng
            gc.collect()
            twin, _ = leanlm.load(args.model, packed=False)  # float32: the quantized model's exact semantics
            res["ppl_fake_quant"] = leanlm.perplexity(twin, ev, progress=False)["perplexity"]
    return res


def child(args) -> int:
    import torch

    torch.manual_seed(0)
    Path(args.result).write_text(json.dumps(run_ours(args)))
    return 0


def _row(rows: list, res: dict, toolkit: str, variant: str) -> None:
    res.setdefault("toolkit", toolkit)
    res.setdefault("variant", variant)
    rows.append(res)


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__, VARIANTS, prompt_tokens=128)
    ap.add_argument("--ppl-tokens", type=int, default=2048, help="evaluation tokens for packed vs fake-quant (0: skip)")
    ap.add_argument("--no-peers", action="store_true", help="skip torchao and llama.cpp")
    ap.add_argument("--torchao-variants", default=",".join(TORCHAO_VARIANTS))
    ap.add_argument("--out", default=str(RESULTS / "speed.json"))
    add_child_args(ap)
    args = ap.parse_args(argv)
    if args.one:
        return child(args)
    reject_child_args(ap, args)

    from transformers import AutoTokenizer

    from leanlm.models import prepare

    variants = chosen_variants(ap, args.variants, VARIANTS)
    report = report_header(args)
    torchao_py = PEERS / ".venv-torchao" / "bin" / "python"
    llamacpp_py = PEERS / ".venv-llamacpp" / "bin" / "python"
    for name in [m for m in args.models.split(",") if m]:
        folder = str(prepare(name))
        ids = prompt_ids(AutoTokenizer.from_pretrained(folder), args.prompt_tokens)
        common = ["--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--prompt-ids", json.dumps(ids)]
        rows = []
        for v in variants:
            print(f"[{name}] leanlm {v} ...", flush=True)
            saved = saved_variant(folder, v)
            _row(rows, bracketed(lambda: spawn([sys.executable, __file__, "--one", v, "--model", str(saved),
                                                "--ppl-tokens", str(args.ppl_tokens)] + common, f"leanlm {v}")),
                 "leanlm", v)
        if not args.no_peers:
            for v in [v for v in args.torchao_variants.split(",") if v]:
                print(f"[{name}] torchao {v} ...", flush=True)
                res = ({"error": "bench/peers/.venv-torchao missing: run bench/peers/setup.sh torchao"}
                       if not torchao_py.exists() else
                       bracketed(lambda: spawn([str(torchao_py), str(PEERS / "torchao_decode.py"), "--variant", v,
                                                "--model", folder] + common, f"torchao {v}")))
                _row(rows, res, "torchao", v)
            for qtype, source in LLAMACPP_VARIANTS.items():
                print(f"[{name}] llama.cpp {qtype} ...", flush=True)
                gguf = _gguf(llamacpp_py, folder, qtype, source)
                res = gguf if isinstance(gguf, dict) else bracketed(lambda: spawn(
                    [str(llamacpp_py), str(PEERS / "llamacpp_decode.py"), "--gguf", str(gguf), "--variant", qtype]
                    + common, f"llama.cpp {qtype}"))
                _row(rows, res, "llama.cpp", qtype)
        bws = add_bounds(rows)
        _ratios(rows)
        report["models"][name] = {"read_bandwidth_bytes_per_s": bws, "rows": rows}
        print(format_table(name, bws, rows), flush=True)
    return write_report(args.out, report)


def _gguf(py: Path, folder: str, qtype: str, source: str) -> Path | dict:
    """The GGUF export llama.cpp decodes (written once), or an error row."""
    if not py.exists():
        return {"error": "bench/peers/.venv-llamacpp missing: run bench/peers/setup.sh llamacpp"}
    out = WORK / Path(folder).name / f"gguf-{qtype}"
    if not (out / "leanlm_export.json").is_file():
        p = subprocess.run([str(ROOT / ".venv" / "bin" / "leanlm"), "export", str(saved_variant(folder, source)),
                            "--format", "gguf", "--qtype", qtype, "--out", str(out), "--overwrite"],
                           capture_output=True, text=True)
        if p.returncode:
            return {"error": f"gguf export failed: {(p.stderr or p.stdout).strip().splitlines()[-1][:300]}"}
    return out / "model.gguf"


def _ratios(rows: list[dict]) -> None:
    """Ratios against leanlm float32 and torchao's int4 of the same group size."""
    ours = {r["variant"]: r for r in rows if r["toolkit"] == "leanlm" and not r.get("error")}
    f32 = ours.get("float32", {})
    for r in rows:
        if r.get("error"):
            continue
        if f32.get("decode_tokens_per_s"):
            r["decode_vs_float32"] = r["decode_tokens_per_s"] / f32["decode_tokens_per_s"]
            r["resident_vs_float32"] = r.get("resident_bytes", float("nan")) / f32["resident_bytes"]
        if r.get("ppl") and r.get("ppl_fake_quant"):
            r["ppl_packed_vs_fake"] = r["ppl"] / r["ppl_fake_quant"] - 1
        peer = next((p for p in rows if p["toolkit"] == "torchao" and p["variant"] == r["variant"]
                     and not p.get("error")), None)
        if r["toolkit"] == "leanlm" and peer:
            r["decode_vs_torchao"] = r["decode_tokens_per_s"] / peer["decode_tokens_per_s"]


def format_table(name: str, bws: list[float], rows: list[dict]) -> str:
    nan = float("nan")
    lines = [table_title(name, bws, "; ratios against leanlm float32 in this run"),
             f"{'toolkit':<10} {'variant':<10} {'MB/tok':>7} {'prefill t/s':>11} {'decode t/s':>10} {'% bound':>8} "
             f"{'x fp32':>7} {'x torchao':>9} {'RSS MB':>7} {'RSS/fp32':>8} {'ppl':>8} {'vs fake':>8}"]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['toolkit']:<10} {r['variant']:<10} ERROR {r['error']}")
            continue
        pv = r.get("ppl_packed_vs_fake")
        lines.append(f"{r['toolkit']:<10} {r['variant']:<10} {r['weight_bytes_per_token'] / 1e6:>7.1f} "
                     f"{r.get('prefill_tokens_per_s', nan):>11.1f} {r['decode_tokens_per_s']:>10.1f} "
                     f"{100 * r.get('fraction_of_bound', nan):>7.0f}% {r.get('decode_vs_float32', nan):>6.2f}x "
                     f"{r.get('decode_vs_torchao', nan):>8.2f}x {r.get('resident_bytes', nan) / 2**20:>7.0f} "
                     f"{100 * r.get('resident_vs_float32', nan):>7.0f}% {r.get('ppl', nan):>8.3f} "
                     + (f"{100 * pv:>+7.2f}%" if pv is not None else f"{'':>8}"))
    return "\n".join(lines)


if __name__ == "__main__":
    from entry import run_script  # bench/ is first on sys.path when run as a script

    run_script(main)
