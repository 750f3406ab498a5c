"""GGUF export: one ``model.gguf`` file for llama.cpp (Llama and Qwen2 families).

Weights become ``qtype`` (Q8_0, Q4_0, F16 or F32). A leanlm layer that already holds symmetric integer
codes in groups of 32 with fp32 scales (INT4 -> Q4_0, INT4/INT8 -> Q8_0) is written block by block from
its codes: only the scale is rounded to fp16. Every other weight (float layers, other group sizes,
per-channel, FP8, NVFP4/MXFP4, smoothed layers whose effective weight ``Wq / s`` is off any grid) is
*requantized* from its float value with gguf's quantizer, as llama.cpp's converter does. Rows whose
length is not a multiple of 32 stay F16 (llama.cpp's fallback); norms and biases stay F32. Activation
and KV-cache quantizers are not carried over: llama.cpp applies its own. Names, the q/k row
permutation and the metadata follow llama.cpp's ``convert_hf_to_gguf.py``. k-quants (Q4_K, ...) are not
offered: gguf's Python package cannot quantize them (use llama.cpp's ``llama-quantize`` on an F16 export).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import LeanLMError
from ..quant.embedding import TiedEmbedding
from ..quant.linear import QuantLinear
from .parts import WeightParts, quantized_layers, weight_parts

FILE = "model.gguf"
ARCHS = {"llama": "LLAMA", "qwen2": "QWEN2"}  # HF model_type -> gguf.MODEL_ARCH member
QTYPES = {"Q8_0": 7, "Q4_0": 2, "F16": 1, "F32": 0}  # qtype -> general.file_type (llama_ftype)
BLOCK = 32  # values per Q4_0 / Q8_0 block
ATOL = 2.0**-18  # slack for fp16 subnormal scales: |code| <= 128 times half of fp16's smallest step


def _gguf():
    try:
        import gguf
    except ImportError:
        raise LeanLMError("gguf export needs the 'gguf' package: pip install gguf") from None
    return gguf


@dataclass
class _Tensor:
    """One tensor of the file: the float weight llama.cpp should compute with, and how it is stored."""

    name: str
    ref: torch.Tensor  # float32, in llama.cpp's layout (q/k rows permuted)
    type: str  # ggml type name: Q8_0, Q4_0, F16, F32
    how: str  # exact (from codes), requantized (lossy leanlm weight), quantized (float weight), float, fallback_f16
    parts: WeightParts | None = None  # the codes, for "exact"
    heads: int | None = None  # row permutation of llama's q/k


def _permute(w, heads: int | None):
    """llama.cpp's LlamaModel.permute: rotary pairs from HF's half-split order to interleaved (rows only)."""
    if heads is None:
        return w
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _arch(model) -> str:
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in ARCHS or not type(model).__name__.endswith("ForCausalLM"):
        raise LeanLMError(f"gguf export supports llama/qwen2 architectures: '{model_type}' "
                          f"({type(model).__name__}) is not one; export it as compressed-tensors or modelopt")
    rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise LeanLMError(f"gguf export supports plain RoPE only, not rope_type '{kind}': "
                          "convert this model with llama.cpp's convert_hf_to_gguf.py")
    return model_type


def _qtype(model, qtype: str | None) -> str:
    """The requested qtype, or one matching the model's weights: <= 4-bit -> Q4_0, otherwise Q8_0."""
    if qtype is None:
        bits = [q.weight_spec.bits for q in quantized_layers(model).values() if q.weight_spec is not None]
        return "Q4_0" if bits and min(bits) <= 4 else "Q8_0"
    if str(qtype).upper() not in QTYPES:
        raise LeanLMError(f"unknown gguf qtype '{qtype}': use one of {', '.join(QTYPES)} (k-quants such as "
                          "Q4_K: export F16 and run llama.cpp's llama-quantize)")
    return str(qtype).upper()


def _float_weight(m: nn.Module) -> tuple[torch.Tensor, WeightParts | None]:
    """The weight the layer computes with, in float32, and its codes when it holds any."""
    parts = None
    if isinstance(m, TiedEmbedding):  # the output layer's table: its codes, written exactly where they fit
        return _float_weight(m.head)
    if isinstance(m, QuantLinear) and m.weight_spec is not None:
        parts = weight_parts(m)
        w = parts.dequantize()
    else:
        w = m.weight.detach().float()
    if getattr(m, "smooth", None) is not None:  # (x / s) @ Wq.T == x @ (Wq / s).T
        w = w / m.smooth.float().reshape(1, -1)
    return w, parts


