"""The native single-token decode step: each weight kernel against plain arithmetic, and the engine's use
of it (which models and formats, agreement with the eager model, fallback with a reason)."""

import pytest
import torch
from tiny import tiny_gemma3, tiny_llama, tiny_qwen2

import leanlm
from leanlm.engine import Engine
from leanlm.engine.native_step import BF16, F32, I4, I8, int4_chunk_layout
from leanlm.native import decode_step_module

MOD = decode_step_module()
pytestmark = pytest.mark.skipif(isinstance(MOD, str), reason=str(MOD))


def _x(k, seed=0):
    return torch.randn(k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n,k", [(96, 576), (48, 100), (16, 33), (20, 1536)])
def test_float_kernels(n, k):
    g = torch.Generator().manual_seed(n)
    x, w, b = _x(k), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    torch.testing.assert_close(MOD.Linear(F32, w, None, None, b, None, k, 0).forward(x), w @ x + b,
                               rtol=1e-5, atol=1e-4)
    wb = w.bfloat16()  # bf16 weights multiply a bf16 copy of the input, accumulating in float32
    torch.testing.assert_close(MOD.Linear(BF16, wb, None, None, None, None, k, 0).forward(x),
                               wb.float() @ x.bfloat16().float(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n,k", [(96, 576), (16, 33), (20, 1536)])
def test_int8_kernel_with_smoothing(n, k):
    g = torch.Generator().manual_seed(k)
    x = _x(k)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    s, smooth, b = torch.rand(n, generator=g), torch.rand(k, generator=g) + 0.5, torch.randn(n, generator=g)
    ref = (q.float() * s[:, None]) @ (x / smooth) + b
    torch.testing.assert_close(MOD.Linear(I8, q, s, None, b, smooth, k, 0).forward(x), ref, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("n,k", [(96, 576), (7, 100), (20, 1536)])  # 100: a partial last group
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_kernel(n, k, group, symmetric):
    g = torch.Generator().manual_seed(n + k)
    x, kp = _x(k), -(-k // group) * group
    codes = torch.randint(0, 16, (n, kp), dtype=torch.uint8, generator=g)
    scale = torch.rand(n, kp // group, generator=g)
    offset = None if symmetric else torch.randn(n, kp // group, generator=g) * 0.1
    w = (codes.float() - 8).reshape(n, -1, group) * scale[..., None]
    if offset is not None:
        w = w + offset[..., None]
    ref = w.reshape(n, kp)[:, :k] @ x.bfloat16().float()
    got = MOD.Linear(I4, int4_chunk_layout(codes), scale, offset, None, None, k, group).forward(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())


def test_rows_of_every_kind():
    """`Linear.row` (the lookups of an embedding tied to a quantized output layer) is the dequantized row,
    smoothing undone."""
    g = torch.Generator().manual_seed(3)
    n, k = 12, 100  # a partial last int4 group
    smooth = torch.rand(k, generator=g) + 0.5
    w = torch.randn(n, k, generator=g)
    q8, s8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g), torch.rand(n, generator=g)
    codes, s4 = torch.randint(0, 16, (n, 128), dtype=torch.uint8, generator=g), torch.rand(n, 2, generator=g)
    off = torch.randn(n, 2, generator=g)
    w4 = ((codes.float() - 8).reshape(n, 2, 64) * s4[..., None] + off[..., None]).reshape(n, 128)[:, :k]
    cases = [(MOD.Linear(F32, w, None, None, None, smooth, k, 0), w),
             (MOD.Linear(BF16, w.bfloat16(), None, None, None, smooth, k, 0), w.bfloat16().float()),
             (MOD.Linear(I8, q8, s8, None, None, smooth, k, 0), q8.float() * s8[:, None]),
             (MOD.Linear(I4, int4_chunk_layout(codes), s4, off, None, smooth, k, 64), w4)]
    for lin, ref in cases:
        for i in (0, 5, n - 1):
            torch.testing.assert_close(lin.row(i), ref[i] / smooth, rtol=1e-6, atol=1e-6)


def test_bad_weight_is_refused():
    with pytest.raises(RuntimeError, match="groups of a multiple of 64"):
        MOD.Linear(I4, torch.zeros(4, 16, dtype=torch.uint8), torch.ones(4, 1), None, None, None, 32, 32)


def _logits(eng, prompt, extra):
    out = [eng.prefill(prompt)]
    out += [eng.forward(torch.tensor([t]))[-1] for t in extra]
    return torch.stack(out)


@pytest.mark.parametrize("recipe", ["w4a16_rtn_g64", "w4a16_rtn", "w8a16", "awq"])
def test_packed_models_decode_natively_like_their_eager_model(recipe):
    model = tiny_llama(vocab=256, layers=2)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    leanlm.quantize(model, "w4a16_awq" if recipe == "awq" else recipe, calib, progress=False)
    prompt, extra = torch.tensor([4, 8, 15, 16, 23, 42]), [1, 2, 3, 9, 77]
    eng = Engine(model, max_len=32, compile=False)
    assert eng.native_error is None
    got = _logits(eng, prompt, extra)
    eng.close()
    ref = _logits(Engine(model, max_len=32, compile=False, native=False), prompt, extra)
    # Both multiply bf16 copies of the activations into the int4 codes; sums differ in order only.
    torch.testing.assert_close(got, ref, atol=1e-2 * ref.abs().max().item(), rtol=0)


def test_bf16_model_decodes_natively():
    model = tiny_qwen2().to(torch.bfloat16)  # q/k/v biases
    eng = Engine(model, max_len=32, compile=False)
    assert eng.native_error is None
    got = _logits(eng, torch.tensor([3, 5, 7]), [11, 13])
    eng.close()
    ref = _logits(Engine(model.float(), max_len=32, compile=False, native=False), torch.tensor([3, 5, 7]), [11, 13])
    # The native step keeps float32 activations: it is closer to the float32 model than bf16 eager is.
    torch.testing.assert_close(got, ref, atol=3e-2 * ref.abs().max().item(), rtol=0)


NVFP4_WEIGHTS = {"name": "nvfp4_weights", "rules": [{"pattern": "*", "weight": "nvfp4"}]}


@pytest.mark.parametrize("recipe,why", [(NVFP4_WEIGHTS, "fp4_e2m1 weights"), ("int8_sq", "activation quantization"),
                                        ("w4a16_rtn_kv_fp8", "KV-cache quantizers")])
def test_formats_without_native_kernels_say_why(recipe, why):
    model = tiny_llama(vocab=256, layers=2)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    leanlm.quantize(model, recipe, calib, progress=False)
    eng = Engine(model, max_len=32, compile=False)
    assert why in eng.native_error
    assert len(eng.generate(torch.tensor([1, 2, 3]), 4).tokens) == 4


def test_other_architectures_use_the_compiled_step():
    from transformers import GPT2Config, GPT2LMHeadModel

    from leanlm.engine.native_step import Unsupported, check_architecture

    with pytest.raises(Unsupported, match="model type 'gpt2'"):
        check_architecture(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=4)), 32)
    capped = tiny_gemma3()
    capped.config.final_logit_softcapping = 30.0
    assert "final logit softcapping" in Engine(capped, max_len=32, compile=False).native_error


def test_gemma3_sliding_window_layers_decode_natively_past_the_window():
    model = tiny_gemma3(sliding_window=8)  # two sliding layers, one full: 40 positions cross the window
    prompt = torch.arange(3, 12)
    ref = Engine(model, max_len=64, compile=False, native=False)
    eng = Engine(model, max_len=64, compile=False)
    assert eng.native_error is None
    extra = list(range(20, 50))
    torch.testing.assert_close(_logits(eng, prompt, extra), _logits(ref, prompt, extra), rtol=1e-4, atol=1e-4)


def test_a_disagreeing_native_step_is_not_used(monkeypatch):
    monkeypatch.setitem(Engine.NATIVE_TOLERANCE, "float32", -1.0)
    with pytest.warns(UserWarning, match="disagrees with the model"):
        eng = Engine(tiny_llama(), max_len=32, compile=False)
    assert "probe mismatch" in eng.native_error
    assert eng.length == 0


def _int4_llama():
    model = tiny_llama(vocab=256, layers=2)
    leanlm.quantize(model, "w4a16_rtn_g64", torch.randint(0, 256, (4, 32)), progress=False)
    return model


@pytest.mark.parametrize("make,tol", [(tiny_llama, 1e-4), (tiny_qwen2, 1e-4),
                                      (lambda: tiny_gemma3(sliding_window=8), 1e-4), (_int4_llama, 1e-2)])
def test_chains_of_tokens_step_natively_with_hidden_states_and_rollback(make, tol):
    """Verifying drafts: several tokens in one native call give the eager model's logits and hidden
    states (embeddings, a middle layer, the final norm), across rollbacks and a sliding window."""
    model = make()
    layers = model.config.num_hidden_layers
    keep = (0, 1, layers)
    eng = Engine(model, max_len=64, compile=False, hidden_layers=keep)
    ref = Engine(model, max_len=64, compile=False, native=False, hidden_layers=keep)
    assert eng.native_error is None
    prompt = torch.arange(3, 9)
    eng.prefill(prompt), ref.prefill(prompt)
    for chain, kept in [([5, 6, 7, 8], 2), ([9], 1), ([10, 11, 12, 13, 14], 5), (list(range(20, 36)), 16)]:
        got, want = eng.forward(torch.tensor(chain)), ref.forward(torch.tensor(chain))
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, atol=tol * scale, rtol=0)
        assert eng.hidden.shape == ref.hidden.shape == (len(chain), len(keep) * model.config.hidden_size)
        torch.testing.assert_close(eng.hidden, ref.hidden, atol=tol * ref.hidden.abs().max().item(), rtol=0)
        back = eng.length - len(chain) + kept
        eng.rollback(back), ref.rollback(back)
