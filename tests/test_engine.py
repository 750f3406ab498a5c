"""The generation engine: identical greedy output to transformers, rollback, multi-token and tree steps,
every packed format."""

import copy

import pytest
import torch
from tiny import tiny_gemma3, tiny_llama, tiny_qwen2

import leanlm
from leanlm.engine import Engine, sample
from leanlm.eval.bandwidth import weight_bytes_per_token
from leanlm.native import decode_step_module

FAMILIES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gemma3": tiny_gemma3}


def hf_greedy(model, prompt, n):
    with torch.inference_mode():
        out = model.generate(prompt[None], max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, prompt.numel():].tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_transformers_generate(family):
    model = FAMILIES[family]()
    g = torch.Generator().manual_seed(1)
    cases = [(torch.randint(0, 256, (n,), generator=g), new) for n, new in ((1, 12), (5, 30), (17, 9), (40, 24))]
    refs = [hf_greedy(model, p, n) for p, n in cases]  # before the engine switches attention paths
    eng = Engine(model, max_len=96, compile=False)
    if not isinstance(decode_step_module(), str):  # all three decode natively (on an AVX512-BF16 CPU)
        assert eng.native_error is None
    for (p, n), ref in zip(cases, refs):
        assert eng.generate(p, n).tokens == ref


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_compiled_greedy_matches_transformers_generate(family):
    model = FAMILIES[family]()
    g = torch.Generator().manual_seed(2)
    cases = [(torch.randint(0, 256, (n,), generator=g), new) for n, new in ((3, 20), (11, 33), (29, 16))]
    refs = [hf_greedy(model, p, n) for p, n in cases]
    eng = Engine(model, max_len=96, compile=True, native=False)
    for (p, n), ref in zip(cases, refs):
        out = eng.generate(p, n)
        assert out.tokens == ref
    assert eng.compile_error is None and eng.compile_s > 0


@pytest.mark.parametrize("family", ["gemma3", "llama"])  # sliding window 8 < sequence: no ring buffer; native
def test_rollback_then_continue_equals_fresh_run(family):
    eng = Engine(FAMILIES[family](), max_len=64, compile=False)
    prompt = torch.arange(3, 12)
    first = eng.generate(prompt, 20).tokens
    # Roll back into the middle of the generated text, feed a different token, continue greedily.
    keep = prompt.numel() + 10
    eng.rollback(keep)
    logits = eng.forward(torch.tensor([7]))[-1]
    cont = [sample(logits)]
    for _ in range(8):
        cont.append(sample(eng.forward(torch.tensor([cont[-1]]))[-1]))
    fresh_prompt = torch.cat([prompt, torch.tensor(first[:10] + [7])])
    fresh = eng.generate(fresh_prompt, 9).tokens
    assert cont == fresh


def test_several_tokens_in_one_step_equal_one_at_a_time():
    eng = Engine(tiny_llama(), max_len=64, compile=False)
    ids = torch.tensor([5, 9, 2, 44, 13, 8])
    eng.prefill(ids[:2])
    block = eng.forward(ids[2:])
    eng.prefill(ids[:2])
    single = torch.stack([eng.forward(ids[i:i + 1])[-1] for i in range(2, 6)])
    torch.testing.assert_close(block, single, atol=1e-5, rtol=1e-5)


def test_tree_mask_scores_each_branch_as_if_alone():
    eng = Engine(tiny_qwen2(), max_len=64, compile=False)
    prompt = torch.tensor([3, 1, 4, 1, 5])
    # Tree: root a, two children b and c (siblings at the same position), then d under c.
    a, b, c, d = 10, 20, 30, 40
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    n = prompt.numel()
    eng.prefill(prompt)
    out = eng.forward(torch.tensor([a, b, c, d]), positions=torch.tensor([n, n + 1, n + 1, n + 2]), tree=tree)
    eng.prefill(prompt)
    path_b = eng.forward(torch.tensor([a, b]))
    eng.prefill(prompt)
    path_cd = eng.forward(torch.tensor([a, c, d]))
    torch.testing.assert_close(out[[0, 1]], path_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[[2, 3]], path_cd[1:], atol=1e-5, rtol=1e-5)
    # Keep branch c-d: compact its cache entries, then continuing equals the plain path.
    eng.prefill(prompt)
    eng.forward(torch.tensor([a, b, c, d]), positions=torch.tensor([n, n + 1, n + 1, n + 2]), tree=tree)
    eng.cache.keep([n, n + 2, n + 3], start=n)
    after_tree = eng.forward(torch.tensor([7]))
    eng.prefill(torch.cat([prompt, torch.tensor([a, c, d])]))
    torch.testing.assert_close(after_tree, eng.forward(torch.tensor([7])), atol=1e-5, rtol=1e-5)


PACKED = ["w8a16", "w4a16_rtn_g64", "w4a16_rtn", "fp8", "fp8_dynamic", "fp8_block_g64", "int8_sq", "int8_sq_dynamic", "nvfp4", "mxfp4", "mxfp8", "fp8_kv_fp8"]


