"""compressed-tensors export: transformers (with the compressed-tensors package) loads what leanlm writes.

Logit agreement is measured as max |logits_hf - logits_leanlm| / max |logits_leanlm| (one number per model).
"""

from __future__ import annotations

import json

import pytest
import torch

import leanlm
from leanlm.errors import LeanLMError
from leanlm.export import export, verify_export
from leanlm.export.parts import quantized_layers
from tiny import tiny_llama

pytest.importorskip("compressed_tensors")
CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
W8A8 = {"name": "w8a8", "rules": [{"pattern": "*", "weight": {"format": "int8", "block_size": -1},
                                   "input": {"format": "int8", "block_size": 0}}]}
ASYM = {"name": "w4_asym",
        "rules": [{"pattern": "*", "weight": {"format": "int4", "block_size": 32, "symmetric": False}}]}


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(vocab))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _quantized(recipe, **kw):
    m = tiny_llama(**kw)
    return leanlm.quantize(m, recipe, calib=CALIB, progress=False)


def _load(out):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("recipe,fmt", [("w4a16_rtn_g64", "pack-quantized"), (ASYM, "pack-quantized"),
                                        ("w8a16", "pack-quantized"), ("fp8", "float-quantized"), ("fp8_dynamic", "float-quantized"),
                                        ("fp8_block_g64", "float-quantized"),
                                        (W8A8, "int-quantized"), ("w8a16_kv_fp8", "pack-quantized")])
def test_transformers_loads_and_matches(tmp_path, tok, recipe, fmt):
    m = _quantized(recipe)
    with torch.no_grad():
        ref = m(IDS).logits
    out = export(m, "compressed-tensors", tmp_path / "ct", tokenizer=tok)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == fmt and qcfg["ignore"] == ["lm_head"]
    assert (qcfg["kv_cache_scheme"] is not None) == ("kv" in str(recipe))
    manifest = verify_export(out)
    assert manifest["validation"]["max_rel_error"] == 0.0  # integer and FP8 layouts decode bit-exactly
    with torch.no_grad():
        got = _load(out)(IDS).logits
    assert _rel(got, ref) <= 1e-2  # in practice 0.0: CT dequantizes, and fake-quantizes inputs / KV, identically


@pytest.mark.parametrize("recipe", ["nvfp4", "mxfp4"])
def test_fp4_weights_through_ct_decompression(tmp_path, tok, recipe):
    """CT decompresses FP4 to bfloat16 on CPU (the float32 model then cannot run its forward), and its dynamic
    FP4 activation scales round differently from leanlm's: compare the decompressed weights, then the
    weight-only logits with activation quantization off on both sides."""
    m = _quantized(recipe)
    out = export(m, "compressed-tensors", tmp_path / "ct", tokenizer=tok)
    hf = _load(out)
    hf.hf_quantizer.compressor.decompress_model(hf)
    layers = quantized_layers(m)
    for name, q in layers.items():
        lin = hf.get_submodule(name)
        assert _rel(lin.weight, q._dequantize_frozen()) <= 1e-2  # nvfp4: ~3e-3 (bf16 scale / global scale)
        lin.weight.data = lin.weight.data.float()
        lin.quantization_enabled = False
        q.input_spec = None
    with torch.no_grad():
        assert _rel(hf(IDS).logits, m(IDS).logits) <= 1e-2


def test_shared_smoothing_is_folded_into_norms(tmp_path, tok):
    m = leanlm.quantize(tiny_llama(), "w8a16", progress=False, freeze=False)
    g = torch.Generator().manual_seed(3)
    for i, layer in enumerate(m.model.layers):
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            parent = layer.self_attn if group[0] == "q_proj" else layer.mlp
            s = torch.rand(64, generator=g) + 0.5
            for n in group:
                getattr(parent, n).apply_smooth(s)
    leanlm.freeze_model(m)
    with torch.no_grad():
        ref = m(IDS).logits
    out = export(m, "compressed-tensors", tmp_path / "ct", tokenizer=tok)
    summary = json.loads((out / "leanlm_export.json").read_text())["summary"]
    assert len(summary["folded_norms"]) == 4
    with torch.no_grad():
        assert _rel(_load(out)(IDS).logits, ref) <= 1e-4


def test_awq_smoothing_is_refused(tmp_path, tok):
    m = _quantized("w4a16_awq_g64")
    with pytest.raises(LeanLMError, match="AWQ/SmoothQuant input scales.*--format modelopt"):
        export(m, "compressed-tensors", tmp_path / "ct", tokenizer=tok)
    assert not (tmp_path / "ct").exists()


def test_partial_group_is_refused(tmp_path, tok):
    """transformers loads ceil(K/g) scales but compressed-tensors' dequantize raises on K % g != 0 (and vLLM's
    kernels need whole groups), so a padded last group cannot be exported."""
    m = _quantized("w4a16_rtn")  # groups of 128 on in_features 64
    with pytest.raises(LeanLMError, match="in_features 64.*group size 128.*w4a16_rtn_g64"):
        export(m, "compressed-tensors", tmp_path / "ct", tokenizer=tok)


def test_corrupt_export_is_detected(tmp_path, tok):
    out = export(_quantized("w4a16_rtn_g64"), "compressed-tensors", tmp_path / "ct", tokenizer=tok)
    f = out / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(LeanLMError, match="corrupt"):
        verify_export(out)
    with pytest.raises(LeanLMError, match="corrupt"):  # leanlm.load refuses it too
        leanlm.load(out)


@pytest.mark.slow
def test_default_model_w4a16_g64(tmp_path, default_model_dir):
    m, tok = leanlm.load(default_model_dir)
    leanlm.quantize(m, "w4a16_rtn_g64", progress=False)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = m(ids).logits
    out = export(m, "compressed-tensors", tmp_path / "ct", tokenizer=tok)
    with torch.no_grad():
        assert _rel(_load(out)(ids).logits, ref) <= 1e-2
