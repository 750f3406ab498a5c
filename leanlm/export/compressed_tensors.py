"""compressed-tensors checkpoints (vLLM's native format; transformers loads them with the package installed).

The writer produces the format itself from `weight_parts` (no compressed_tensors import):
- ``pack-quantized``: INT4/INT8 weights without activation quantization, ``32 / bits`` offset-binary codes
  per int32 along the input dim (element j of a word at bits ``j * bits``), plus ``weight_scale`` [N, G],
  ``weight_shape`` and, when asymmetric, ``weight_zero_point`` packed the same way along the output dim;
- ``int-quantized`` / ``float-quantized``: INT8 / FP8 weights as int8 / float8_e4m3fn, for W8A8 schemes;
- ``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized``: E2M1 codes two per byte (low nibble first) with
  E4M3 (plus ``weight_global_scale``) or E8M0 block scales; ``mxfp8-quantized``: FP8 with E8M0 scales.
compressed-tensors divides by the global scale (``w = q * s / G``) where leanlm multiplies, so G = 1 / g.
Integers use the same range convention as leanlm (amax onto max + 1/2), so the scales carry over as they are.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import LeanLMError
from ..quant.formats import E2M1_GRID
from .parts import e2m1_bytes, float_tensors, quantized_layers, untie_quantized_head, weight_parts

CT_VERSION = "0.20.0"  # the compressed-tensors release whose layout this follows
_FIX = ("export with --format modelopt, or quantize with a recipe without smoothing "
        "(w4a16_gptq, w4a16_rtn, w8a16, fp8, nvfp4)")


def _args(spec, kind: str) -> dict:
    """QuantizationArgs (as config.json stores them) for a leanlm spec, or a LeanLMError if CT cannot say it."""
    fmt = spec.element
    if spec.format not in ("int4", "int8", "fp8_e4m3", "fp4_e2m1"):
        raise LeanLMError(f"compressed-tensors has no {spec.format} format: quantize with int4, int8, fp8 or nvfp4")
    a = {"num_bits": fmt.bits, "type": fmt.kind, "symmetric": spec.symmetric, "group_size": None,
         "dynamic": spec.dynamic, "strategy": "tensor"}
    b = spec.block_size
    if spec.scale_format == "e4m3":
        if not (fmt.bits == 4 and b == 16):
            raise LeanLMError(f"compressed-tensors expresses E4M3 block scales only as NVFP4 (fp4, blocks of 16), not "
                              f"{spec.format}/b{b}: use the nvfp4 preset")
        a.update(strategy="tensor_group", group_size=16, scale_dtype="torch.float8_e4m3fn")
    elif spec.scale_format == "e8m0":
        if b != 32:
            raise LeanLMError(f"compressed-tensors expresses E8M0 scales only in blocks of 32 (MXFP4/MXFP8), not {b}")
        a.update(strategy="group", group_size=32, scale_dtype="torch.uint8")
    elif fmt.bits == 4 and fmt.kind == "float":
        raise LeanLMError("compressed-tensors needs FP4 with E4M3 (nvfp4) or E8M0 (mxfp4) block scales")
    elif b > 0:
        a.update(strategy="group", group_size=b)
    elif b == -1:
        a["strategy"] = "channel" if kind == "weights" else "token"
    if kind == "input_activations" and not spec.dynamic and a["strategy"] != "tensor":
        raise LeanLMError(f"compressed-tensors has static input scales only per tensor, not {a['strategy']}: "
                          "use a per-tensor (block_size 0) or dynamic input spec")
    if kind == "input_activations" and spec.format == "fp4_e2m1" and spec.scale_format == "e4m3":
        # leanlm's NVFP4 activations take their tensor scale per call too: fully dynamic, not "local"
        a["dynamic"] = True
    return a


def _format(spec, has_input: bool) -> str:
    if spec.scale_format == "e4m3":
        return "nvfp4-pack-quantized"
    if spec.scale_format == "e8m0":
        return "mxfp4-pack-quantized" if spec.bits == 4 else "mxfp8-quantized"
    if spec.element.kind == "float":
        return "float-quantized"
    return "int-quantized" if has_input else "pack-quantized"


def _pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned `bits`-bit codes [R, C] -> int32 [R, ceil(C * bits / 32)], element j of a word at bit j * bits."""
    per = 32 // bits
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, (-codes.shape[1]) % per))
    c = c.reshape(c.shape[0], -1, per) << (torch.arange(per) * bits)
    words = c.sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement wrap


