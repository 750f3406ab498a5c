"""Model Optimizer unified checkpoint export: layout, scales, validation, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import leanlm
from leanlm.errors import LeanLMError
from leanlm.export import export, verify_export
from leanlm.export.modelopt import read_weight
from leanlm.quant.linear import QuantLinear
from tiny import tiny_llama

CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


class _Tok:
    """Stands in for a tokenizer: export only saves it (and NVFP4 reads calibration text through it)."""

    def __call__(self, text, **kw):
        return {"input_ids": [ord(c) % 256 for c in text]}

    def save_pretrained(self, out):
        (out / "tokenizer_config.json").write_text("{}")


def _quantized(recipe):
    model = tiny_llama()
    leanlm.quantize(model, recipe, calib=CALIB, progress=False)
    return model


@pytest.mark.parametrize("recipe,algo", [("w4a16_awq_g64", "W4A16_AWQ"), ("w4a16_rtn_g64", "W4A16_AWQ"),
                                         ("fp8_kv_fp8", "FP8"), ("nvfp4", "NVFP4")])
def test_export_layout_decodes_to_our_weights(tmp_path, recipe, algo, monkeypatch):
    import leanlm.data

    monkeypatch.setattr(leanlm.data, "split_text", lambda source, split: "calibration text " * 400)
    model = _quantized(recipe)
    out = export(model, "modelopt", tmp_path / "mo", tokenizer=_Tok())
    cfg = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert cfg["quant_algo"] == algo and "lm_head" in cfg["exclude_modules"]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "modelopt"
    manifest = verify_export(out)
    assert manifest["validation"]["max_rel_error"] < 1e-6
    q = model.model.layers[1].mlp.down_proj
    name = "model.layers.1.mlp.down_proj"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        w = read_weight(f, name, algo, q.out_features, q.in_features)
        x = torch.randn(3, q.in_features)
        if algo == "W4A16_AWQ":  # the runtime's product: (x * pre_quant_scale) @ W.T
            assert f.get_tensor(f"{name}.weight").shape == (q.out_features // 2, q.in_features)
            y = (x * f.get_tensor(f"{name}.pre_quant_scale")) @ w.T
            torch.testing.assert_close(y, q(x), rtol=1e-4, atol=1e-5)
        if algo == "FP8":
            assert f.get_tensor(f"{name}.weight").dtype == torch.float8_e4m3fn
            assert f.get_tensor("model.layers.0.self_attn.k_proj.k_scale").numel() == 1
            assert cfg["kv_cache_quant_algo"] == "FP8"
        if algo == "NVFP4":
            assert f.get_tensor(f"{name}.weight_scale").dtype == torch.float8_e4m3fn
            assert float(f.get_tensor(f"{name}.input_scale")) > 0
        assert "model.embed_tokens.weight" in f.keys() and "lm_head.weight" not in f.keys()  # tied


def test_smoothing_is_written_as_pre_quant_scale(tmp_path):
    model = _quantized("w4a16_awq_g64")
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.smooth is not None
    out = export(model, "modelopt", tmp_path / "mo", tokenizer=_Tok())
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        pqs = f.get_tensor("model.layers.0.self_attn.q_proj.pre_quant_scale")
    torch.testing.assert_close(pqs, 1 / q.smooth)


def test_formats_without_a_modelopt_equivalent_are_refused(tmp_path):
    with pytest.raises(LeanLMError, match="no Model Optimizer equivalent"):
        export(_quantized("mxfp4"), "modelopt", tmp_path / "mx", tokenizer=_Tok())
    assert not (tmp_path / "mx").exists()
    with pytest.raises(LeanLMError, match="not quantized"):
        export(tiny_llama(), "modelopt", tmp_path / "f", tokenizer=_Tok())
    with pytest.raises(LeanLMError, match="unknown export format"):
        export(tiny_llama(), "onnx", tmp_path / "o", tokenizer=_Tok())


def test_partial_export_is_refused(tmp_path):
    out = export(_quantized("w4a16_rtn_g64"), "modelopt", tmp_path / "mo", tokenizer=_Tok())
    (out / "leanlm_export.json").unlink()
    with pytest.raises(LeanLMError, match="not a finished leanlm export"):
        verify_export(out)
