"""NVIDIA Model Optimizer's unified HF checkpoint: what TensorRT-LLM and vLLM (``quantization="modelopt"``) load.

A HF model folder (config.json, tokenizer, model.safetensors) plus ``hf_quant_config.json``; the
quantized linears keep their HF names with this layout (modelopt 0.47's ``export_hf_checkpoint``):

- ``FP8``: ``weight`` float8_e4m3fn, ``weight_scale`` fp32 scalar, ``input_scale`` fp32 scalar (amax / 448).
- ``W4A16_AWQ``: ``weight`` uint8 ``[N / 2, K]``, two output rows per byte (row 2i in the low nibble,
  two's complement), ``weight_scale`` ``[N, ceil(K / g)]``, ``pre_quant_scale`` ``[K]`` (inputs are
  multiplied by it: leanlm's smoothing ``1 / s``; ones when the layer has none). Model Optimizer
  itself refuses K not a multiple of g; leanlm writes the partial last group's scale as one more column
  (group index ``k // g``, what the kernels compute).
- ``NVFP4``: ``weight`` uint8 ``[N, K / 2]`` E2M1 codes (even element low), ``weight_scale`` E4M3
  ``[N, K / 16]``, ``weight_scale_2`` fp32 (the tensor scale), ``input_scale`` fp32 (activation amax / (6 * 448)).
- FP8 KV cache: ``k_proj.k_scale`` / ``v_proj.v_scale`` (amax / 448) and ``kv_cache_quant_algo: FP8``.

Static activation scales come from leanlm's calibration; NVFP4 activations are dynamic in leanlm, so
their per-tensor ``input_scale`` is measured here on a few calibration samples.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import LeanLMError
from ..quant.formats import E2M1_GRID, E4M3_MAX
from ..quant.kv import KVQuantizer
from ..quant.linear import QuantLinear
from .parts import WeightParts, e2m1_bytes, float_tensors, quantized_layers, untie_quantized_head, weight_parts

PRODUCER = {"name": "modelopt", "version": "0.47.0"}
ACT_CALIB_SAMPLES, ACT_CALIB_LEN = 8, 256


def quant_algo(q: QuantLinear) -> str:
    """The Model Optimizer algorithm a leanlm layer is, or a clear error if it has none."""
    w, x = q.weight_spec, q.input_spec
    if w.format == "fp8_e4m3" and w.block_size == 0 and x is not None and x.format == "fp8_e4m3" \
            and x.block_size == 0 and not x.dynamic:
        return "FP8"
    if w.format == "int4" and w.symmetric and w.block_size > 0 and x is None:
        return "W4A16_AWQ"
    if w.format == "fp4_e2m1" and w.block_size == 16 and w.scale_format == "e4m3" and x is not None \
            and x.format == "fp4_e2m1" and x.block_size == 16:
        return "NVFP4"
    raise LeanLMError(f"layer format weight={w.format}/b{w.block_size} input="
                      f"{'none' if x is None else x.format + '/b' + str(x.block_size)} has no Model Optimizer "
                      "equivalent: export recipes fp8, w4a16_awq / w4a16_gptq / w4a16_rtn (symmetric) or "
                      "nvfp4 / nvfp4_awq, or use --format compressed-tensors / gguf")


def _pack_rows_int4(values: torch.Tensor) -> torch.Tensor:
    """Signed int4 ``[N, K]`` -> uint8 ``[N / 2, K]``: output rows 2i (low nibble) and 2i + 1 (high)."""
    v = values.to(torch.int8).view(torch.uint8) & 0xF
    return (v[0::2] | (v[1::2] << 4)).contiguous()


@torch.no_grad()
def _activation_amax(model: nn.Module, tokenizer, layers: dict[str, QuantLinear]) -> dict[str, torch.Tensor]:
    """Per-layer input absmax over a few calibration samples (for scales leanlm computes dynamically)."""
    from ..data import calibration_batches

    amax: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(mod, args):
            x = args[0]
            if mod.smooth is not None:
                x = x / mod.smooth.to(x.dtype)
            a = x.detach().abs().amax().float()
            amax[name] = torch.maximum(amax[name], a) if name in amax else a
        return record

    handles = [q.register_forward_pre_hook(hook(n)) for n, q in layers.items()]
    try:
        model(calibration_batches(tokenizer, n_samples=ACT_CALIB_SAMPLES, seq_len=ACT_CALIB_LEN))
    finally:
        for h in handles:
            h.remove()
    return amax


def _layer_tensors(name: str, q: QuantLinear, algo: str, parts: WeightParts, act_amax) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}  # biases come with the float tensors
    if algo == "FP8":
        out[f"{name}.weight"] = parts.values.to(torch.float8_e4m3fn)
        out[f"{name}.weight_scale"] = parts.scale.reshape(()).float()
        out[f"{name}.input_scale"] = (q.input_amax.float().reshape(()) / E4M3_MAX)
    elif algo == "W4A16_AWQ":
        if q.out_features % 2:
            raise LeanLMError(f"layer '{name}' has an odd number of outputs ({q.out_features}): W4A16_AWQ packs "
                              "two output rows per byte; exclude the layer or use --format compressed-tensors")
        out[f"{name}.weight"] = _pack_rows_int4(parts.values)
        out[f"{name}.weight_scale"] = parts.scale.float()
        s = q.smooth if q.smooth is not None else torch.ones(q.in_features)
        out[f"{name}.pre_quant_scale"] = (1.0 / s.float()).contiguous()
    else:  # NVFP4
        if q.in_features % 16:
            raise LeanLMError(f"layer '{name}' has {q.in_features} inputs, not a multiple of NVFP4's block of 16: "
                              "exclude it from the recipe or use --format gguf")
        if q.smooth is not None:
            raise LeanLMError(f"layer '{name}' carries AWQ input scales, which Model Optimizer's NVFP4 export keeps "
                              "only as NVFP4_AWQ (not written by leanlm): quantize with nvfp4 instead of nvfp4_awq")
        out[f"{name}.weight"] = e2m1_bytes(parts.values)
        out[f"{name}.weight_scale"] = parts.stored_scale.contiguous()
        out[f"{name}.weight_scale_2"] = parts.global_scale.float().reshape(())
        out[f"{name}.input_scale"] = (act_amax[name] / (6.0 * E4M3_MAX)).reshape(())
    return out


def write(model: nn.Module, tokenizer, out: Path) -> dict:
    """Write the unified checkpoint of a leanlm-quantized model into `out`."""
    layers = {n: q for n, q in quantized_layers(model).items() if q.weight_spec is not None}
    if not layers:
        raise LeanLMError("model is not quantized: quantize it first (leanlm quantize MODEL --recipe fp8|w4a16_awq|nvfp4)")
    algos = {n: quant_algo(q) for n, q in layers.items()}
    if len(set(algos.values())) > 1:
        raise LeanLMError(f"model mixes Model Optimizer algorithms ({', '.join(sorted(set(algos.values())))}): "
                          "the unified checkpoint holds one; use --format compressed-tensors for mixed recipes")
    algo = next(iter(algos.values()))
    act_amax = _activation_amax(model, tokenizer, layers) if algo == "NVFP4" else {}
    tensors: dict[str, torch.Tensor] = {}
    groups = set()
    for name, q in layers.items():
        parts = weight_parts(q)
        groups.add(parts.block)
        tensors.update(_layer_tensors(name, q, algo, parts, act_amax))
    kv = {n: m for n, m in model.named_modules() if isinstance(m, KVQuantizer)}
    kv_algo = None
    if kv:
        spec = next(iter(kv.values())).spec
        if spec.format != "fp8_e4m3" or spec.block_size != 0:
            raise LeanLMError(f"KV cache format {spec.format}/b{spec.block_size} has no Model Optimizer equivalent "
                              "(FP8 per-tensor only): use a *_kv_fp8 recipe")
        kv_algo = "FP8"
        for n, m in kv.items():
            attn = n.rpartition(".")[0]
            tensors[f"{attn}.k_proj.k_scale"] = m.k_amax.float().amax().reshape(()) / E4M3_MAX
            tensors[f"{attn}.v_proj.v_scale"] = m.v_amax.float().amax().reshape(()) / E4M3_MAX
    tensors.update(float_tensors(model))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    quant = {"quant_algo": algo, "kv_cache_quant_algo": kv_algo,
             "exclude_modules": sorted(n for n, m in model.named_modules() if type(m) is nn.Linear)}
    if algo == "W4A16_AWQ":
        quant.update(group_size=max(groups), has_zero_point=False, pre_quant_scale=True)
        if len(groups) > 1:
            raise LeanLMError(f"layers use different group sizes ({sorted(groups)}): W4A16_AWQ has one group_size")
    elif algo == "NVFP4":
        quant["group_size"] = 16
    hf_quant = {"producer": PRODUCER, "quantization": quant}
    (out / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=4))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["quantization_config"] = {"quant_method": "modelopt", **quant, "producer": PRODUCER}
    untie_quantized_head(model, config)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    return {"quant_algo": algo, "kv_cache_quant_algo": kv_algo, "layers": len(layers)}


# -- validation: an independent reader of the layout above ------------------------------------------

def _nibbles(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (b & 0xF).to(torch.int16), (b >> 4).to(torch.int16)


def read_weight(f, name: str, algo: str, n: int, k: int) -> torch.Tensor:
    """Dequantize layer `name` from an open safetensors file written in the unified layout."""
    w = f.get_tensor(f"{name}.weight")
    s = f.get_tensor(f"{name}.weight_scale").float()
    if algo == "FP8":
        return w.float() * s
    if algo == "W4A16_AWQ":
        lo, hi = _nibbles(w)
        signed = lambda v: torch.where(v >= 8, v - 16, v).float()  # noqa: E731
        q = torch.empty(n, k)
        q[0::2], q[1::2] = signed(lo), signed(hi)
        g = -(-k // s.shape[1])
        return q * s.repeat_interleave(g, dim=1)[:, :k]
    grid = torch.tensor(E2M1_GRID)
    lo, hi = _nibbles(w)
    val = lambda c: grid[(c & 7).long()] * torch.where(c >= 8, -1.0, 1.0)  # noqa: E731
    q = torch.empty(n, k)
    q[:, 0::2], q[:, 1::2] = val(lo), val(hi)
    return q * s.repeat_interleave(16, dim=1) * f.get_tensor(f"{name}.weight_scale_2").float()


def validate(out: Path, model: nn.Module, tokenizer) -> dict:
    """Read the checkpoint back and check every quantized weight decodes to leanlm's exactly."""
    hf_quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    algo = hf_quant["quant_algo"]
    worst = 0.0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for name, q in quantized_layers(model).items():
            if q.weight_spec is None:
                continue
            need = {"FP8": ("weight_scale", "input_scale"), "W4A16_AWQ": ("weight_scale", "pre_quant_scale"),
                    "NVFP4": ("weight_scale", "weight_scale_2", "input_scale")}[algo]
            missing = [t for t in ("weight", *need) if f"{name}.{t}" not in keys]
            if missing:
                raise LeanLMError(f"modelopt export is missing '{name}.{missing[0]}': export again")
            got = read_weight(f, name, algo, q.out_features, q.in_features)
            ref = q._dequantize_frozen().float()
            err = float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
            if err > 1e-6:
                raise LeanLMError(f"modelopt export of '{name}' decodes to a different weight (max rel error "
                                  f"{err:.2e}): this is a leanlm bug, please report it")
            worst = max(worst, err)
    return {"quant_algo": algo, "layers_checked": len(quantized_layers(model)), "max_rel_error": worst}


__all__ = ["quant_algo", "read_weight", "validate", "write"]
