"""PTQ algorithms on a layer with planted outlier channels: each must beat round-to-nearest."""

from __future__ import annotations

import pytest
import torch

import leanlm
from leanlm.quant.api import quantize
from leanlm.quant.calib import RangeObserver, search_clip
from leanlm.quant.formats import QuantSpec, compute_qparams, quant_dequant
from leanlm.quant.gptq import gptq
from leanlm.quant.kv import KVQuantizer
from leanlm.quant.linear import QuantLinear
from leanlm.quant.sequential import capture_inputs, decoder_layers
from leanlm.quant.smoothing import awq_scale, smoothquant_scale, smoothquant_search
from tiny import tiny_gemma3, tiny_llama

INT4_G32 = QuantSpec("int4", block_size=32)
INT8_ROW = QuantSpec("int8", block_size=-1)
INT8_TENSOR = QuantSpec("int8", block_size=0)


@pytest.fixture(scope="module")
def outlier_layer():
    """Weights [64, 128] and inputs [2048, 128] with correlated features and 4 planted outlier channels."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g) * 0.05
    x = torch.randn(2048, 16, generator=g) @ torch.randn(16, 128, generator=g) + 0.2 * torch.randn(2048, 128, generator=g)
    x[:, [3, 40, 77, 100]] *= 30.0
    return w, x


def _out_err(x, w, wq):
    return ((x @ (wq - w).T) ** 2).mean().item()


def test_gptq_beats_rtn(outlier_layer):
    w, x = outlier_layer
    rtn = _out_err(x, w, quant_dequant(w, INT4_G32))
    for act_order in (False, True):
        wq, qp = gptq(w, x.T @ x, INT4_G32, act_order=act_order)
        assert _out_err(x, w, wq) < 0.5 * rtn
        assert torch.allclose(quant_dequant(wq, INT4_G32, qp), wq, atol=1e-6)  # lies on the saved grid
    # Starting from MSE-clipped scales: GPTQ keeps them, and still beats RTN on those same scales.
    start = search_clip(w, INT4_G32)
    wq, qp = gptq(w, x.T @ x, INT4_G32, qparams=start)
    assert torch.equal(qp.scale, start.scale)
    assert _out_err(x, w, wq) < 0.5 * _out_err(x, w, quant_dequant(w, INT4_G32, start))


def test_awq_beats_rtn(outlier_layer):
    w, x = outlier_layer
    rtn = _out_err(x, w, quant_dequant(w, INT4_G32))
    s = awq_scale(w, INT4_G32, x.abs().mean(0), x.T @ x / len(x))
    wq = quant_dequant(w * s, INT4_G32) / s
    assert _out_err(x, w, wq) < 0.8 * rtn
    xs = x / s
    qp = search_clip(w * s, INT4_G32, gram=xs.T @ xs / len(xs))
    clipped = quant_dequant(w * s, INT4_G32, qp) / s
    assert _out_err(x, w, clipped) <= _out_err(x, w, wq)


@pytest.mark.parametrize("block", [32, 48, -1, 0])
def test_clip_search_on_sample_rows_equals_it_on_their_second_moment(block):
    """Judging clipping by E[x^T x] is exact: the same choice as on the rows themselves, partial
    blocks (48 does not divide 128), per-channel and per-tensor included."""
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(16, 128, generator=g), torch.randn(200, 128, generator=g) * torch.rand(128, generator=g) * 4
    spec = QuantSpec("int4", block_size=block)
    a, b = search_clip(w, spec, x=x), search_clip(w, spec, gram=x.T @ x / len(x))
    assert torch.equal(a.scale, b.scale)
    if block:  # per block, the inputs change some choices (per tensor, one choice may well agree)
        assert not torch.equal(a.scale, search_clip(w, spec).scale)


def test_clip_search_never_worsens_a_row_under_correlated_inputs():
    """Per-block choices judged on their diagonal slice of E[x^T x] can add up to a worse row when the
    inputs are correlated across blocks (here they do, without the row check): no row ends worse
    than unclipped under the whole matrix, and the layer's error falls."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(64, 128, generator=g)
    x = torch.randn(4000, 4, generator=g) @ torch.randn(4, 128, generator=g) + 0.05 * torch.randn(4000, 128, generator=g)
    gram = x.T @ x / len(x)

    def row_err(qp):
        d = quant_dequant(w, INT4_G32, qp) - w
        return ((d @ gram) * d).sum(-1)

    plain, clipped = row_err(compute_qparams(w, INT4_G32)), row_err(search_clip(w, INT4_G32, gram=gram))
    assert (clipped <= plain).all() and clipped.sum() < 0.5 * plain.sum()


