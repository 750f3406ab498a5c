"""Quantize one float model with a peer toolkit's own PTQ API and score it with leanlm's perplexity code.

Runs inside a peer venv made by bench/peers/setup.sh, e.g.::

    bench/peers/.venv-modelopt/bin/python bench/peers/run_peer.py --peer modelopt --scheme int8_sq \
        --model ~/.cache/leanlm/models/smollm2-135m --calib calib.safetensors --eval eval.safetensors \
        --out out.json

The model stays in the peer's simulated (fake-quantized) form, the way each peer measures accuracy on a CPU.
Any failure of the peer (its quantize call or the quantized forward) is written to the JSON as ``error``
and the script still exits 0, so a driver can show it in its table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback
from pathlib import Path

# No hub access: everything is local (model folder, token files).
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from leanlm.atomic import atomic_write_text  # noqa: E402
from leanlm.eval.perplexity import perplexity  # noqa: E402
from leanlm.eval.speed import peak_rss_bytes  # noqa: E402

CALIB_BATCH = 8

MODELOPT_SCHEMES = ("fp8", "fp8_dynamic", "int8_sq", "w4a16_awq", "w4a16_awq_g64", "nvfp4", "w4a8_awq")
LLMCOMPRESSOR_SCHEMES = ("w4a16_gptq_g64", "w4a16_gptq", "w4a16_awq_g64", "w4a16_awq", "int8_sq_dynamic", "fp8", "fp8_dynamic")
SCHEMES = {"modelopt": MODELOPT_SCHEMES, "llmcompressor": LLMCOMPRESSOR_SCHEMES}


def error_text(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ").rstrip()


# ---------------------------------------------------------------------------------------------- modelopt

def modelopt_version() -> str:
    import modelopt
    return modelopt.__version__


def modelopt_config(scheme: str) -> dict:
    import modelopt.torch.quantization as mtq

    if scheme == "fp8":
        return mtq.FP8_DEFAULT_CFG
    if scheme == "fp8_dynamic":
        return mtq.FP8_PER_CHANNEL_PER_TOKEN_CFG
    if scheme == "int8_sq":
        return mtq.INT8_SMOOTHQUANT_CFG
    if scheme == "w4a16_awq":
        return mtq.INT4_AWQ_CFG
    if scheme == "w4a16_awq_g64":
        cfg = copy.deepcopy(mtq.INT4_AWQ_CFG)
        changed = 0
        # 0.47 holds quant_cfg as a list of {"quantizer_name", "cfg"/"enable"} entries; older releases a dict
        entries = cfg["quant_cfg"]
        items = ([(e.get("quantizer_name"), e.get("cfg")) for e in entries] if isinstance(entries, list)
                 else list(entries.items()))
        for name, qcfg in items:
            if name != "*weight_quantizer" or qcfg is None:
                continue
            for sub in (qcfg if isinstance(qcfg, list) else [qcfg]):
                if isinstance(sub, dict) and sub.get("block_sizes", {}).get(-1) == 128:
                    sub["block_sizes"][-1] = 64
                    changed += 1
        if changed != 1:
            raise RuntimeError(f"could not find the INT4 weight block size in INT4_AWQ_CFG ({changed} matches)")
        return cfg
    if scheme == "nvfp4":
        return mtq.NVFP4_DEFAULT_CFG
    if scheme == "w4a8_awq":
        if not hasattr(mtq, "W4A8_AWQ_BETA_CFG"):
            raise RuntimeError("this modelopt has no W4A8_AWQ_BETA_CFG")
        return mtq.W4A8_AWQ_BETA_CFG
    raise ValueError(f"unknown modelopt scheme {scheme!r}")


def quantize_modelopt(model, scheme: str, calib: torch.Tensor) -> float:
    import modelopt.torch.quantization as mtq

    cfg = modelopt_config(scheme)

    def forward_loop(m):
        with torch.no_grad():
            for i in range(0, len(calib), CALIB_BATCH):
                m(calib[i:i + CALIB_BATCH], use_cache=False)

    t0 = time.perf_counter()
    mtq.quantize(model, cfg, forward_loop)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- llmcompressor

def llmcompressor_version() -> str:
    import llmcompressor
    version = getattr(llmcompressor, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version
        version = dist_version("llmcompressor")
    return version


def w4a16_scheme(group_size: int):
    """The W4A16 preset (symmetric int4 weights, per group), with `group_size` replaced."""
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme("W4A16", ["Linear"])
    scheme.weights = scheme.weights.model_copy(update={"group_size": group_size})
    return scheme


def llmcompressor_recipe(scheme: str):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    ignore = ["lm_head"]
    if scheme == "w4a16_gptq":
        return GPTQModifier(targets="Linear", ignore=ignore, scheme="W4A16")
    if scheme == "w4a16_gptq_g64":
        return GPTQModifier(ignore=ignore, config_groups={"group_0": w4a16_scheme(64)})
    if scheme in ("w4a16_awq", "w4a16_awq_g64"):
        try:  # the AWQ smoothing transform moved here in 0.14; pair it with a quantization modifier
            from llmcompressor.modifiers.transform.awq import AWQModifier
        except ImportError:
            from llmcompressor.modifiers.awq import AWQModifier  # older releases: one modifier with a scheme
            if scheme == "w4a16_awq":
                return AWQModifier(targets=["Linear"], ignore=ignore, scheme="W4A16")
            return AWQModifier(ignore=ignore, config_groups={"group_0": w4a16_scheme(64)})
        if scheme == "w4a16_awq":
            return [AWQModifier(), QuantizationModifier(targets="Linear", ignore=ignore, scheme="W4A16")]
        return [AWQModifier(), QuantizationModifier(ignore=ignore, config_groups={"group_0": w4a16_scheme(64)})]
    if scheme == "int8_sq_dynamic":  # its W8A8: per-channel weights, per-token dynamic activations
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
        return [SmoothQuantModifier(smoothing_strength=0.8),
                GPTQModifier(targets="Linear", scheme="W8A8", ignore=ignore)]
    if scheme == "fp8":
        return QuantizationModifier(targets="Linear", scheme="FP8", ignore=ignore)
    if scheme == "fp8_dynamic":  # per-channel weights, per-token dynamic activations
        return QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=ignore)
    raise ValueError(f"unknown llmcompressor scheme {scheme!r}")


def quantize_llmcompressor(model, scheme: str, calib: torch.Tensor):
    from datasets import Dataset
    from llmcompressor import oneshot

    recipe = llmcompressor_recipe(scheme)
    n, length = calib.shape
    dataset = Dataset.from_dict({"input_ids": calib.tolist(),
                                 "attention_mask": torch.ones_like(calib).tolist()})
    t0 = time.perf_counter()
    out = oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=n,
                  max_seq_length=length, shuffle_calibration_samples=False, output_dir=None)
    seconds = time.perf_counter() - t0
    # oneshot quantizes the model in place and returns it; keep whichever module it hands back
    return (out if isinstance(out, torch.nn.Module) else model), seconds


# ---------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer", required=True, choices=sorted(SCHEMES))
    ap.add_argument("--scheme", required=True)
    ap.add_argument("--model", required=True, help="float32 HF safetensors folder")
    ap.add_argument("--calib", required=True, help="safetensors file with `ids` LongTensor [N, L]")
    ap.add_argument("--eval", required=True, help="safetensors file with `ids` and `bytes` LongTensors [T]")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--out", required=True, help="JSON result file (written atomically)")
    args = ap.parse_args(argv)
    if args.scheme not in SCHEMES[args.peer]:
        ap.error(f"scheme {args.scheme!r} is not one of {args.peer}'s: {', '.join(SCHEMES[args.peer])}")

    torch.manual_seed(0)
    calib = load_file(args.calib)["ids"].long()
    ev = load_file(args.eval)
    eval_ids, eval_bytes = ev["ids"].long(), ev["bytes"].long()
    if calib.dim() != 2 or eval_ids.dim() != 1:
        raise SystemExit(f"expected calib ids [N, L] and eval ids [T], got {tuple(calib.shape)} and "
                         f"{tuple(eval_ids.shape)}")

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()

    result = {"peer": args.peer, "scheme": args.scheme, "perplexity": None, "bits_per_byte": None,
              "scored_tokens": None, "calibration_seconds": None, "peak_rss_bytes": None,
              "peer_version": None, "error": None}
    try:
        if args.peer == "modelopt":
            result["peer_version"] = modelopt_version()
            result["calibration_seconds"] = quantize_modelopt(model, args.scheme, calib)
        else:
            result["peer_version"] = llmcompressor_version()
            model, result["calibration_seconds"] = quantize_llmcompressor(model, args.scheme, calib)
        print(f"[{args.peer}/{args.scheme}] quantized in {result['calibration_seconds']:.1f} s; scoring "
              f"{len(eval_ids)} tokens", file=sys.stderr, flush=True)
        model.eval()
        ppl = perplexity(model, eval_ids, eval_bytes, window=args.window, progress=False)
        result.update(perplexity=ppl["perplexity"], bits_per_byte=ppl.get("bits_per_byte"),
                      scored_tokens=ppl["scored_tokens"])
    except Exception as exc:  # any failure of the peer is a result, not a crash
        traceback.print_exc()
        result["error"] = error_text(exc)
    result["peak_rss_bytes"] = peak_rss_bytes()
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    status = f"error {result['error']}" if result["error"] else f"perplexity {result['perplexity']:.4f}"
    print(f"[{args.peer}/{args.scheme}] {status} -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