def _exact(m: nn.Module, parts: WeightParts | None, qtype: str) -> bool:
    """Whether the codes are Q4_0/Q8_0 blocks already: symmetric ints, fp32 scales per 32, no smoothing."""
    if parts is None or getattr(m, "smooth", None) is not None:
        return False
    s = parts.spec
    return (s.element.kind == "int" and s.symmetric and s.scale_format == "fp32" and s.block_size == BLOCK
            and parts.global_scale is None and s.bits <= {"Q4_0": 4, "Q8_0": 8}[qtype])


def _tensors(model, qtype: str) -> list[_Tensor]:
    """Every tensor of the file, in module order, with llama.cpp's names."""
    gguf = _gguf()
    arch = _arch(model)
    cfg = model.config
    quantized_layers(model)  # refuses fake-quantized (unfrozen) layers
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, ARCHS[arch]), cfg.num_hidden_layers)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    # A float tie: llama.cpp then reuses token_embd for the output. (A TiedEmbedding's `weight` is its
    # whole table dequantized; its quantized head is written as a tensor of its own.)
    tied = not isinstance(emb, TiedEmbedding) and getattr(head, "weight", None) is emb.weight
    out = []
    for mname, m in model.named_modules():
        if (m is head and tied) or not (dict(m.named_parameters(recurse=False))
                                         or isinstance(m, (QuantLinear, TiedEmbedding))):
            continue
        base = names.get_name(mname)
        if base is None:
            raise LeanLMError(f"module '{mname}' has no llama.cpp tensor in the {arch} layout: "
                              "gguf export supports the stock llama/qwen2 model classes only")
        heads = None
        if arch == "llama" and base.endswith((".attn_q", ".attn_k")):
            heads = cfg.num_attention_heads if base.endswith(".attn_q") else cfg.num_key_value_heads
        if isinstance(m, (nn.Linear, QuantLinear, nn.Embedding, TiedEmbedding)):
            w, parts = _float_weight(m)
            if qtype in ("F16", "F32"):
                typ, how = qtype, "float"
            elif w.shape[1] % BLOCK:
                typ, how = "F16", "fallback_f16"
            elif _exact(m, parts, qtype):
                typ, how = qtype, "exact"
            else:
                typ, how = qtype, ("requantized" if parts is not None or getattr(m, "smooth", None) is not None
                                   else "quantized")
            out.append(_Tensor(base + ".weight", _permute(w, heads), typ, how, parts, heads))
        else:  # norms
            out.append(_Tensor(base + ".weight", m.weight.detach().float(), "F32", "float"))
        if getattr(m, "bias", None) is not None:
            out.append(_Tensor(base + ".bias", _permute(m.bias.detach().float(), heads), "F32", "float"))
    return out