def test_smoothquant_beats_plain_w8a8(outlier_layer):
    w, x = outlier_layer

    def w8a8(s):
        return quant_dequant(x / s, INT8_TENSOR) @ quant_dequant(w * s, INT8_ROW).T

    ref = x @ w.T
    plain = ((w8a8(torch.ones(128)) - ref) ** 2).mean()
    smoothed = ((w8a8(smoothquant_scale(x.abs().amax(0), w, 0.5)) - ref) ** 2).mean()
    searched = ((w8a8(smoothquant_search(x.abs().amax(0), w, INT8_ROW, INT8_TENSOR, x)) - ref) ** 2).mean()
    assert smoothed < 0.5 * plain
    assert searched <= smoothed * 1.0001


@pytest.mark.parametrize("outliers", [30.0, 3.0, 1.0])
def test_smoothquant_search_walk_matches_the_whole_grid(outlier_layer, outliers):
    """The walk down from alpha 1 picks what the whole coarse grid plus its refinement picks."""
    w, x = outlier_layer
    x = x.clone()
    x[:, [3, 40, 77, 100]] *= outliers / 30.0
    amax = x.abs().amax(0)

    def err(a):
        s = smoothquant_scale(amax, w, a)
        return ((quant_dequant(x / s, INT8_TENSOR) @ quant_dequant(w * s, INT8_ROW).T - x @ w.T) ** 2).mean()

    coarse = min((0.0, 0.25, 0.5, 0.75, 1.0), key=err)
    best = min([a for a in (coarse - 0.125, coarse, coarse + 0.125) if 0 <= a <= 1], key=err)
    torch.testing.assert_close(smoothquant_search(amax, w, INT8_ROW, INT8_TENSOR, x), smoothquant_scale(amax, w, best))


def test_block_fp8_confines_outlier_channels(outlier_layer):
    """fp8_block's activation layout: a block's maximum maps exactly onto E4M3's 448, and with groups along
    the input dim each outlier channel is its group's maximum, so the values that dominate the output
    error are the ones kept exact (here under a fifth of the per-token error)."""
    w, x = outlier_layer
    ref = x @ w.T

    def err(g):
        return ((quant_dequant(x, QuantSpec("fp8_e4m3", block_size=g, dynamic=True)) @ w.T - ref) ** 2).mean()

    assert err(32) < 0.2 * err(-1)


def test_mse_weight_clipping_reduces_weight_error():
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(1))
    w[0, 0] = 20.0  # one outlier inflates its block's range
    spec = QuantSpec("int4", block_size=64)
    plain = (quant_dequant(w, spec) - w).pow(2).sum()
    assert (quant_dequant(w, spec, search_clip(w, spec)) - w).pow(2).sum() < plain


@pytest.mark.parametrize("method", ["max", "percentile", "mse"])
def test_range_observers(method):
    obs = RangeObserver(INT8_TENSOR, method, percentile=99.0)
    g = torch.Generator().manual_seed(2)
    for _ in range(4):
        obs.observe(torch.randn(64, 32, generator=g))
    obs.observe(torch.tensor([[50.0] + [0.0] * 31]))  # one outlier
    amax = float(obs.amax())
    assert amax == 50.0 if method == "max" else 1.0 < amax < 50.0


