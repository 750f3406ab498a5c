"""Integration on the real default model (SmolLM2-135M): conversion, reference perplexity, demo."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import leanlm
from leanlm.demo import run_demo

pytestmark = pytest.mark.slow


def test_converted_folder_is_a_plain_hf_model(default_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(default_model_dir)
    assert config.model_type == "llama" and config.hidden_size == 576 and config.num_hidden_layers == 30
    assert not hasattr(config, "quantization_config")
    assert (default_model_dir / "model.safetensors").is_file()


def test_convert_command_matches_cached_conversion(tmp_path, default_model_dir):
    from safetensors.torch import load_file

    src = json.loads((default_model_dir / "leanlm_source.json").read_text())["converted_from"]
    out = leanlm.convert_gguf(src, tmp_path / "smol")
    a, b = load_file(out / "model.safetensors"), load_file(default_model_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_perplexity_reproduced_by_plain_transformers(default_model, default_model_dir):
    """The same windows over the same tokens, scored by a few lines of plain transformers code."""
    model, tok = default_model
    # Four windows check the windowing and scoring as well as the demo's sixteen would, at a quarter of the time.
    ours = leanlm.evaluate(model, tok, data="wiki", max_tokens=2048, window=512, progress=False)

    from transformers import AutoModelForCausalLM

    ids, _ = leanlm.eval_tokens(tok, "wiki", 2048)
    ref_model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    nll, n = 0.0, 0
    for b in range(0, len(ids) - 1, 512):  # each window predicts its next 512 tokens
        x = ids[b:b + 512][None]
        y = ids[b + 1:b + 513][None]
        x = x[:, :y.shape[1]]
        with torch.no_grad():
            logits = ref_model(x).logits
        nll += F.cross_entropy(logits[0], y[0], reduction="sum").item()
        n += y.shape[1]
    ref_ppl = math.exp(nll / n)
    assert n == ours["scored_tokens"]
    assert f"{ours['perplexity']:.4g}" == f"{ref_ppl:.4g}"
    assert 5 < ours["perplexity"] < 40  # a sane SmolLM2 on Wikipedia text


def test_demo_pipeline_small_budget(tmp_path):
    out = run_demo(max_tokens=512, speed=False, out=tmp_path / "demo", progress=False, echo=lambda *_: None)
    names = [r["name"] for r in out["results"]]
    assert names == ["float32", "w8a16", "w4a16_rtn"]
    base, w8, w4 = (r["perplexity"] for r in out["results"])
    assert abs(w8 / base - 1) < 0.02  # INT8 per-channel is nearly lossless
    assert w4 > w8  # INT4 loses more
    sizes = [r["weight_bytes"] for r in out["results"]]
    assert sizes[0] > sizes[1] > sizes[2]
    for key in ("json", "md", "html"):
        assert out["paths"][key].is_file()
    assert "<svg" in out["paths"]["html"].read_text()
