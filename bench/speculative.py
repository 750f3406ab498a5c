"""Speculative decoding benchmark: greedy, held-out prompts, every output checked identical to plain.

    .venv/bin/python bench/speculative.py                          # smollm2-135m; trains the EAGLE-3 head if missing
    .venv/bin/python bench/speculative.py --models smollm2-135m,gemma3-270m --train-minutes 35
    .venv/bin/python bench/speculative.py --train-minutes 40 --train-epochs 3 --train-corpus-tokens 300000

Per model, in one process: leanlm's plain decoding (compiled engine), then speculative decoding with
n-gram lookup, an EAGLE-3 head (`eagle3-MODEL` in the bench work folder, see bench/workdir.py;
trained by `leanlm speculate train` with the
given minutes when absent) and a draft model (the target cut to `--draft-layers` evenly spaced decoder
layers: a real, smaller HF model with the same tokenizer); then transformers' `generate` plain, with
the same draft model (`assistant_model`, assisted generation) and with prompt lookup, on the same
prompts. Speedups compare end-to-end tokens/s (prefill included) of variants measured in this run.
Writes a table to stdout and JSON to bench/results/speculative.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from workdir import work_dir  # noqa: E402  (bench/ sits first on sys.path when run as a script)

RESULTS = ROOT / "bench" / "results"
WORK = work_dir("speculative")  # outlives a fresh clone: see bench/workdir.py


def draft_model_dir(name: str, target, tok, layers: int) -> Path:
    from leanlm.prune import drop_layers

    n = target.config.get_text_config(decoder=True).num_hidden_layers
    keep = sorted({round(i * (n - 1) / (layers - 1)) for i in range(layers)})
    out = WORK / f"{name}-draft-{len(keep)}L"
    if not (out / "config.json").is_file():
        small = drop_layers(target, keep)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        small.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.replace(out)
    return out


def hf_rows(target, tok, draft_dir: Path, prompts, max_new_tokens: int, k: int, reference: list[list[int]]):
    import torch
    from transformers import AutoModelForCausalLM

    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32).eval()
    variants = {"hf generate": {}, "hf assisted (draft model)": {"assistant_model": draft},
                "hf prompt lookup": {"prompt_lookup_num_tokens": k}}
    rows = []
    for name, extra in variants.items():
        new, secs, same = 0, 0.0, 0
        with torch.inference_mode():
            target.generate(prompts[0][None], max_new_tokens=4, do_sample=False, **extra)  # warm up
            for p, ref in zip(prompts, reference):
                t = time.perf_counter()
                out = target.generate(p[None], attention_mask=torch.ones_like(p[None]), max_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=tok.eos_token_id, **extra)
                secs += time.perf_counter() - t
                toks = out[0, p.numel():].tolist()
                new += len(toks)
                same += toks == ref
        rows.append({"variant": name, "e2e_tokens_per_s": new / secs, "identical_outputs": f"{same}/{len(prompts)}"})
        print(f"  {name}: {new / secs:.1f} tokens/s end to end, identical to plain greedy: {same}/{len(prompts)}",
              flush=True)
    return rows


def bench_model(name: str, args) -> dict:
    import torch

    import leanlm
    from leanlm.engine.text import encode_prompt
    from leanlm.speculative.api import compare
    from leanlm.speculative.train import prompts_from

    head = Path(args.eagle.replace("MODEL", name))
    if not (head / "config.json").is_file():
        print(f"training an EAGLE-3 head for {name} ({args.train_minutes} min of training) -> {head}", flush=True)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "leanlm.cli", "speculate", "train", name, "--out", str(head),
                        "--max-minutes", str(args.train_minutes), "--epochs", str(args.train_epochs),
                        "--num-prompts", str(args.train_prompts), "--corpus-tokens", str(args.train_corpus_tokens)]
                       + (["--chat"] if args.chat else []), check=True)
        print(f"EAGLE-3 head trained in {(time.perf_counter() - t) / 60:.1f} min, responses generated included",
              flush=True)
    target, tok = leanlm.load(name)
    prompts = [encode_prompt(tok, p, args.chat) for p in prompts_from("wiki", "eval", args.num_prompts)]
    draft_dir = draft_model_dir(name, target, tok, args.draft_layers)
    model_row = f"draft model ({draft_dir.name})"
    drafts = {"ngram": "ngram", "eagle3": str(head),
              f"eagle3 tree ({args.tree_tokens} tokens)": {"draft": str(head), "tree": True, "k": args.tree_tokens},
              model_row: str(draft_dir)}
    print(f"{name}: {len(prompts)} held-out prompts, {args.max_new_tokens} new tokens, k={args.k}", flush=True)
    reference: list[list[int]] = []

    def show(r):
        rates = " ".join(f"{x:.2f}" for x in r["acceptance_rates"])
        print(f"  {r['variant']}: {r['tokens_per_s']:.1f} tokens/s decode, {r['e2e_tokens_per_s']:.1f} end to end, "
              f"x{r['speedup']:.2f}, acceptance length {r['acceptance_length']:.2f} [{rates}]", flush=True)

    rows = compare(target, tok, drafts, prompts, max_new_tokens=args.max_new_tokens, k=args.k, progress=show,
                   outputs=reference)
    hf = hf_rows(target, tok, draft_dir, prompts, args.max_new_tokens, args.k, reference)
    by = {r["variant"]: r for r in rows + hf}
    summary = {
        "eagle3_acceptance_length": by["eagle3"]["acceptance_length"],
        "eagle3_speedup": by["eagle3"]["e2e_tokens_per_s"] / by["plain"]["e2e_tokens_per_s"],
        "eagle3_tree_speedup": by[list(drafts)[2]]["e2e_tokens_per_s"] / by["plain"]["e2e_tokens_per_s"],
        "draft_model_vs_hf_assisted": by[model_row]["e2e_tokens_per_s"] / by["hf assisted (draft model)"]["e2e_tokens_per_s"],
        "ngram_vs_hf_prompt_lookup": by["ngram"]["e2e_tokens_per_s"] / by["hf prompt lookup"]["e2e_tokens_per_s"],
        "plain_vs_hf_generate": by["plain"]["e2e_tokens_per_s"] / by["hf generate"]["e2e_tokens_per_s"],
    }
    head_info = json.loads((head / "config.json").read_text()).get("leanlm", {})
    return {"model": name, "chat": args.chat, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "k": args.k,
            "rows": rows + hf, "summary": summary, "eagle3_head": {"path": str(head), **head_info}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m")
    ap.add_argument("--eagle", default=str(WORK / "eagle3-MODEL"), help="EAGLE-3 head folder (MODEL is replaced)")
    ap.add_argument("--train-minutes", type=float, default=35.0, help="head training budget (responses excluded)")
    ap.add_argument("--train-prompts", type=int, default=640, help="prompts the target answers for head training")
    ap.add_argument("--train-epochs", type=float, default=6.0)
    ap.add_argument("--train-corpus-tokens", type=int, default=0,
                    help="head training also reads this many teacher-forced tokens of the wiki calibration text")
    ap.add_argument("--chat", action="store_true", help="wrap prompts (bench and head training) in the chat template")
    ap.add_argument("--num-prompts", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=4, help="chain draft length")
    ap.add_argument("--tree-tokens", type=int, default=8, help="draft tokens per tree")
    ap.add_argument("--draft-layers", type=int, default=8)
    ap.add_argument("--out", default=str(RESULTS / "speculative.json"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    results = [bench_model(m, args) for m in args.models.split(",")]
    print()
    print(f"{'model':<14} {'variant':<34} {'tok/s e2e':>9} {'speedup':>8} {'accept':>7}  identical")
    for res in results:
        plain = next(r for r in res["rows"] if r["variant"] == "plain")["e2e_tokens_per_s"]
        for r in res["rows"]:
            acc = f"{r['acceptance_length']:.2f}" if "acceptance_length" in r else ""
            same = r.get("identical_outputs", "all (asserted)")
            print(f"{res['model']:<14} {r['variant']:<34} {r['e2e_tokens_per_s']:>9.1f} "
                  f"{r['e2e_tokens_per_s'] / plain:>7.2f}x {acc:>7}  {same}")
        print(f"{res['model']:<14} " + ", ".join(f"{k} {v:.2f}" for k, v in res["summary"].items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    from entry import run_script  # bench/ is first on sys.path when run as a script

    run_script(main)