def _layer_tensors(name: str, q, fmt: str, k: int) -> dict[str, torch.Tensor]:
    p = weight_parts(q)
    spec, bits = p.spec, p.spec.bits
    if spec.block_size > 0 and k % spec.block_size:
        raise LeanLMError(f"layer '{name}' has in_features {k}, not a multiple of its group size {p.block}: "
                          "compressed-tensors (and vLLM) need whole groups; quantize with a group size dividing "
                          f"{k}, e.g. w4a16_rtn_g64")
    scale = p.scale.reshape(1) if p.block == 0 else p.scale  # tensor: [1]; channel: [N, 1]; group: [N, G]
    t = {}
    if fmt in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
        t["weight_packed"] = e2m1_bytes(p.values)
        t["weight_scale"] = p.stored_scale.contiguous()  # float8_e4m3fn, or E8M0 exponent bytes (bias 127)
        if p.global_scale is not None:
            t["weight_global_scale"] = (1.0 / p.global_scale.float()).reshape(1)
        return t
    offset = 0 if spec.symmetric or spec.element.kind == "float" else 2 ** (bits - 1)  # unsigned -> CT's signed
    if fmt == "pack-quantized":
        t["weight_packed"] = _pack_int32(p.values + 2 ** (bits - 1) - offset, bits)
        t["weight_shape"] = torch.tensor([q.out_features, k], dtype=torch.int64)
    elif fmt == "mxfp8-quantized":
        t["weight"] = p.values.to(torch.float8_e4m3fn)
    else:
        t["weight"] = p.values.to(torch.float8_e4m3fn if spec.element.kind == "float" else torch.int8) \
            if offset == 0 else (p.values - offset).to(torch.int8)
    t["weight_scale"] = p.stored_scale.contiguous() if fmt == "mxfp8-quantized" else scale.contiguous()
    if p.zero is not None:
        z = p.zero - offset
        if fmt == "pack-quantized" and p.block != 0:  # CT packs zero points along the output dim
            t["weight_zero_point"] = _pack_int32((z + 2 ** (bits - 1)).T, bits).T.contiguous()
        else:
            t["weight_zero_point"] = z.reshape(scale.shape).to(torch.int8)
    return t