def test_percentile_needs_per_tensor_spec():
    with pytest.raises(leanlm.LeanLMError, match="per-tensor"):
        RangeObserver(INT8_ROW, "percentile")


def test_capture_inputs_records_every_layer_and_stops_early():
    model = tiny_llama(layers=3)
    layers = decoder_layers(model)
    calls = []
    layers[2].register_forward_hook(lambda *a: calls.append(1))
    batches = torch.randint(0, 256, (3, 4, 16), generator=torch.Generator().manual_seed(0))
    captured = capture_inputs(model, layers, lambda m: [m(b, use_cache=False) for b in batches])
    assert len(captured.hidden) == 3 and captured.hidden[0].shape == (4, 16, 64)
    assert all(k is not None for k in captured.kwargs)
    assert len(calls) == 0  # the first call stops at the last layer, later ones at the first


def test_forward_loop_contract():
    model = tiny_llama()
    data = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(4))
    quantize(model, "w4a16_awq", calib=lambda m: m(data, use_cache=False), progress=False)
    assert all(q.frozen and q.smooth is not None for q in model.modules() if isinstance(q, QuantLinear))
    with pytest.raises(leanlm.LeanLMError, match="never ran the model"):
        quantize(tiny_llama(), "w4a16_awq", calib=lambda m: None, progress=False)


@pytest.mark.parametrize("preset", ["int8_sq_kv_fp8", "w4a16_awq_kv_nvfp4", "w4a16_gptq", "fp8"])
def test_calibrated_state_survives_save_and_load(preset, tmp_path, tiny_model_dir):
    model, tok = leanlm.load(tiny_model_dir)
    calib = torch.randint(0, 1000, (8, 32), generator=torch.Generator().manual_seed(6))
    quantize(model, preset, calib=calib, progress=False)
    ids = calib[:2]
    with torch.no_grad():
        ref = model(ids).logits
    out = leanlm.save(model, tok, tmp_path / "q")
    again, _ = leanlm.load(out, packed=False)  # the saved state exactly (packed kernels compute in bf16)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ref)
    if "_kv_" in preset:
        kvs = [m for m in again.modules() if isinstance(m, KVQuantizer)]
        assert len(kvs) == 2 and all(k.k_amax is not None for k in kvs)


def test_kv_quantization_changes_attention_but_little():
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(ids).logits
    quantize(model, {"rules": [{"pattern": "*.q_proj", "weight": "int8"}], "kv_cache": "int8"}, calib=ids,
             progress=False)
    with torch.no_grad():
        out = model(ids).logits
    err = ((out - ref).norm() / ref.norm()).item()
    assert 0 < err < 0.05
    assert float(model.model.layers[0].self_attn.leanlm_kv.k_amax) > 0


def test_nvfp4_global_amax_override():
    x = torch.randn(4, 32)
    spec = QuantSpec("fp4_e2m1", block_size=16, scale_format="e4m3")
    a = compute_qparams(x, spec)
    b = compute_qparams(x[:2], spec, global_amax=x.abs().amax())
    assert torch.equal(a.global_scale, b.global_scale)