def _encode(t: _Tensor) -> np.ndarray:
    """The tensor's bytes as gguf stores them ([rows, bytes] for block types)."""
    gguf = _gguf()
    typ = gguf.GGMLQuantizationType[t.type]
    if t.how != "exact":
        return gguf.quants.quantize(t.ref.contiguous().numpy(), typ)
    # Blocks straight from the codes: fp16 d, then the codes (Q4_0: nibble = code + 8, value j in the low
    # nibble of byte j and value j + 16 in its high nibble; Q8_0: int8). Rows are permuted after encoding:
    # a permutation of whole rows commutes with row-wise blocking.
    n, k = t.parts.values.shape
    codes = t.parts.values.reshape(n, k // BLOCK, BLOCK).numpy()
    d = t.parts.scale.numpy().astype(np.float16).reshape(n, k // BLOCK, 1).view(np.uint8)
    if t.type == "Q4_0":
        nib = (codes + 8).astype(np.uint8)
        qs = nib[..., : BLOCK // 2] | (nib[..., BLOCK // 2:] << np.uint8(4))
    else:
        qs = codes.astype(np.int8).view(np.uint8)
    return _permute(np.concatenate([d, qs], axis=-1).reshape(n, -1), t.heads)


def _bound(t: _Tensor) -> torch.Tensor:
    """Largest allowed |stored - ref| per element: fp16 rounding of values or scales, or the quantizer's step."""
    a = t.ref.abs()
    if t.type == "F32":
        return torch.full_like(a, ATOL)
    if t.type == "F16" or t.how == "exact":  # |code| * |s - fp16(s)| <= |w| * 2^-11
        return a * 2.0**-11 + ATOL
    n, k = a.shape
    amax = a.reshape(n, k // BLOCK, BLOCK).amax(-1, keepdim=True).expand(-1, -1, BLOCK).reshape(n, k)
    # Q8_0 rounds to half a step of amax/127; Q4_0's d = -max/8 clips the opposite extreme by a full step.
    step = 1 / 254 if t.type == "Q8_0" else 1 / 8
    return amax * (step + 2.0**-10) + ATOL


# ---------------------------------------------------------------------------------------------
# Tokenizer


def _tokenizer(tokenizer, n_vocab: int) -> dict:
    """llama.cpp's "gpt2" (byte-level BPE) vocabulary from a HF fast tokenizer's tokenizer.json."""
    gguf = _gguf()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise LeanLMError("gguf export supports byte-level BPE tokenizers (GPT-2 style tokenizer.json) only: "
                          "convert this model with llama.cpp's convert_hf_to_gguf.py")
    ids = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    ids.update({c: t["id"] for c, t in added.items()})
    if max(ids.values()) >= n_vocab:
        raise LeanLMError(f"the tokenizer has ids up to {max(ids.values())} but the model's embedding has only "
                          f"{n_vocab} rows: pass the model's own tokenizer")
    # Ids the tokenizer never produces (embedding padding) get llama.cpp's placeholder names.
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [int(gguf.TokenType.UNUSED)] * n_vocab
    for tok, i in ids.items():
        tokens[i] = tok
        kind = gguf.TokenType.NORMAL
        if tok in added:
            kind = gguf.TokenType.CONTROL if added[tok]["special"] else gguf.TokenType.USER_DEFINED
        types[i] = int(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": _pre_tokenizer(spec.get("pre_tokenizer"))}


def _pre_tokenizer(pre: dict | None) -> str:
    """llama.cpp's name for the pre-tokenizer's split regex (llama.cpp hashes encodings; we read the config)."""
    text = json.dumps(pre)
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # llama.cpp's name (LLAMA_VOCAB_PRE_TYPE_GPT2)
    if "Digits" in text and '"individual_digits": true' in text:
        return "smollm"  # GPT-2's split after one digit per piece
    if "\\\\p{N}{1,3}" in text:
        return "llama-bpe"
    if "\\\\p{N}|" in text:
        return "qwen2"
    return "default"


def _special_ids(model, tokenizer) -> dict:
    cfg = model.config

    def pick(name):  # config first: it names the ids generation stops on
        v = getattr(cfg, f"{name}_token_id", None)
        v = v[0] if isinstance(v, (list, tuple)) and v else v
        return v if isinstance(v, int) else getattr(tokenizer, f"{name}_token_id", None)

    return {k: pick(k) for k in ("bos", "eos", "pad")} | {"unk": getattr(tokenizer, "unk_token_id", None)}


# ---------------------------------------------------------------------------------------------
# Public


def write(model, tokenizer, out: Path, qtype: str | None = None) -> dict:
    """Write ``out/model.gguf``; return a summary (qtype, tensor counts per type and per method, bytes)."""
    gguf = _gguf()
    arch = _arch(model)
    qtype = _qtype(model, qtype)
    cfg = model.config
    tensors = _tensors(model, qtype)
    vocab = _tokenizer(tokenizer, model.get_input_embeddings().num_embeddings)
    path = Path(out) / FILE
    w = gguf.GGUFWriter(str(path), arch)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    w.add_name(Path(str(getattr(model, "leanlm_source", None) or cfg._name_or_path or "model")).name or "model")
    for add, value in ((w.add_context_length, cfg.max_position_embeddings), (w.add_embedding_length, cfg.hidden_size),
                       (w.add_block_count, cfg.num_hidden_layers), (w.add_feed_forward_length, cfg.intermediate_size),
                       (w.add_head_count, cfg.num_attention_heads), (w.add_head_count_kv, cfg.num_key_value_heads),
                       (w.add_key_length, head_dim), (w.add_value_length, head_dim),
                       (w.add_rope_dimension_count, head_dim), (w.add_layer_norm_rms_eps, cfg.rms_norm_eps),
                       (w.add_rope_freq_base, float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))),
                       (w.add_vocab_size, len(vocab["tokens"])), (w.add_file_type, QTYPES[qtype]),
                       (w.add_quantization_version, gguf.GGML_QUANT_VERSION)):
        add(value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    ids = _special_ids(model, tokenizer)
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id),
                     ("unk", w.add_unk_token_id)):
        if ids[key] is not None:
            add(ids[key])
    probe = tokenizer("a")["input_ids"]
    w.add_add_bos_token(bool(ids["bos"] is not None and probe and probe[0] == ids["bos"]))
    w.add_add_eos_token(False)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        w.add_chat_template(tokenizer.chat_template)
    for t in tensors:
        w.add_tensor(t.name, _encode(t), raw_dtype=gguf.GGMLQuantizationType[t.type])
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    dropped = sum(1 for q in quantized_layers(model).values() if q.input_spec or q.output_spec)
    return {"file": FILE, "architecture": arch, "qtype": qtype, "bytes": path.stat().st_size,
            "tensors": len(tensors), "types": dict(Counter(t.type for t in tensors)),
            "methods": dict(Counter(t.how for t in tensors)),
            "fallback_f16": [t.name for t in tensors if t.how == "fallback_f16"],
            "tokenizer_pre": vocab["pre"], "dropped_activation_quantizers": dropped}


def _read(path: Path):
    """A GGUFReader on `path`, or a LeanLMError if it is missing, malformed or truncated (parsed once: the
    reader walks every vocabulary string, seconds for a 50k vocabulary)."""
    gguf = _gguf()
    if not path.is_file():
        raise LeanLMError(f"'{path}' is missing: export again")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises assorted types on malformed input
        raise LeanLMError(f"'{path}' is not a readable GGUF file ({type(e).__name__}: {e}): export again") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise LeanLMError(f"'{path}' is truncated (tensor '{t.name}' ends past the file end): export again")
    return reader


def validate(out: Path, model, tokenizer) -> dict:
    """Read ``model.gguf`` back: every tensor's type, shape and values against the model; the vocabulary."""
    gguf = _gguf()
    path = Path(out) / FILE
    reader = _read(path)
    field = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")
             and k not in ("tokenizer.ggml.merges", "tokenizer.ggml.token_type")}
    if field.get("general.architecture") != _arch(model):
        raise LeanLMError(f"'{path}' is for architecture '{field.get('general.architecture')}', not "
                          f"'{_arch(model)}': export again")
    qtype = {v: k for k, v in QTYPES.items()}.get(field.get("general.file_type"))
    if qtype is None:
        raise LeanLMError(f"'{path}' has file type {field.get('general.file_type')}, not one leanlm writes: "
                          "export again")
    expected = {t.name: t for t in _tensors(model, qtype)}
    stored = {t.name: t for t in reader.tensors}
    if set(stored) != set(expected):
        diff = sorted(set(stored) ^ set(expected))
        raise LeanLMError(f"'{path}' does not hold the model's tensors (differs in {diff[:3]}): export again")
    errors: dict[str, float] = {}
    for name, t in expected.items():
        s = stored[name]
        shape = tuple(int(d) for d in reversed(s.shape))  # gguf lists dims innermost first
        if s.tensor_type.name != t.type or shape != tuple(t.ref.shape):
            raise LeanLMError(f"tensor '{name}' in '{path}' is {s.tensor_type.name} {list(shape)}, expected "
                              f"{t.type} {list(t.ref.shape)}: export again")
        got = torch.from_numpy(np.array(gguf.quants.dequantize(s.data, s.tensor_type), dtype=np.float32))
        err = (got.reshape(t.ref.shape).float() - t.ref).abs()
        if not bool((err <= _bound(t)).all()):  # written so that NaN fails
            raise LeanLMError(f"tensor '{name}' in '{path}' differs from the model's weight (max error "
                              f"{err.max().item():.3g} for {t.type}/{t.how}): export again")
        key = f"{t.type}/{t.how}"
        errors[key] = max(errors.get(key, 0.0), err.max().item())
    vocab = _tokenizer(tokenizer, model.get_input_embeddings().num_embeddings)
    if field.get("tokenizer.ggml.tokens") != vocab["tokens"]:
        raise LeanLMError(f"the vocabulary in '{path}' differs from the tokenizer's: export again")
    return {"tensors": len(expected), "qtype": qtype, "max_abs_error": errors, "vocab": len(vocab["tokens"])}
