"""The `leanlm` command: a thin layer over the public API."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .errors import LeanLMError


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} must be at least 1")
    return n


def cmd_models(args) -> None:
    from .models import list_models

    for m in list_models():
        state = "converted" if m["converted"] else ("installed" if m["installed"] else "missing package")
        print(f"{m['name']:<14} {state:<16} {m['description']} [{m['license']}]")


def cmd_prepare(args) -> None:
    from .models import prepare

    for name in args.names:
        t = time.perf_counter()
        path = prepare(name)
        print(f"{name}: {path} ({time.perf_counter() - t:.1f}s)")


def cmd_convert(args) -> None:
    from .models import convert_gguf

    out = convert_gguf(args.gguf, args.out, overwrite=args.overwrite)
    print(f"converted {args.gguf} -> {out}")


def _write_json(path: str, data) -> None:
    from .atomic import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def cmd_eval(args) -> None:
    from .eval import evaluate
    from .eval.report import format_table
    from .data import documents
    from .models import load

    documents(args.data)  # a bad data source fails before the model loads
    model, tok = load(args.model, trust_remote_code=args.trust_remote_code)
    result = evaluate(model, tok, data=args.data, max_tokens=args.max_tokens, window=args.window,
                      stride=args.stride, speed=args.speed, name=args.name or str(args.model))
    print(format_table([result]))
    if args.json:
        _write_json(args.json, result)
        print(f"wrote {args.json}")


def cmd_quantize(args) -> None:
    from .data import documents
    from .eval import evaluate
    from .eval.report import format_table
    from .models import load, save
    from .quant.api import quantize
    from .quant.recipes import get_recipe

    recipe = get_recipe(args.recipe)  # fail on a bad recipe or data before loading anything
    if recipe.needs_data and not args.calib:
        raise LeanLMError(f"recipe '{recipe.name}' calibrates on data: pass --calib wiki (or news, pydoc, a file)")
    for source in filter(None, (args.calib, args.eval_tokens and args.eval_data)):
        documents(source)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise LeanLMError(f"output '{out}' already exists: choose another --out or pass --overwrite")
    if args.streaming:
        seconds = _quantize_streaming(args, recipe, out)
        model, tok = load(out) if args.eval_tokens else (None, None)
    else:
        model, tok = load(args.model, trust_remote_code=args.trust_remote_code)
        calib = _calib(args, tok, model) if args.calib else None
        t = time.perf_counter()
        quantize(model, recipe, calib=calib)
        seconds = time.perf_counter() - t
        save(model, tok, out, overwrite=args.overwrite)
    print(f"quantized {args.model} with {recipe.name}{' (streaming)' if args.streaming else ''} in {seconds:.1f}s "
          f"-> {out}")
    if args.eval_tokens:
        result = evaluate(model, tok, data=args.eval_data, max_tokens=args.eval_tokens, name=recipe.name)
        result["calibration_seconds"] = seconds
        print(format_table([result]))
        _write_json(str(out / "eval.json"), result)


def _quantize_streaming(args, recipe, out: Path) -> float:
    """`quantize --streaming`: one decoder layer in memory at a time, resumable from OUT.work."""
    from transformers import AutoConfig, AutoTokenizer

    from .models import resolve
    from .quant.streaming import quantize_streaming

    path = resolve(args.model)
    calib = None
    if args.calib:  # the float model is never loaded: its config bounds the sequence length
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
        calib = _calib(args, tok, AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code))
    t = time.perf_counter()
    quantize_streaming(path, recipe, calib, out, work=args.work, overwrite=args.overwrite,
                       trust_remote_code=args.trust_remote_code)
    return time.perf_counter() - t


def cmd_recipes(args) -> None:
    import yaml

    from .quant.recipes import PRESETS, get_recipe

    if args.name:  # the full recipe, as YAML a user can copy and edit
        print(yaml.safe_dump(get_recipe(args.name).to_dict(), sort_keys=False), end="")
        return
    for r in PRESETS.values():
        if "_kv_" not in r.name:
            print(f"{r.name:<16} {'+'.join(r.algorithm):<12} {r.description}")
    print("\nEvery preset also comes as NAME_kv_fp8 and NAME_kv_nvfp4 (quantized KV cache).")
    print("`leanlm recipes NAME` prints a preset as YAML to start a custom recipe from.")


def cmd_compare(args) -> None:
    from .eval.report import format_table, load_results, write_report

    try:
        results = load_results(args.results)
    except ValueError as e:
        raise LeanLMError(str(e)) from None
    print(format_table(results))
    if args.out:
        paths = write_report(results, args.out)
        print(f"report: {paths['html']}")


def cmd_generate(args) -> None:
    import torch

    from .engine import generate
    from .eval.bandwidth import measure_read_bandwidth, weight_bytes_per_token
    from .models import load

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model, tok = load(args.model, dtype=dtype, trust_remote_code=args.trust_remote_code)
    model = model.to(dtype)  # a float folder saved in another dtype
    _, gen = generate(model, tok, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_p=args.top_p, seed=args.seed, chat=args.chat, compile=not args.no_compile,
                      stream=lambda s: print(s, end="", flush=True), draft=args.draft, draft_tokens=args.draft_tokens,
                      tree=args.tree)
    print()
    stats = (f"{len(gen.tokens)} tokens ({gen.stopped_by}); time to first token {gen.ttft_s * 1e3:.0f} ms; "
             f"decode {gen.decode_tokens_per_s:.1f} tokens/s")
    if args.draft:
        stats += f"; {gen.acceptance_length:.2f} tokens per target step"
    if gen.compile_s:
        stats += f"; compiled in {gen.compile_s:.1f}s (cached for later runs)"
    if args.stats:
        bound = measure_read_bandwidth() / weight_bytes_per_token(model)
        stats += f"; bandwidth bound {bound:.0f} tokens/s ({100 * gen.decode_tokens_per_s / bound:.0f}% of it)"
    print(stats, file=sys.stderr)


def cmd_export(args) -> None:
    from .export import export

    options = {"qtype": args.qtype} if args.qtype else {}
    if args.qtype and args.format != "gguf":
        raise LeanLMError(f"--qtype applies to --format gguf only (got --format {args.format}): drop --qtype")
    out = export(args.model, args.format, args.out, overwrite=args.overwrite,
                 trust_remote_code=args.trust_remote_code, **options)
    manifest = json.loads((out / "leanlm_export.json").read_text())
    size = sum(f["bytes"] for f in manifest["files"].values())
    print(f"exported {args.format} to {out} ({size / 2**20:.1f} MiB, validated: "
          f"{json.dumps(manifest['validation'], default=str)})")


def cmd_speculate_train(args) -> None:
    from .models import load
    from .speculative import Eagle3TrainConfig, train_eagle3

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise LeanLMError(f"output '{out}' already exists: choose another --out or pass --overwrite")
    from .data import CORPORA, documents

    if args.prompts not in CORPORA:
        documents(args.prompts)  # a bad prompts file fails before the model loads
    cfg = Eagle3TrainConfig(prompts=args.prompts, num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
                            chat=args.chat, draft_vocab=args.draft_vocab, corpus_tokens=args.corpus_tokens,
                            train_lm_head=args.train_lm_head, ttt_steps=args.ttt_steps,
                            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, bf16=not args.no_bf16,
                            max_minutes=args.max_minutes, seed=args.seed)
    model, tok = load(args.model, trust_remote_code=args.trust_remote_code)
    t = time.perf_counter()
    head = train_eagle3(model, tok, out, cfg, overwrite=args.overwrite)
    acc = ", ".join(f"{a:.2f}" for a in head.config.extra.get("val_step_accuracy", []))
    print(f"trained an EAGLE-3 head for {args.model} in {time.perf_counter() - t:.0f}s -> {out}"
          f" (held-out top-1 accuracy per draft step: {acc})")


def cmd_train_quantized(args) -> None:
    """`leanlm qat` and `leanlm qad`."""
    from .data import documents
    from .models import load
    from .quant.recipes import get_recipe
    from .train import qad, qat, training_sequences
    from .train.generated import prompt_source

    recipe = get_recipe(args.recipe)
    out = _check_out(args)
    for source in filter(None, (prompt_source(args.data) or args.data, args.calib, args.eval_tokens and args.eval_data)):
        documents(source)
    cfg = _train_config(args)
    distill = _distill_config(args) if args.command == "qad" else None
    model, tok = load(args.model, trust_remote_code=args.trust_remote_code)
    work = out.with_name(out.name + ".work")
    data = training_sequences(tok, args.data, cfg, model=model, cache=work / "generated.safetensors")
    calib = _calib(args, tok, model) if args.calib else None
    kw = dict(calib=calib, config=cfg, learn_scales=args.learn_scales, scale_grad=not args.no_scale_grad, work=work,
              eval_data=_held_out(args, tok))
    t = time.perf_counter()
    if args.command == "qat":
        qat(model, recipe, data, **kw)
    else:
        teacher, _ = load(args.teacher or args.model, trust_remote_code=args.trust_remote_code)
        qad(model, teacher, recipe, data, distill=distill, **kw)
        del teacher
    _finish_training(args, model, tok, out, work, f"{args.command.upper()} of {args.model} with {recipe.name}", t,
                     f"{recipe.name}-{args.command}")


def _train_config(args):
    from .train import TrainConfig

    return TrainConfig(tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                       micro_batch=args.micro_batch, epochs=args.epochs, lr=args.lr, bf16=not args.no_bf16,
                       checkpoint_every=args.checkpoint_every, max_minutes=args.max_minutes, seed=args.seed,
                       eval_every=args.eval_every, fsdp=args.fsdp)


def _held_out(args, tok):
    """Held-out sequences for evaluation during training (from the evaluation split), or None."""
    if not args.eval_every:
        return None
    from .data import eval_tokens

    ids, _ = eval_tokens(tok, args.eval_data, 16 * args.seq_len)
    return ids.reshape(16, args.seq_len)


def _distill_config(args):
    from .train import DistillConfig

    return DistillConfig(temperature=args.temperature, ce_weight=args.ce_weight, hidden_weight=args.hidden_weight,
                         hidden_layers=args.hidden_layers, topk=args.topk)


def _check_out(args) -> Path:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise LeanLMError(f"output '{out}' already exists: choose another --out or pass --overwrite")
    return out


def _finish_training(args, model, tok, out: Path, work: Path, what: str, started: float, name: str) -> None:
    """Save a trained model (main process only), drop its checkpoint, optionally evaluate it."""
    import torch

    from .eval import evaluate
    from .eval.report import format_table
    from .models import save
    from .train import distributed as dist
    from .train.checkpoint import remove_checkpoint

    if not dist.is_main():
        return
    info = model.leanlm_training
    save(model, tok, out, overwrite=args.overwrite)
    remove_checkpoint(work)  # done; caches (teacher top-k, generated text) stay for further runs
    print(f"{what}: {info['trained_steps']}/{info['planned_steps']} steps of {args.batch_size} x {args.seq_len} "
          f"tokens, {time.perf_counter() - started:.0f}s -> {out}")
    if args.eval_tokens:
        with torch.no_grad():
            result = evaluate(model, tok, data=args.eval_data, max_tokens=args.eval_tokens, name=name)
        print(format_table([result]))
        _write_json(str(out / "eval.json"), result)


def _calib(args, tok, model):
    from .data import calibration_batches

    return calibration_batches(tok, args.calib, args.calib_samples, args.seq_len, model=model)


def cmd_prune(args) -> None:
    from .data import documents
    from .models import load, save
    from .prune import non_embedding_parameters, prune

    out = _check_out(args)
    if not (args.params or any((args.heads, args.kv_heads, args.ffn, args.hidden, args.layers))):
        raise LeanLMError("nothing to prune: pass --params 70% or a shape (--heads, --kv-heads, --ffn, --hidden, --layers)")
    documents(args.calib)
    model, tok = load(args.model, trust_remote_code=args.trust_remote_code)
    t = time.perf_counter()
    small = prune(model, _calib(args, tok, model), params=args.params, axis=args.axis, heads=args.heads,
                  kv_heads=args.kv_heads, ffn=args.ffn, hidden=args.hidden, layers=args.layers,
                  layer_metric=args.layer_metric, reconstruct=not args.no_reconstruct)
    save(small, tok, out, overwrite=args.overwrite)
    before, after = non_embedding_parameters(model), non_embedding_parameters(small)
    c = small.config
    print(f"pruned {args.model} in {time.perf_counter() - t:.0f}s -> {out}: {c.num_hidden_layers} layers, hidden "
          f"{c.hidden_size}, ffn {c.intermediate_size}, {c.num_attention_heads} heads / {c.num_key_value_heads} KV; "
          f"non-embedding parameters {before / 1e6:.1f}M -> {after / 1e6:.1f}M ({after / before:.0%})")


def cmd_sparsify(args) -> None:
    from .data import documents
    from .models import load, save
    from .prune.sparsity import parse_pattern, sparsify, sparsity_report

    out = _check_out(args)
    parse_pattern(args.sparsity)
    if args.method != "magnitude":
        documents(args.calib)
    model, tok = load(args.model, trust_remote_code=args.trust_remote_code)
    calib = None if args.method == "magnitude" else _calib(args, tok, model)
    t = time.perf_counter()
    sparsify(model, args.method, args.sparsity, calib)
    save(model, tok, out, overwrite=args.overwrite)
    print(f"{args.method} {args.sparsity} sparsity on {args.model} in {time.perf_counter() - t:.0f}s -> {out} "
          f"({sparsity_report(model)['zero_fraction']:.1%} of the decoder's linear weights are zero)")


def cmd_distill(args) -> None:
    from .data import documents
    from .models import load
    from .train import distill, training_sequences
    from .train.generated import prompt_source

    out = _check_out(args)
    documents(prompt_source(args.data) or args.data)
    cfg, dcfg = _train_config(args), _distill_config(args)
    student, tok = load(args.model, trust_remote_code=args.trust_remote_code)
    teacher, _ = load(args.teacher, trust_remote_code=args.trust_remote_code)
    work = out.with_name(out.name + ".work")
    data = training_sequences(tok, args.data, cfg, model=teacher, cache=work / "generated.safetensors")
    t = time.perf_counter()
    distill(student, teacher, data, cfg, dcfg, work, eval_data=_held_out(args, tok), train_embeddings=args.train_embeddings)
    _finish_training(args, student, tok, out, work, f"distilled {args.model} from {args.teacher}", t, "distilled")


def cmd_speculate_bench(args) -> None:
    from .engine.text import encode_prompt
    from .models import load
    from .speculative.api import compare
    from .speculative.train import prompts_from

    texts = prompts_from(args.prompts, "eval", args.num_prompts)
    model, tok = load(args.model, trust_remote_code=args.trust_remote_code)
    prompts = [encode_prompt(tok, p, args.chat) for p in texts]
    drafts = {(d if d == "ngram" else Path(d).name or d) + (" tree" if args.tree else ""):
              {"draft": d, "tree": args.tree} for d in args.draft}
    print(f"{'variant':<24} {'tokens/s':>9} {'speedup':>8} {'accept len':>10}  per-position acceptance")

    def show(r):
        rates = " ".join(f"{x:.2f}" for x in r["acceptance_rates"])
        print(f"{r['variant']:<24} {r['tokens_per_s']:>9.1f} {r['speedup']:>7.2f}x {r['acceptance_length']:>10.2f}  {rates}",
              flush=True)

    rows = compare(model, tok, drafts, prompts, max_new_tokens=args.max_new_tokens, k=args.draft_tokens,
                   compile=not args.no_compile, progress=show)
    print("every speculative output was identical to plain greedy decoding")
    if args.json:
        _write_json(args.json, {"model": args.model, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
                                "k": args.draft_tokens, "rows": rows})


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(model=args.model, data=args.data, max_tokens=args.max_tokens, speed=not args.no_speed, out=args.out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="leanlm", description="Make language models cheaper and faster to serve.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_args(sp):
        sp.add_argument("model", help="built-in name (smollm2-135m, gemma3-270m) or a local HF model folder")
        sp.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own Python code")

    s = sub.add_parser("models", help="list built-in models")
    s.set_defaults(fn=cmd_models)

    s = sub.add_parser("prepare", help="convert built-in models to float safetensors once (cached)")
    s.add_argument("names", nargs="+")
    s.set_defaults(fn=cmd_prepare)

    s = sub.add_parser("convert", help="convert a GGUF file to a float safetensors HF folder")
    s.add_argument("gguf")
    s.add_argument("out")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("eval", help="perplexity, size and (with --speed) speed of a model")
    model_args(s)
    s.add_argument("--data", default="wiki", help="wiki, news, pydoc, or a .txt/.jsonl file (default wiki)")
    s.add_argument("--max-tokens", type=_positive, default=8192, help="evaluation tokens (default 8192)")
    s.add_argument("--window", type=_positive, default=None,
                   help="tokens per window (default 512, or the model's context if shorter)")
    s.add_argument("--stride", type=_positive, default=None, help="window stride (default: the window)")
    s.add_argument("--speed", action="store_true", help="also measure prefill/decode tokens/s and peak RSS")
    s.add_argument("--name", help="label for the result")
    s.add_argument("--json", help="write the result as JSON to this file")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("quantize", help="quantize a model with a recipe and save it")
    model_args(s)
    s.add_argument("--recipe", required=True, help="preset name (see `leanlm recipes`) or a YAML/JSON file")
    s.add_argument("--out", required=True)
    s.add_argument("--calib", default=None, help="calibration data: wiki, news, pydoc or a file")
    s.add_argument("--calib-samples", type=_positive, default=128)
    s.add_argument("--seq-len", type=_positive, default=512)
    s.add_argument("--eval-tokens", type=int, default=0, help="evaluate after quantizing (writes OUT/eval.json)")
    s.add_argument("--eval-data", default="wiki")
    s.add_argument("--streaming", action="store_true",
                   help="load, calibrate and write one decoder layer at a time (models larger than memory; resumable)")
    s.add_argument("--work", default=None, help="--streaming work folder (default OUT.work; a killed run resumes there)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=cmd_quantize)

    s = sub.add_parser("recipes", help="list quantization recipe presets, or print one as YAML")
    s.add_argument("name", nargs="?", help="a preset to print in full")
    s.set_defaults(fn=cmd_recipes)

    s = sub.add_parser("compare", help="tabulate result JSON files and write a report")
    s.add_argument("results", nargs="+")
    s.add_argument("--out", help="folder for report.json/.md/.html")
    s.set_defaults(fn=cmd_compare)

    s = sub.add_parser("generate", help="stream a continuation of a prompt from any model, float or quantized")
    model_args(s)
    s.add_argument("prompt")
    s.add_argument("--max-new-tokens", type=_positive, default=128)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    s.add_argument("--dtype", choices=["float32", "bf16"], default="float32",
                   help="activation/float-weight dtype (bf16 halves the bytes read per token)")
    s.add_argument("--no-compile", action="store_true", help="decode eagerly (no torch.compile)")
    s.add_argument("--stats", action="store_true", help="also measure read bandwidth and print the bound")
    s.add_argument("--draft", default=None,
                   help="speculative decoding: 'ngram', an EAGLE-3 head folder, or a draft model with the same tokenizer")
    s.add_argument("--draft-tokens", type=_positive, default=4, help="tokens drafted per target step (default 4)")
    s.add_argument("--tree", action="store_true", help="draft a tree of --draft-tokens tokens (greedy; ngram, EAGLE-3)")
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("export", help="export a model (quantized or float) for serving runtimes, validated")
    model_args(s)
    s.add_argument("--format", required=True, choices=["compressed-tensors", "modelopt", "gguf"],
                   help="compressed-tensors (vLLM, transformers), modelopt (TensorRT-LLM, vLLM), gguf (llama.cpp)")
    s.add_argument("--out", required=True, help="output folder (written atomically)")
    s.add_argument("--qtype", default=None, help="gguf tensor type: Q8_0, Q4_0, F16, F32 (default from the model)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=cmd_export)

    def training_args(s, lr: float):
        s.add_argument("--data", default="wiki",
                       help="training text: wiki, news, pydoc (calibration split), a file, or generated[:SOURCE] "
                            "(sampled from the float model, prompted by a few tokens of SOURCE, default wiki)")
        s.add_argument("--tokens", type=_positive, default=100_000, help="training tokens (default 100000)")
        s.add_argument("--seq-len", type=_positive, default=256)
        s.add_argument("--batch-size", type=_positive, default=8, help="sequences per step, all processes together")
        s.add_argument("--micro-batch", type=_positive, default=4, help="sequences per forward (gradient accumulation)")
        s.add_argument("--epochs", type=_positive, default=1)
        s.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
        s.add_argument("--no-bf16", action="store_true", help="train in float32 (default: bf16 autocast where the hardware computes bf16 natively)")
        s.add_argument("--checkpoint-every", type=_positive, default=25, help="steps between checkpoints")
        s.add_argument("--max-minutes", type=float, default=None, help="stop early (checkpointed) after this long")
        s.add_argument("--fsdp", action="store_true",
                       help="under torchrun / accelerate launch: shard weights, gradients and optimizer state over "
                            "the processes (FSDP) instead of a full copy on each; checkpoints are sharded too")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--eval-every", type=int, default=0,
                       help="steps between held-out loss evaluations during training (16 sequences of --eval-data)")
        s.add_argument("--eval-tokens", type=int, default=0, help="evaluate afterwards (writes OUT/eval.json)")
        s.add_argument("--eval-data", default="wiki")
        s.add_argument("--overwrite", action="store_true")

    def distill_args(s):
        s.add_argument("--temperature", type=float, default=1.0)
        s.add_argument("--ce-weight", type=float, default=0.0, help="weight of the next-token loss mixed in")
        s.add_argument("--hidden-weight", type=float, default=0.0, help="weight of the hidden-state loss")
        s.add_argument("--hidden-layers", choices=("all", "final"), default="all",
                       help="hidden-state loss on every layer (against the teacher layer it was pruned from) "
                            "or on the final outputs only")
        s.add_argument("--topk", type=int, default=0,
                       help="cache the teacher's top-k log-probs once instead of running it every step")

    for name, help_ in (("qat", "quantization-aware training: PTQ, then fine-tune fake-quantized (resumable)"),
                        ("qad", "quantization-aware distillation from the float model (resumable)")):
        s = sub.add_parser(name, help=help_)
        model_args(s)
        s.add_argument("--recipe", required=True, help="preset name (see `leanlm recipes`) or a YAML/JSON file")
        s.add_argument("--out", required=True, help="output folder (like `leanlm quantize`); checkpoints go to OUT.work")
        training_args(s, 2e-5)
        s.add_argument("--learn-scales", action="store_true", help="also train the weight scales (LSQ)")
        s.add_argument("--no-scale-grad", action="store_true",
                       help="plain straight-through gradients: dynamic activation scales stay constants in the backward")
        s.add_argument("--calib", default=None,
                       help="PTQ calibration data (default: the first training sequences, when the recipe needs any)")
        s.add_argument("--calib-samples", type=_positive, default=64)
        if name == "qad":
            s.add_argument("--teacher", default=None, help="teacher model (default: MODEL itself, in float)")
            distill_args(s)
        s.set_defaults(fn=cmd_train_quantized)

    def calib_args(s, what: str):
        s.add_argument("--calib", default="wiki", help=f"{what}: wiki, news, pydoc or a file (default wiki)")
        s.add_argument("--calib-samples", type=_positive, default=64)
        s.add_argument("--seq-len", type=_positive, default=256)
        s.add_argument("--overwrite", action="store_true")

    s = sub.add_parser("prune", help="structured pruning (heads, MLP neurons, hidden channels, layers) to a smaller model")
    model_args(s)
    s.add_argument("--out", required=True, help="the pruned model: a plain HF folder")
    s.add_argument("--params", default=None, help="keep this share of the non-embedding parameters, e.g. 70%%")
    s.add_argument("--axis", choices=("width", "depth"), default="width",
                   help="how --params is reached: MLP width, or whole layers (default width)")
    s.add_argument("--heads", type=_positive, help="query heads to keep (a multiple of the KV heads kept)")
    s.add_argument("--kv-heads", type=_positive, help="KV heads (query groups) to keep")
    s.add_argument("--ffn", type=_positive, help="MLP intermediate size to keep")
    s.add_argument("--hidden", type=_positive, help="hidden (embedding) channels to keep")
    s.add_argument("--layers", type=_positive, help="decoder layers to keep")
    s.add_argument("--layer-metric", choices=("block", "loss"), default="loss",
                   help="layer importance: loss (calibration loss when skipped; better after distillation) or "
                        "block (1 - cos of input and output; one pass, faster)")
    s.add_argument("--no-reconstruct", action="store_true",
                   help="keep MLP neurons by mean activation and the surviving weights as they were (default: "
                        "choose neurons by greedy OBS and refit down_proj / o_proj by least squares on the "
                        "calibration data to absorb what the pruned neurons, heads and layers carried)")
    calib_args(s, "importance data")
    s.set_defaults(fn=cmd_prune)

    s = sub.add_parser("sparsify", help="unstructured or 2:4 sparsity by magnitude, Wanda or SparseGPT")
    model_args(s)
    s.add_argument("--out", required=True)
    s.add_argument("--method", choices=("magnitude", "wanda", "sparsegpt"), default="wanda")
    s.add_argument("--sparsity", default="2:4", help="2:4, or a fraction of each row like 0.5 (default 2:4)")
    calib_args(s, "calibration data for wanda and sparsegpt")
    s.set_defaults(fn=cmd_sparsify)

    s = sub.add_parser("distill", help="knowledge distillation of a (pruned, sparse) student from a teacher (resumable)")
    model_args(s)
    s.add_argument("--teacher", required=True, help="the teacher model (same tokenizer)")
    s.add_argument("--out", required=True, help="the distilled model; checkpoints go to OUT.work")
    training_args(s, 1e-4)
    distill_args(s)
    s.add_argument("--train-embeddings", action="store_true",
                   help="also train the (often tied) embeddings; off by default, as short runs distill better without")
    s.set_defaults(fn=cmd_distill)

    sp = sub.add_parser("speculate", help="train EAGLE-3 draft heads and benchmark speculative decoding")
    ssub = sp.add_subparsers(dest="speculate_command", required=True, metavar="ACTION")
    s = ssub.add_parser("train", help="train an EAGLE-3 head on the target's own responses (resumable)")
    model_args(s)
    s.add_argument("--out", required=True, help="head folder (EAGLE-3 layout); work files go to OUT.work")
    s.add_argument("--prompts", default="wiki", help="wiki, news, pydoc (calibration split) or a .txt/.jsonl file")
    s.add_argument("--num-prompts", type=_positive, default=512)
    s.add_argument("--max-new-tokens", type=_positive, default=128, help="response length per prompt")
    s.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    s.add_argument("--draft-vocab", type=_positive, default=8192, help="draft vocabulary size (default 8192)")
    s.add_argument("--corpus-tokens", type=int, default=0,
                   help="also train on this many tokens of the prompts' plain text (teacher-forced; cheap extra data)")
    s.add_argument("--train-lm-head", action="store_true", help="train the head's output layer too (default frozen)")
    s.add_argument("--ttt-steps", type=_positive, default=4, help="drafting steps unrolled in training")
    s.add_argument("--epochs", type=float, default=4.0)
    s.add_argument("--batch-size", type=_positive, default=8)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--no-bf16", action="store_true", help="train in float32 (default: bf16 autocast where the hardware computes bf16 natively)")
    s.add_argument("--max-minutes", type=float, default=None, help="stop training after this long (saves the head)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=cmd_speculate_train)
    s = ssub.add_parser("bench", help="plain vs speculative greedy decoding on held-out prompts (outputs checked equal)")
    model_args(s)
    s.add_argument("--draft", action="append", required=True,
                   help="'ngram', an EAGLE-3 head folder or a draft model; repeat to compare several")
    s.add_argument("--prompts", default="wiki", help="wiki, news, pydoc (evaluation split) or a .txt/.jsonl file")
    s.add_argument("--num-prompts", type=_positive, default=8)
    s.add_argument("--max-new-tokens", type=_positive, default=128)
    s.add_argument("--draft-tokens", type=_positive, default=4)
    s.add_argument("--tree", action="store_true", help="tree drafts of --draft-tokens tokens")
    s.add_argument("--chat", action="store_true")
    s.add_argument("--no-compile", action="store_true")
    s.add_argument("--json", help="write the table as JSON to this file")
    s.set_defaults(fn=cmd_speculate_bench)

    s = sub.add_parser("demo", help="float vs INT8 vs INT4 weight-only on the default model, with a report")
    s.add_argument("--model", default="smollm2-135m")
    s.add_argument("--data", default="wiki")
    s.add_argument("--max-tokens", type=_positive, default=8192)
    s.add_argument("--no-speed", action="store_true")
    s.add_argument("--out", default="demo-report")
    s.set_defaults(fn=cmd_demo)
    return p


# Commands that load models and run for minutes: each reports its peak resident memory when done.
LONG_COMMANDS = {"convert", "eval", "quantize", "generate", "export", "qat", "qad", "prune", "sparsify", "distill",
                 "speculate", "demo"}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
        if args.command in LONG_COMMANDS:
            from .memory import peak_rss_bytes

            print(f"peak memory: {peak_rss_bytes() / 2**30:.2f} GiB resident", file=sys.stderr)
    except LeanLMError as e:
        print(f"leanlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leanlm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
