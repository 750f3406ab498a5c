"""Recipes, attaching quantizers, weight-only RTN, calibration of static inputs, save/restore."""

from __future__ import annotations

import json

import pytest
import torch

import leanlm
from leanlm.errors import LeanLMError
from leanlm.eval.size import parameter_count, weight_bytes
from leanlm.quant.api import quantize
from leanlm.quant.formats import QuantSpec
from leanlm.quant.linear import QuantLinear
from leanlm.quant.recipes import PRESETS, get_recipe, recipe_from_dict

from tiny import tiny_llama

IDS = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_rule_precedence_and_exclusion():
    r = recipe_from_dict({"rules": [
        {"pattern": "*", "weight": "int4"},
        {"pattern": "*.o_proj", "weight": "int8"},
        {"pattern": "model.layers.0.*", "enable": False},
    ]})
    assert r.layer_specs("model.layers.1.self_attn.q_proj")[0].format == "int4"
    assert r.layer_specs("model.layers.1.self_attn.o_proj")[0].format == "int8"
    assert r.layer_specs("model.layers.0.self_attn.o_proj") is None
    assert r.layer_specs("lm_head") is None  # excluded by default


def test_named_spec_with_overrides():
    r = recipe_from_dict({"rules": [{"pattern": "*", "weight": {"format": "int4", "block_size": 32}}]})
    assert r.layer_specs("x")[0] == QuantSpec("int4", block_size=32)


@pytest.mark.parametrize("bad,match", [
    ({"rules": [{"pattern": "*", "weight": "int5"}]}, "unknown spec 'int5'"),
    ({"rules": [{"pattern": "*", "weight": {"format": "int4", "group": 64}}]}, r"unknown key\(s\) \['group'\]"),
    ({"rules": [{"pattern": "*", "wieght": "int4"}]}, r"unknown key\(s\) \['wieght'\]"),
    ({"rules": [{"pattern": "*", "weight": "int4"}], "algo": "rtn"}, r"unknown key\(s\) \['algo'\]"),
    ({"rules": [{"pattern": "*", "weight": "int4"}], "algorithm": "magic"}, "unknown algorithm 'magic'"),
    ({"rules": []}, "has no rules"),
])
def test_recipe_errors_are_never_ignored(bad, match):
    with pytest.raises(LeanLMError, match=match):
        recipe_from_dict(bad)


def test_recipe_from_yaml_file(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("description: test\nrules:\n  - pattern: '*'\n    weight: {format: int8, block_size: 32}\n")
    assert get_recipe(str(f)).layer_specs("a.b")[0] == QuantSpec("int8", block_size=32)
    f.write_text("rules: [unclosed")
    with pytest.raises(LeanLMError, match="does not parse"):
        get_recipe(str(f))
    with pytest.raises(LeanLMError, match="unknown recipe"):
        get_recipe("no-such-recipe")


CALIB = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(5))


def _tolerance(preset: str) -> float:
    if preset.startswith(("w8", "fp8", "int8", "mxfp8")):
        return 0.1
    return 0.4


@pytest.mark.parametrize("preset", sorted(p for p in PRESETS if "_kv_" not in p or p.startswith("w8a16")))
def test_presets_quantize_tiny_model(preset):
    model = tiny_llama()
    ref = _logits(model)
    float_bytes = weight_bytes(model)
    params = parameter_count(model)
    quantize(model, preset, calib=CALIB, progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 2 * 7 and all(m.frozen for m in layers)
    assert type(model.lm_head) is torch.nn.Linear
    out = _logits(model)
    err = (out - ref).norm() / ref.norm()
    assert 0 < err < _tolerance(preset), err
    assert weight_bytes(model) < float_bytes
    assert parameter_count(model) == params


def test_int4_storage_is_packed():
    model = tiny_llama()
    quantize(model, "w4a16_rtn_g64", progress=False)
    q = model.model.layers[0].mlp.down_proj  # in 128, out 64
    assert q.weight_codes.dtype == torch.uint8 and q.weight_codes.numel() == 64 * 128 // 2
    assert q.weight_scale.shape == (64, 2, 1)


def test_save_load_roundtrip_restores_without_recalibrating(tmp_path, tiny_model_dir):
    model, tok = leanlm.load(tiny_model_dir)
    quantize(model, "w4a16_rtn", progress=False)
    ref = _logits(model)
    out = leanlm.save(model, tok, tmp_path / "q")
    state = json.loads((out / "leanlm_quant.json").read_text())
    assert state["recipe"]["name"] == "w4a16_rtn" and len(state["layers"]) == 14
    again, _ = leanlm.load(out, packed=False)  # the fake-quant twin: exactly the saved model
    assert all(m.frozen for m in again.modules() if isinstance(m, QuantLinear))
    torch.testing.assert_close(_logits(again), ref)
    assert again.leanlm_recipe.name == "w4a16_rtn"


def test_static_input_quantization_needs_and_uses_calibration(tmp_path, tiny_model_dir):
    recipe = {"rules": [{"pattern": "*", "weight": "int8", "input": {"format": "int8", "block_size": 0}}]}
    model = tiny_llama()
    with pytest.raises(LeanLMError, match="pass calibration data"):
        quantize(model, recipe, progress=False)
    model = tiny_llama()
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(3))
    quantize(model, recipe, calib=calib, progress=False)
    q = model.model.layers[1].self_attn.q_proj
    assert q.input_amax is not None and q.input_amax.numel() == 1 and float(q.input_amax) > 0
    err = (_logits(model) - _logits(tiny_llama())).norm() / _logits(tiny_llama()).norm()
    assert err < 0.1


def test_quantizing_twice_is_an_error():
    model = tiny_llama()
    quantize(model, "w8a16", progress=False)
    with pytest.raises(LeanLMError, match="already quantized"):
        quantize(model, "w8a16", progress=False)


def test_recipe_selecting_nothing_is_an_error():
    with pytest.raises(LeanLMError, match="selects no linear layer"):
        quantize(tiny_llama(), {"rules": [{"pattern": "nothing.*", "weight": "int8"}]}, progress=False)


@pytest.mark.parametrize("preset", ["w4a16_awq_kv_fp8", "int8_sq", "nvfp4_awq_kv_nvfp4"])
def test_preset_round_trips_through_its_dict(preset):
    r = PRESETS[preset]
    again = recipe_from_dict(r.to_dict())
    assert again.to_dict() == r.to_dict()


def test_recipe_options_are_validated():
    with pytest.raises(LeanLMError, match=r"unknown option\(s\) \['alhpa'\]"):
        recipe_from_dict({"rules": [{"pattern": "*", "weight": "int8"}], "options": {"alhpa": 0.5}})
    with pytest.raises(LeanLMError, match="alpha"):
        recipe_from_dict({"rules": [{"pattern": "*", "weight": "int8"}], "options": {"alpha": 2}})
    with pytest.raises(LeanLMError, match="act_calibration"):
        recipe_from_dict({"rules": [{"pattern": "*", "weight": "int8"}], "options": {"act_calibration": "avg"}})