@pytest.fixture
def range_passes(monkeypatch):
    """A list that grows by one at every range pass (`calibrate_ranges`) of a layer."""
    import leanlm.quant.ptq as ptq

    calls = []
    real = ptq.calibrate_ranges
    monkeypatch.setattr(ptq, "calibrate_ranges", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_non_sequential_calibration_takes_ranges_from_the_statistics_pass(range_passes):
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(9))
    ranged = range_passes
    seq, fast = tiny_llama(layers=2), tiny_llama(layers=2)
    quantize(seq, "int8_sq", calib=calib, progress=False)
    quantize(fast, {"name": "sq_fast", "rules": [{"pattern": "*", "weight": {"format": "int8", "block_size": -1},
                                                  "input": {"format": "int8", "block_size": 0}}],
                    "algorithm": "smoothquant", "options": {"sequential": False}}, calib=calib, progress=False)
    assert ranged == []  # max ranges come straight from the statistics, in both modes
    first = dict(seq.model.layers[0].named_modules()), dict(fast.model.layers[0].named_modules())
    q = "self_attn.q_proj"  # the layer's first input: the same in both modes
    torch.testing.assert_close(first[1][q].smooth, first[0][q].smooth)
    torch.testing.assert_close(first[1][q].input_amax, first[0][q].input_amax)
    # Sequential: o_proj sees the quantized q/k/v's outputs; not sequential: the float layer's.
    assert not torch.equal(first[0]["self_attn.o_proj"].smooth, first[1]["self_attn.o_proj"].smooth)
    assert not torch.equal(seq.model.layers[1].self_attn.q_proj.smooth, fast.model.layers[1].self_attn.q_proj.smooth)
    with torch.no_grad():
        ref, a, b = tiny_llama(layers=2)(calib).logits, seq(calib).logits, fast(calib).logits
    assert (b - ref).pow(2).mean() < 2 * (a - ref).pow(2).mean()
    quantize(tiny_llama(layers=2), {"name": "kv", "rules": [{"pattern": "*", "input": {"format": "int8", "block_size": 0}}],
                                    "algorithm": "smoothquant", "kv_cache": "fp8", "options": {"sequential": False}},
             calib=calib, progress=False)
    assert len(ranged) == 2  # a KV cache's ranges still need the pass
    with pytest.raises(leanlm.LeanLMError, match="sequential"):
        quantize(tiny_llama(), {"name": "x", "rules": [{"pattern": "*", "weight": "int8"}], "options": {"sequential": "no"}})


