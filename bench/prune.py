"""Pruning + distillation benchmark (Minitron-style) and sparsity, in one run.

    .venv/bin/python bench/prune.py                          # smollm2-135m, 70% of non-embedding parameters
    .venv/bin/python bench/prune.py --tokens 20000 --eval-tokens 4096 --variants depth   # quick look
    .venv/bin/python bench/prune.py --variants width --sparsity --ce-weight 0.5 --tokens 100000 \
        --out bench/results/prune_smollm2-135m_ce0.5.json     # distillation with the ordinary loss mixed in

For each variant (width: MLP neurons; depth: whole layers), at the same parameter target:
(a) the teacher, (b) pruned without training (neurons chosen by greedy OBS, down_proj refit by least
squares to the neurons and layers that stay, unless --no-reconstruct), (c) pruned + distilled from the
teacher (logit KD against the teacher's cached top-k, or its full logits live with --topk 0), (d)
the same smaller architecture from random initialization trained on the same tokens (next-token
loss). Then decode tokens/s of each architecture, measured back to back, and 2:4 / 50% sparsity by
magnitude, Wanda and SparseGPT (no training). Training text is the wiki calibration split;
perplexity is on wiki's evaluation split. Finished rows are kept in bench/results/prune_<model>.json
and a rerun with the same settings skips them.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from result_rows import ResultRows  # noqa: E402  (bench/ sits first on sys.path when run as a script)
from workdir import work_dir  # noqa: E402

RESULTS = ROOT / "bench" / "results"
WORK = work_dir("prune")  # outlives a fresh clone: see bench/workdir.py


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--params", default="70%", help="share of non-embedding parameters kept")
    p.add_argument("--variants", nargs="+", default=["width", "depth"], choices=["width", "depth"])
    p.add_argument("--tokens", type=int, default=150_000, help="training tokens per run (issue cap: 300k)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4, help="distillation learning rate")
    p.add_argument("--scratch-lr", type=float, default=1e-3, help="learning rate from random initialization")
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--ce-weight", type=float, default=0.0,
                   help="mix the ordinary next-token loss into distillation (0: logit KD only, as Minitron)")
    p.add_argument("--hidden-weight", type=float, default=0.0,
                   help="add the hidden-state loss at every layer (needs live teacher forwards: --topk 0)")
    p.add_argument("--layer-metric", choices=("block", "loss"), default="loss",
                   help="which layers depth pruning drops: least block importance, or least calibration loss increase")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--sparsity", nargs="*", default=["2:4", "0.5"])
    p.add_argument("--speed-tokens", type=int, default=128)
    p.add_argument("--out", default=None, help="results file (default bench/results/prune_<model>.json)")
    p.add_argument("--no-reconstruct", action="store_true", help="prune by activation importance alone, without the least-squares refit")
    p.add_argument("--train-embeddings", action="store_true", help="distillation also trains the tied embeddings")
    p.add_argument("--no-scratch", action="store_true", help="skip (d), training the pruned shape from scratch")
    p.add_argument("--fresh", action="store_true")
    args = p.parse_args()

    import torch

    import leanlm
    from leanlm.eval.perplexity import perplexity
    from leanlm.eval.speed import measure_speed
    from leanlm.prune import non_embedding_parameters, prune
    from leanlm.prune.sparsity import sparsify
    from leanlm.train import DistillConfig, TrainConfig, distill, train, trainable_parameters, training_sequences
    from leanlm.train.checkpoint import remove_checkpoint
    from leanlm.train.distill import ce_loss_fn

    out = Path(args.out) if args.out else RESULTS / f"prune_{args.model}.json"
    settings = {k: v for k, v in vars(args).items() if k not in ("fresh", "variants", "sparsity", "out", "no_scratch")}
    # Runs from before a flag existed had its then-default value (embeddings were trained).
    for flag, default in (("ce_weight", 0.0), ("hidden_weight", 0.0), ("layer_metric", "block"), ("train_embeddings", True)):
        if settings[flag] == default:
            settings.pop(flag)  # rows of runs from before the flag existed stay valid
    settings["reconstruct"] = not settings.pop("no_reconstruct")  # runs before the refit existed had none
    results = ResultRows(out, settings, ("variant", "method"), args.fresh, model=args.model)
    # Training checkpoints per settings: a killed run resumes, a run with other settings starts its own.
    run_key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    rows = results.rows

    teacher, tok = leanlm.load(args.model)
    cfg = TrainConfig(tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size, micro_batch=4,
                      lr=args.lr, checkpoint_every=10)
    data = training_sequences(tok, "wiki", cfg, model=teacher)
    calib = leanlm.calibration_batches(tok, "wiki", args.calib_samples, args.seq_len, seed=1, model=teacher)
    ev_ids, ev_bytes = leanlm.eval_tokens(tok, "wiki", args.eval_tokens)
    dcfg = DistillConfig(topk=args.topk, ce_weight=args.ce_weight, hidden_weight=args.hidden_weight, cache=str(WORK / f"{args.model}_teacher_top{args.topk}.safetensors"))
    WORK.mkdir(parents=True, exist_ok=True)

    def record(variant, method, model, seconds=0.0, extra=None):
        with torch.no_grad():
            r = perplexity(model, ev_ids, ev_bytes, progress=False)
        c = model.config
        row = {"variant": variant, "method": method, "perplexity": r["perplexity"],
               "bits_per_byte": r["bits_per_byte"], "seconds": round(seconds, 1),
               "non_embedding_params": non_embedding_parameters(model),
               "params": sum(p.numel() for p in model.parameters()),
               "shape": {"layers": c.num_hidden_layers, "hidden": c.hidden_size, "ffn": c.intermediate_size,
                         "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads}, **(extra or {})}
        results.add(row)
        print(f"{variant:<8} {method:<16} ppl {row['perplexity']:.3f}  ({row['seconds']:.0f}s)", flush=True)

    if not results.done("-", "teacher"):
        record("-", "teacher", teacher)
    pruned = {}
    for variant in args.variants:
        t = time.perf_counter()
        pruned[variant] = prune(teacher, calib, params=args.params, axis=variant,
                                 layer_metric=args.layer_metric, reconstruct=not args.no_reconstruct)
        prune_s = time.perf_counter() - t
        if not results.done(variant, "pruned"):
            record(variant, "pruned", pruned[variant], prune_s)
        if not results.done(variant, "pruned+distilled"):
            student = copy.deepcopy(pruned[variant])
            t = time.perf_counter()
            work = WORK / f"{args.model}_{variant}_distill_{run_key}"
            distill(student, teacher, data, cfg, dcfg, work=work, train_embeddings=args.train_embeddings)
            hist = [h["loss"] for h in student.leanlm_training["history"] if "loss" in h]
            record(variant, "pruned+distilled", student, prune_s + time.perf_counter() - t,
                   {"train_tokens": int(data.numel()), "first_loss": hist[0], "last_loss": hist[-1]})
            remove_checkpoint(work)
        if not args.no_scratch and not results.done(variant, "scratch"):
            torch.manual_seed(0)
            scratch = type(teacher)(copy.deepcopy(pruned[variant].config)).eval()
            scfg = copy.deepcopy(cfg)
            scfg.lr = args.scratch_lr
            t = time.perf_counter()
            work = WORK / f"{args.model}_{variant}_scratch_{run_key}"
            hist = train(scratch, trainable_parameters(scratch, train_embeddings=True), data, ce_loss_fn, scfg,
                         work, desc="from scratch")
            record(variant, "scratch", scratch, time.perf_counter() - t,
                   {"train_tokens": int(data.numel()), "first_loss": hist[0]["loss"], "last_loss": hist[-1]["loss"]})
            remove_checkpoint(work)

    for pattern in args.sparsity:
        for method in ("magnitude", "wanda", "sparsegpt"):
            key = (f"sparse {pattern}", method)
            if results.done(*key):
                continue
            m = copy.deepcopy(teacher)
            t = time.perf_counter()
            sparsify(m, method, pattern if pattern == "2:4" else float(pattern), calib=calib)
            record(*key, m, time.perf_counter() - t)

    # Decode speed of each architecture, back to back (nothing else running).
    speeds = {"-": measure_speed(teacher, new_tokens=args.speed_tokens, repeats=3)["decode_tokens_per_s"]}
    for variant in args.variants:
        speeds[variant] = measure_speed(pruned[variant], new_tokens=args.speed_tokens, repeats=3)["decode_tokens_per_s"]
    for r in rows:
        if r["variant"] in speeds:
            r["decode_tokens_per_s"] = speeds[r["variant"]]
    results.save()

    t_row = next(r for r in rows if r["method"] == "teacher")
    base_speed = speeds["-"]
    print(f"\n{args.model}: {args.params} of non-embedding parameters; {data.numel()} training tokens (wiki calib); "
          f"{args.eval_tokens} eval tokens\n")
    print("| variant | model | shape (layers/hidden/ffn/heads) | non-emb params | perplexity | x teacher | "
          "decode tok/s | speedup | param reduction | time (s) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        s = r["shape"]
        sp = r.get("decode_tokens_per_s")
        red = t_row["non_embedding_params"] / r["non_embedding_params"]
        print(f"| {r['variant']} | {r['method']} | {s['layers']}/{s['hidden']}/{s['ffn']}/{s['heads']} | "
              f"{r['non_embedding_params'] / 1e6:.1f}M | {r['perplexity']:.2f} | {r['perplexity'] / t_row['perplexity']:.2f} | "
              f"{'' if sp is None else f'{sp:.1f}'} | {'' if sp is None else f'{sp / base_speed:.2f}x'} | "
              f"{red:.2f}x | {r['seconds']:.0f} |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    from entry import run_script  # bench/ is first on sys.path when run as a script

    run_script(main)
