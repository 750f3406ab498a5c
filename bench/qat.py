"""QAT / QAD benchmark: float, PTQ, QAT and QAD perplexity at the same training budget, in one run.

    .venv/bin/python bench/qat.py --ce-weight 0.5 --float-ft        # smollm2-135m, nvfp4 and w4a16_rtn_g64
    .venv/bin/python bench/qat.py --tokens 20000 --eval-tokens 4096 --recipes w4a16_rtn_g64   # quick look
    .venv/bin/python bench/qat.py --data news --tokens 57344 --lr 3e-4 \
        --out bench/results/qat_smollm2-135m_news_lr3e-4.json     # out-of-domain training text
    .venv/bin/python bench/qat.py --sft-first --out bench/results/qat_smollm2-135m_sft.json
    .venv/bin/python bench/qat.py --data generated --recipes nvfp4 --tokens 200000 --lr 3e-4 \
        --out bench/results/qat_smollm2-135m_generated_200k_lr3e-4.json   # text the model writes itself
    .venv/bin/python bench/qat.py --sft-first --batch-size 2 --micro-batch 2 \
        --out bench/results/qat_smollm2-135m_sft_b2.json          # more, smaller steps (same tokens)
    .venv/bin/python bench/qat.py --sft-first --batch-size 2 --micro-batch 2 --topk 0 \
        --out bench/results/qat_smollm2-135m_sft_b2_live.json     # QAD against the live teacher's full logits
    .venv/bin/python bench/qat.py --data generated --recipes nvfp4 --methods qad --tokens 200000 --lr 3e-4 \
        --topk 0 --hidden-weight 1 --out bench/results/qat_smollm2-135m_generated_200k_lr3e-4_hidden.json

Training text is the wiki calibration split (disjoint from the evaluation split), or with `--data
generated` text the float model samples itself from 8-token wiki prompts (no domain adaptation:
`--float-ft` then checks the float model stays where it was); QAT and QAD see the same sequences in
the same order. QAD reads the float teacher's top-k log-probs from a cache built
once (its build time is reported and counted in QAD's time), or with `--topk 0` runs the teacher
alongside and matches its full distribution. Training on wiki text lowers wiki
perplexity by itself (domain adaptation): `--float-ft` fine-tunes the float model on the same tokens,
and the table's last column measures recovery against that instead of the untouched float model.
`--sft-first` is Model Optimizer's workflow: that fine-tuned float model is the baseline, the QAD
teacher, and what PTQ, QAT and QAD start from (its published Llama-3-8B figures are measured so);
`--sft-lr` and `--sft-batch-size` set that fine-tune apart from QAT's and QAD's `--lr` and `--batch-size`.
Finished rows are kept in
bench/results/qat_<model>.json as they complete, and a rerun with the same settings skips them;
training runs checkpoint under the bench work folder (`qat/`, see bench/workdir.py) and resume
if killed.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leanlm.atomic import atomic_write_text  # noqa: E402
from result_rows import ResultRows  # noqa: E402  (bench/ sits first on sys.path when run as a script)
from workdir import work_dir  # noqa: E402

RESULTS = ROOT / "bench" / "results"
WORK = work_dir("qat")  # outlives a fresh clone: see bench/workdir.py


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipes", nargs="+", default=["w4a16_rtn_g64", "nvfp4"])
    p.add_argument("--tokens", type=int, default=100_000, help="training tokens per run (issue cap: 300k)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--learn-scales", action="store_true")
    p.add_argument("--no-scale-grad", action="store_true",
                   help="plain straight-through gradients (dynamic activation scales constant in the backward)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--topk", type=int, default=64, help="teacher top-k cache for QAD (0: live teacher)")
    p.add_argument("--ce-weight", type=float, default=0.0)
    p.add_argument("--hidden-weight", type=float, default=0.0,
                   help="QAD also matches the teacher's hidden states (needs --topk 0: a live teacher)")
    p.add_argument("--hidden-layers", default="all", choices=["all", "final"],
                   help="which hidden states --hidden-weight matches: every layer's output, or the final one")
    p.add_argument("--data", default="wiki", help="training text (calibration split); evaluation is always wiki's eval split")
    p.add_argument("--float-ft", action="store_true",
                   help="also fine-tune the float model on the same tokens (how much is domain adaptation)")
    p.add_argument("--sft-first", action="store_true",
                   help="Model Optimizer's QAT/QAD workflow: fine-tune the float model on the training text first; "
                        "it is the float baseline, the teacher, and what PTQ, QAT and QAD start from")
    p.add_argument("--sft-lr", type=float, default=1e-4,
                   help="learning rate of the --sft-first / --float-ft fine-tune (--lr is QAT's and QAD's)")
    p.add_argument("--sft-batch-size", type=int, default=8, help="batch size of that fine-tune")
    p.add_argument("--methods", nargs="+", default=["qat", "qad"], choices=["qat", "qad"])
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--out", default=None, help="results file (default bench/results/qat_<model>.json)")
    p.add_argument("--fresh", action="store_true", help="ignore finished rows of an earlier run")
    args = p.parse_args()

    import torch

    import leanlm
    from leanlm.eval.perplexity import perplexity
    from leanlm.train import DistillConfig, TrainConfig, qad, qat, training_sequences

    torch.manual_seed(0)
    out = Path(args.out) if args.out else RESULTS / f"qat_{args.model}.json"
    settings = {k: v for k, v in vars(args).items()
                if k not in ("fresh", "recipes", "methods", "float_ft", "out", "no_scale_grad")}
    settings["scale_grad"] = not args.no_scale_grad  # rows from before the option ran without: they rerun
    for flag, default in (("sft_first", False), ("hidden_weight", 0.0), ("hidden_layers", "all")):
        if settings[flag] == default:
            settings.pop(flag)  # rows of runs from before the flag existed stay valid
    for own, flag in (("lr", "sft_lr"), ("batch_size", "sft_batch_size")):
        if getattr(args, own) == getattr(args, flag):
            settings.pop(flag)  # the same: rows of runs from before the flag existed stay valid

    base, tok = leanlm.load(args.model)
    cfg = TrainConfig(tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                      micro_batch=args.micro_batch, lr=args.lr, checkpoint_every=10)
    # Text sampled from the model (--data generated) is kept; its file says which model and settings wrote it.
    data = training_sequences(tok, args.data, cfg, model=base,
                              cache=WORK / f"{args.model}_{args.data.replace(':', '_')}_text.safetensors")
    ev_ids, ev_bytes = leanlm.eval_tokens(tok, "wiki", args.eval_tokens)
    results = ResultRows(out, settings, ("recipe", "method"), args.fresh, model=args.model, train_config=asdict(cfg))
    rows = results.rows
    dcfg = DistillConfig(temperature=args.temperature, topk=args.topk, ce_weight=args.ce_weight,
                         hidden_weight=args.hidden_weight, hidden_layers=args.hidden_layers,
                         cache=str(WORK / f"{args.model}{'_sft' if args.sft_first else ''}_teacher_top{args.topk}.safetensors")
                         if args.topk else None)

    def record(recipe, method, model, seconds, extra=None):
        with torch.no_grad():
            r = perplexity(model, ev_ids, ev_bytes, progress=False)
        row = {"recipe": recipe, "method": method, "perplexity": r["perplexity"], "bits_per_byte": r["bits_per_byte"],
               "seconds": round(seconds, 1), "train_tokens": 0 if method in ("float", "ptq") else int(data.numel()),
               **(extra or {})}
        results.add(row)
        print(f"{recipe:<16} {method:<6} ppl {row['perplexity']:.3f}  ({row['seconds']:.0f}s)", flush=True)

    if not results.done("-", "float"):
        record("-", "float", base, 0.0)
    # The fine-tuned model is kept for --sft-first reruns, named by everything that shaped it.
    sft_cfg = replace(cfg, lr=args.sft_lr, batch_size=args.sft_batch_size)
    sft_key = hashlib.sha256(json.dumps([args.model, args.data, asdict(sft_cfg)], sort_keys=True).encode()).hexdigest()[:12]
    sft_dir = WORK / f"{args.model}_sft_{sft_key}"
    sft_record = sft_dir / "leanlm_sft.json"  # its training time and steps, for the float_ft row of a rerun
    if args.sft_first or (args.float_ft and not results.done("-", "float_ft")):
        if args.sft_first and sft_record.is_file():
            ft, kept = leanlm.load(sft_dir)[0], json.loads(sft_record.read_text())
        else:
            from leanlm.train import train, trainable_parameters
            from leanlm.train.distill import ce_loss_fn

            ft = copy.deepcopy(base)
            t = time.perf_counter()
            hist = train(ft, trainable_parameters(ft), data, ce_loss_fn, sft_cfg, desc="float fine-tune")
            kept = {"seconds": round(time.perf_counter() - t, 1), "steps": hist[-1]["step"]}
            if args.sft_first:
                leanlm.save(ft, tok, sft_dir, overwrite=True)
                atomic_write_text(sft_record, json.dumps(kept))
        if not results.done("-", "float_ft"):
            record("-", "float_ft", ft, kept["seconds"], {"steps": kept["steps"]})
        if args.sft_first:  # everything below starts from the fine-tuned float model, and it is the teacher
            base = ft
    for recipe in args.recipes:
        if not results.done(recipe, "ptq"):
            m = copy.deepcopy(base)
            t = time.perf_counter()
            leanlm.quantize(m, recipe, calib=data[:64], progress=False)
            record(recipe, "ptq", m, time.perf_counter() - t)
        for method in args.methods:
            if results.done(recipe, method):
                continue
            m = copy.deepcopy(base)
            work = WORK / f"{args.model}_{recipe}_{method}"
            t = time.perf_counter()
            if method == "qat":
                qat(m, recipe, data, config=cfg, learn_scales=args.learn_scales, work=work,
                    scale_grad=not args.no_scale_grad)
            else:
                qad(m, copy.deepcopy(base), recipe, data, config=cfg, distill=dcfg, learn_scales=args.learn_scales,
                    work=work, scale_grad=not args.no_scale_grad)
            hist = [h["loss"] for h in m.leanlm_training["history"] if "loss" in h]
            record(recipe, method, m, time.perf_counter() - t,
                   {"steps": m.leanlm_training["trained_steps"], "first_loss": hist[0], "last_loss": hist[-1]})
            from leanlm.train.checkpoint import remove_checkpoint

            remove_checkpoint(work)

    float_ppl = next(r["perplexity"] for r in rows if r["method"] == "float")
    ft_ppl = next((r["perplexity"] for r in rows if r["method"] == "float_ft"), None)
    print(f"\n{args.model}: {len(data)} x {args.seq_len} = {data.numel()} training tokens ({args.data}), lr {args.lr}, "
          f"fine-tune lr {args.sft_lr}, batch {args.batch_size} (fine-tune {args.sft_batch_size}), "
          f"{args.eval_tokens} eval tokens (wiki eval split)\n")
    print("| recipe | method | perplexity | gap to float | gap recovered | recovered vs float fine-tuned | time (s) |")
    print("|---|---|---:|---:|---:|---:|---:|")

    def recovered(ptq, ppl, ref):
        return "" if ptq is None or ref is None else f"{100 * (ptq - ppl) / (ptq - ref):.0f}%"

    for r in rows:
        ptq = next((x["perplexity"] for x in rows if x["recipe"] == r["recipe"] and x["method"] == "ptq"), None)
        trained = r["method"] in ("qat", "qad")
        print(f"| {r['recipe']} | {r['method']} | {r['perplexity']:.3f} | {r['perplexity'] - float_ppl:+.3f} | "
              f"{recovered(ptq, r['perplexity'], float_ppl) if trained else ''} | "
              f"{recovered(ptq, r['perplexity'], ft_ppl) if trained else ''} | {r['seconds']:.0f} |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    from entry import run_script  # bench/ is first on sys.path when run as a script

    run_script(main)