def _static_input_maxima(model, calib) -> dict[str, torch.Tensor]:
    """max |x / smooth| at every static-input QuantLinear over a forward of `model` on `calib`."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(mod, args):
            x = args[0] if mod.smooth is None else args[0] / mod.smooth
            seen[name] = torch.maximum(seen.get(name, torch.tensor(0.0)), x.abs().amax())
        return fn

    for n, m in model.named_modules():
        if isinstance(m, QuantLinear) and m.input_spec is not None and not m.input_spec.dynamic:
            m.register_forward_pre_hook(hook(n))
    with torch.no_grad():
        for i in range(0, len(calib), 8):
            model(calib[i:i + 8], use_cache=False)
    return seen


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_sequential_calibration_sees_the_quantized_model_group_by_group(make):
    """Each group of linears is calibrated on the quantized groups before it, in the layer too: every
    static input range equals the maximum the finished quantized model feeds that linear."""
    calib = torch.randint(0, 256, (16, 24), generator=torch.Generator().manual_seed(5))
    model = make(layers=2)
    quantize(model, "int8_sq", calib=calib, progress=False)
    seen = _static_input_maxima(model, calib)
    assert len(seen) == 14
    for n, m in model.named_modules():
        if n in seen:
            torch.testing.assert_close(m.input_amax.reshape(()), seen[n], rtol=1e-5, atol=1e-6, msg=n)


def test_sequential_calibration_runs_each_part_of_a_layer_once_per_batch(monkeypatch):
    """Replaying finished modules' outputs: every projection's matrix product, the attention and the
    norms run once per calibration batch (plus a one-sequence probe), not once per stage."""
    import transformers.integrations.sdpa_attention as sdpa
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    calib = torch.randint(0, 256, (16, 24), generator=torch.Generator().manual_seed(5))
    model = tiny_llama(layers=2)
    products, attention, norms = [], [], []
    real_linear, real_sdpa, real_norm = torch.nn.functional.linear, sdpa.sdpa_attention_forward, LlamaRMSNorm.forward
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, *a: products.append(x.shape[0]) or real_linear(x, *a))
    monkeypatch.setattr(LlamaRMSNorm, "forward", lambda m, x: norms.append(x.shape[0]) or real_norm(m, x))
    monkeypatch.setattr(sdpa, "sdpa_attention_forward", lambda m, q, *a, **k: attention.append(q.shape[0]) or
                        real_sdpa(m, q, *a, **k))
    quantize(model, {"name": "w8a8", "rules": [{"pattern": "*", "weight": {"format": "int8", "block_size": -1},
                                                "input": {"format": "int8", "block_size": 0}}],
                     "algorithm": "smoothquant", "options": {"alpha": 0.5}}, calib=calib, progress=False)
    batches = 2 * 2  # calibration batches of 8, two layers
    assert sorted(attention) == [8] * batches  # the probe (batch 1) runs plain SDPA, outside the replay
    assert products.count(8) == 7 * batches and products.count(1) == 7 * 2
    assert norms.count(8) == 2 * batches  # input and post-attention norms


def test_staged_option_decides_whether_a_layer_is_calibrated_in_stages(monkeypatch):
    """auto: in stages where the layer quantizes activations, else from one float pass of the layer."""
    import leanlm.quant.ptq as ptq
    from leanlm.quant.recipes import get_recipe

    staged, real = [], ptq.LayerStages
    monkeypatch.setattr(ptq, "LayerStages", lambda *a, **k: staged.append(1) or real(*a, **k))
    calib = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(2))
    quantize(tiny_llama(layers=2), "w4a16_gptq", calib=calib, progress=False)
    assert staged == []
    quantize(tiny_llama(layers=2), "int8_sq", calib=calib, progress=False)
    assert len(staged) == 2
    forced = get_recipe("w4a16_gptq").to_dict()
    forced["options"]["staged"] = True
    quantize(tiny_llama(layers=2), forced, calib=calib, progress=False)
    assert len(staged) == 4
    with pytest.raises(leanlm.LeanLMError, match="staged"):
        quantize(tiny_llama(), {"name": "x", "rules": [{"pattern": "*", "weight": "int8"}], "options": {"staged": "yes"}})


def test_replayed_call_is_recomputed_after_an_in_place_change():
    from leanlm.quant.staged import CallCache, _Budget

    cache, calls = CallCache(_Budget()), []
    compute = lambda: calls.append(1) or torch.ones(3)  # noqa: E731
    first = cache(compute)
    cache.calls = 0
    assert cache(compute) is first and len(calls) == 1
    first.add_(1)  # a consumer changed the replayed tensor
    cache.calls = 0
    assert torch.equal(cache(compute), torch.ones(3)) and len(calls) == 2


def test_sequential_calibration_refuses_a_linear_that_never_runs():
    model = tiny_llama(layers=1)
    model.model.layers[0].mlp.unused = torch.nn.Linear(64, 64)
    with pytest.raises(leanlm.LeanLMError, match="mlp.unused.*never runs"):
        quantize(model, "int8_sq", calib=torch.randint(0, 256, (8, 16)), progress=False)


def test_non_sequential_rtn_calibration_feeds_float_activations(range_passes):
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
    ranged = range_passes
    ref, model = tiny_llama(layers=2), tiny_llama(layers=2)
    seen = []
    ref.model.layers[1].self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().amax()))
    with torch.no_grad():
        for row in calib:
            ref(row[None])
    quantize(model, {"name": "fp8_fast", "rules": [{"pattern": "*", "weight": {"format": "fp8_e4m3", "block_size": 0},
                                                    "input": {"format": "fp8_e4m3", "block_size": 0}}],
                     "algorithm": "rtn", "options": {"sequential": False}}, calib=calib, progress=False)
    assert ranged == []  # the ranges come from the float pass
    # Layer 1's range is that of the float model's activations, not the quantized layer 0's outputs.
    torch.testing.assert_close(model.model.layers[1].self_attn.q_proj.input_amax.reshape(()),
                               torch.stack(seen).amax())