@pytest.mark.parametrize("recipe", PACKED)
def test_every_packed_format_decodes_like_its_eager_model(recipe):
    model = tiny_llama(vocab=256, layers=2)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    leanlm.quantize(model, recipe, calib, progress=False)
    ref_model = copy.deepcopy(model)
    prompt = torch.tensor([4, 8, 15, 16, 23, 42])
    with torch.inference_mode():
        ref = ref_model(torch.cat([prompt, torch.tensor([1, 2, 3])])[None]).logits[0, prompt.numel() - 1:]
    before = weight_bytes_per_token(model)
    eng = Engine(model, max_len=32, compile=False)
    last = eng.prefill(prompt)
    rest = eng.forward(torch.tensor([1, 2, 3]))  # few rows: the packed decode path
    got = torch.cat([last[None], rest])
    # The INT4 / INT8 weight-only kernels take bf16 activations; 4-bit activation grids turn last-bit
    # differences (batched vs step-by-step attention) into whole steps, per-token INT8 grids into a
    # step of 1/127 of a row's range.
    tol = {"nvfp4": 0.1, "mxfp4": 0.1, "int8_sq_dynamic": 5e-3}.get(recipe, 0.05 if recipe in ("w4a16_rtn_g64", "w4a16_rtn", "w8a16") else 1e-3)
    torch.testing.assert_close(got, ref.float(), atol=tol * ref.abs().max().item(), rtol=0)
    assert weight_bytes_per_token(model) <= 1.15 * before  # no float copy of a weight (+ the int4 kernel's bf16 scales)


@pytest.mark.parametrize("int8_fused", [True, False], ids=["int8-fused", "int8-kernel"])
def test_compiled_packed_int4_and_int8_decode(monkeypatch, int8_fused):
    """Both compiled int8 paths: inductor's fused reduction (AVX-512) and `int8_linear` as an opaque op (AVX2:
    the native kernel where it is built, else PyTorch's int8 kernel)."""
    from leanlm.quant import linear as quant_linear

    monkeypatch.setattr(quant_linear, "int8_fused_is_fast", lambda: int8_fused)
    w8a8 = {"name": "w8a8", "rules": [{"pattern": "*", "weight": "int8",
                                       "input": {"format": "int8", "block_size": -1, "dynamic": True}}]}
    for recipe in ("w4a16_rtn_g64", "w8a16", w8a8) if int8_fused else ("w8a16",):
        model = tiny_llama(vocab=256, layers=2)
        leanlm.quantize(model, recipe, progress=False)
        prompt = torch.tensor([4, 8, 15, 16])
        eager = Engine(copy.deepcopy(model), max_len=48, compile=False, native=False).generate(prompt, 16).tokens
        compiled = Engine(model, max_len=48, compile=True, native=False)
        out = compiled.generate(prompt, 16)
        assert compiled.compile_error is None
        assert out.tokens == eager


def test_engine_rejects_overflow_clearly():
    eng = Engine(tiny_llama(), max_len=16, compile=False)
    with pytest.raises(ValueError, match="max_len"):
        eng.generate(torch.arange(10), 10)


def test_sampling_is_seeded_and_respects_top_p():
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a = [sample(logits, 1.0, 1.0, g1) for _ in range(20)]
    assert a == [sample(logits, 1.0, 1.0, g2) for _ in range(20)]
    assert {sample(logits, 1.0, 0.5, g1) for _ in range(50)} == {1}
    assert sample(logits) == 1


def test_streaming_text_waits_for_whole_characters():
    class Tok:  # bytes per token; decode like a byte-level BPE tokenizer
        table = {0: b"caf", 1: b"\xc3", 2: b"\xa9", 3: b"!"}

        def decode(self, ids, skip_special_tokens=True):
            return b"".join(self.table[i] for i in ids).decode("utf-8", errors="replace")

    from leanlm.engine import StreamingText

    pieces = []
    s = StreamingText(Tok(), pieces.append)
    for t in (0, 1, 2, 3):
        s(t)
    assert pieces == ["caf", "é", "!"]


def test_measure_speed_gives_the_model_back_unchanged():
    from leanlm.eval.speed import measure_speed

    model = tiny_llama()
    leanlm.quantize(model, "w4a16_rtn_g64", progress=False)
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        before = model(x).logits
    r = measure_speed(model, prompt_tokens=8, new_tokens=4, repeats=1, compile=False)
    assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0
    assert model.config._attn_implementation == "sdpa"
    assert type(model.lm_head) is torch.nn.Linear  # the engine's FusedLinear class was switched back
    with torch.inference_mode():
        torch.testing.assert_close(model(x).logits, before)


def test_weight_bytes_per_token_counts_what_a_token_reads():
    def every(m):  # parameters (a tied table once) and buffers (rotary frequencies)
        return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))

    tied, untied = tiny_llama(), tiny_qwen2()
    assert weight_bytes_per_token(tied) == every(tied)  # tied: the table is read whole by lm_head
    emb = untied.get_input_embeddings().weight
    assert weight_bytes_per_token(untied) == every(untied) - emb.numel() * 4 + emb.shape[1] * 4