def _norm_scales_output(norm: nn.Module) -> bool:
    """Whether `norm`'s output is linear in its weight (y = f(x) * w), so dividing w by s divides y by s."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1:
        return False
    probe = copy.deepcopy(norm)
    x = torch.randn(3, w.numel(), generator=torch.Generator().manual_seed(0)).to(w.dtype)
    with torch.no_grad():
        y = probe(x).float()
        probe.weight.mul_(2)
        return torch.allclose(probe(x).float(), 2 * y, rtol=1e-3, atol=1e-6)


def _fold_smoothing(model: nn.Module, layers: dict) -> dict[str, torch.Tensor]:
    """Fold shared input scales into the RMSNorm feeding them: {norm weight name: w / s}. Exact in real
    arithmetic; any smoothed layer left over is an error (CT has no per-layer input scale)."""
    folded, done = {}, set()
    for lname, block in model.named_modules():
        # Gemma-style blocks feed the MLP from pre_feedforward_layernorm (post_attention_layernorm is on the residual)
        mlp_norm = next((a for a in ("pre_feedforward_layernorm", "post_attention_layernorm") if hasattr(block, a)), "")
        for norm_attr, readers in (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                                   (mlp_norm, ("mlp.gate_proj", "mlp.up_proj"))):
            names = [f"{lname}.{r}" if lname else r for r in readers]
            if not hasattr(block, norm_attr) or not all(n in layers for n in names):
                continue
            ss = [layers[n].smooth for n in names]
            if ss[0] is None or any(s is None or not torch.equal(s, ss[0]) for s in ss):
                continue
            norm = getattr(block, norm_attr)
            if _norm_scales_output(norm):
                folded[f"{lname}.{norm_attr}.weight"] = (norm.weight.detach().float() / ss[0]).to(norm.weight.dtype)
                done.update(names)
    left = [n for n, q in layers.items() if q.smooth is not None and n not in done]
    if left:
        raise LeanLMError(f"layer '{left[0]}' carries AWQ/SmoothQuant input scales that compressed-tensors cannot "
                          f"express: {_FIX}")
    return folded


def _targets(names: list[str], all_linear: dict[str, str]) -> list[str]:
    """A group's targets: one "re:" per layer suffix when every linear with that suffix is in the group,
    else the exact names (vLLM and compressed-tensors accept both)."""
    out, group = [], set(names)
    for suffix in dict.fromkeys(n.rsplit(".", 1)[-1] for n in names):
        same = [n for n in all_linear if n.rsplit(".", 1)[-1] == suffix]
        if all(n in group for n in same):
            out.append(f"re:.*\\.{re.escape(suffix)}$" if any("." in n for n in same) else suffix)
        else:
            out += [n for n in names if n.rsplit(".", 1)[-1] == suffix]
    return out


def _kv_scheme(model: nn.Module) -> tuple[dict | None, dict[str, torch.Tensor]]:
    kvs = {n: m for n, m in model.named_modules() if hasattr(m, "leanlm_kv")}
    if not kvs:
        return None, {}
    spec = next(iter(kvs.values())).leanlm_kv.spec
    if spec.format != "fp8_e4m3" or spec.block_size != 0:
        raise LeanLMError(f"compressed-tensors (vLLM) reads only an FP8 per-tensor KV cache, not {spec.format}: "
                          "quantize with a _kv_fp8 recipe or without KV-cache quantization")
    tensors = {}
    for n, attn in kvs.items():
        for which in ("k", "v"):
            amax = getattr(attn.leanlm_kv, f"{which}_amax")
            tensors[f"{n}.{which}_scale"] = (amax.float() / spec.element.range).reshape(1)
    return {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "tensor",
            "dynamic": False}, tensors


def _plan(model: nn.Module):
    """Everything both the writer and the validator need: layers, their schemes, folded norms, KV."""
    layers = quantized_layers(model)
    for n, q in layers.items():
        if q.weight_spec is None or q.output_spec is not None:
            raise LeanLMError(f"layer '{n}' quantizes {'its output' if q.weight_spec else 'only activations'}, which "
                              "compressed-tensors checkpoints cannot carry: quantize weights (and inputs) only")
    schemes = {}
    for n, q in layers.items():
        scheme = {"weights": _args(q.weight_spec, "weights"),
                  "input_activations": None if q.input_spec is None else _args(q.input_spec, "input_activations"),
                  "output_activations": None, "format": _format(q.weight_spec, q.input_spec is not None)}
        schemes[n] = scheme
    return layers, schemes, _fold_smoothing(model, layers), _kv_scheme(model)


def write(model: nn.Module, tokenizer, out: Path, **options) -> dict:
    """Write `model` as a compressed-tensors checkpoint into `out`; returns a JSON-able summary."""
    if options:
        raise LeanLMError(f"the compressed-tensors export takes no option {sorted(options)[0]!r}: drop it")
    out = Path(out)
    layers, schemes, folded, (kv_args, kv_tensors) = _plan(model)
    tensors = {**float_tensors(model), **folded, **kv_tensors}
    for n, q in layers.items():
        lt = _layer_tensors(n, q, schemes[n]["format"], q.in_features)
        if q.input_spec is not None and not q.input_spec.dynamic:
            s = q.input_amax.float().reshape(1) / q.input_spec.element.range
            lt["input_scale"] = torch.where(s > 0, s, torch.ones_like(s))  # leanlm's zero-range convention
        tensors.update({f"{n}.{k}": v.contiguous() for k, v in lt.items()})
    linear = {n: "q" if n in layers else "f" for n, m in model.named_modules()
              if isinstance(m, nn.Linear) or n in layers}
    groups: dict[str, list[str]] = {}
    for n, s in schemes.items():
        groups.setdefault(json.dumps(s, sort_keys=True), []).append(n)
    config_groups = {f"group_{i}": {**json.loads(key), "targets": _targets(names, linear)}
                     for i, (key, names) in enumerate(groups.items())}
    formats = sorted({s["format"] for s in schemes.values()})
    qcfg = {"quant_method": "compressed-tensors", "format": formats[0] if len(formats) == 1 else "mixed-precision",
            "config_groups": config_groups, "ignore": [n for n, v in linear.items() if v == "f"],
            "quantization_status": "compressed", "kv_cache_scheme": kv_args, "global_compression_ratio": None,
            "sparsity_config": {}, "transform_config": {}, "version": CT_VERSION}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads(model.config.to_json_string())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config["quantization_config"] = qcfg
    untie_quantized_head(model, config)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    tokenizer.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    return {"format": qcfg["format"], "groups": len(config_groups), "layers": len(layers),
            "ignored": qcfg["ignore"], "folded_norms": sorted(folded), "kv_cache": kv_args is not None,
            "bytes": (out / "model.safetensors").stat().st_size}


# -- reading back (independent of the writer's packing: bytes and nibbles instead of word shifts) ------------
_KEYS = {"pack-quantized": ("weight_packed", "weight_scale", "weight_shape"),
         "int-quantized": ("weight", "weight_scale"),
         "float-quantized": ("weight", "weight_scale"), "mxfp8-quantized": ("weight", "weight_scale"),
         "nvfp4-pack-quantized": ("weight_packed", "weight_scale", "weight_global_scale"),
         "mxfp4-pack-quantized": ("weight_packed", "weight_scale")}


def _unpack_words(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """int32 words [R, W] -> signed values [R, cols] from their little-endian bytes (4 bits: low nibble first)."""
    b = words.contiguous().view(torch.uint8).reshape(words.shape[0], -1)
    if bits == 4:
        b = torch.stack([b & 0xF, b >> 4], -1).reshape(words.shape[0], -1)
    return b[:, :cols].float() - 2 ** (bits - 1)


def _decode(t: dict, args: dict, fmt: str, n: int, k: int) -> torch.Tensor:
    """The float32 weight [N, K] a compressed-tensors layer describes (CT's dequantize: (q - zp) * s / G)."""
    bits, strategy = args["num_bits"], args["strategy"]
    if fmt.endswith("fp4-pack-quantized"):
        p = t["weight_packed"]
        lut = torch.tensor(E2M1_GRID + tuple(-v for v in E2M1_GRID))
        v = lut[torch.stack([p & 0xF, p >> 4], -1).reshape(n, k).long()]
    elif fmt == "pack-quantized":
        v = _unpack_words(t["weight_packed"], bits, k)
    else:
        v = t["weight"].float()
    s = t["weight_scale"]
    s = torch.exp2(s.float() - 127) if s.dtype == torch.uint8 else s.float()
    if "weight_global_scale" in t:
        s = s / t["weight_global_scale"].float()
    zp = t.get("weight_zero_point")
    if zp is not None:
        zp = _unpack_words(zp.T, bits, n).T if fmt == "pack-quantized" and strategy != "tensor" else zp.float()
    if strategy in ("group", "tensor_group"):
        s = s.repeat_interleave(args["group_size"], 1)[:, :k]
        zp = None if zp is None else zp.repeat_interleave(args["group_size"], 1)[:, :k]
    return (v if zp is None else v - zp) * s


def _group_of(name: str, groups: dict) -> dict | None:
    found = [g for g in groups.values() for tg in g["targets"]
             if (re.match(tg[3:], name) if tg.startswith("re:") else tg == name)]
    return found[0] if len(found) == 1 else None


def validate(out: Path, model: nn.Module, tokenizer) -> dict:
    """Read the checkpoint back and check every tensor against the model: quantized layers decoded from the
    CT layout must equal leanlm's dequantized weights (to float rounding), float tensors bit for bit."""
    out = Path(out)
    try:
        qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
        groups, ignore = qcfg["config_groups"], set(qcfg["ignore"])
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LeanLMError(f"compressed-tensors export '{out}' does not read back ({e}): export again") from None
    if qcfg.get("quant_method") != "compressed-tensors" or qcfg.get("quantization_status") != "compressed":
        raise LeanLMError(f"'{out / 'config.json'}' lacks a compressed-tensors quantization_config: export again")
    layers, schemes, folded, (_, kv_tensors) = _plan(model)
    expected = {**float_tensors(model), **folded, **kv_tensors}
    worst = 0.0
    for n, q in layers.items():
        g = _group_of(n, groups)
        if g is None or n in ignore:
            raise LeanLMError(f"layer '{n}' is not matched by exactly one config group of '{out}': export again")
        fmt, args = g["format"], g["weights"]
        keys = list(_KEYS[fmt]) + (["weight_zero_point"] if not args["symmetric"] else [])
        if g["input_activations"] is not None and not g["input_activations"]["dynamic"]:
            keys.append("input_scale")
        missing = [f"{n}.{k}" for k in keys if f"{n}.{k}" not in stored]
        if missing:
            raise LeanLMError(f"export '{out}' lacks tensor '{missing[0]}': export again")
        t = {k: stored[f"{n}.{k}"] for k in keys}
        ref = q._dequantize_frozen()
        got = _decode(t, args, fmt, q.out_features, q.in_features)
        err = (got - ref.float()).abs().max().item() / max(ref.float().abs().max().item(), 1e-30)
        if not err <= 4 * torch.finfo(ref.dtype).eps:
            raise LeanLMError(f"layer '{n}' decodes from the compressed-tensors layout with relative error "
                              f"{err:.2e}: the export is wrong; report this bug")
        worst = max(worst, err)
        if "input_scale" in t:
            want = q.input_amax.float().reshape(1) / q.input_spec.element.range
            if not torch.allclose(t["input_scale"].float(), torch.where(want > 0, want, torch.ones_like(want))):
                raise LeanLMError(f"layer '{n}' has a wrong input_scale in '{out}': export again")
        expected.update({f"{n}.{k}": None for k in keys})
    for key, t in expected.items():
        if key not in stored:
            raise LeanLMError(f"export '{out}' lacks tensor '{key}': export again")
        if t is not None and not torch.equal(stored[key], t.cpu()):
            raise LeanLMError(f"tensor '{key}' in '{out}' differs from the model: export again")
    extra = sorted(set(stored) - set(expected))
    if extra:
        raise LeanLMError(f"export '{out}' holds unexpected tensor '{extra[0]}': export again")
    return {"layers_decoded": len(layers), "tensors": len(stored), "max_rel_error": worst,
            "folded_norms": len(folded)}
