"""A tied model whose output layer is quantized: one quantized table serves the logits and the lookups."""

import pytest
import torch
from safetensors import safe_open
from tiny import tiny_gemma3, tiny_llama, tiny_qwen2

import leanlm
from leanlm.quant.embedding import TiedEmbedding
from leanlm.quant.formats import QuantSpec
from leanlm.quant.linear import QuantLinear

IDS = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
HEADS = {"int8": {"format": "int8", "block_size": -1},
         "int4_bf16": {"format": "int4", "block_size": 64, "scale_format": "bf16"},
         "nvfp4": {"format": "fp4_e2m1", "block_size": 16, "scale_format": "e4m3"},
         "fp8_per_tensor": {"format": "fp8_e4m3", "block_size": 0}}


def _recipe(head: dict) -> dict:
    return {"name": "tied", "exclude": [], "rules": [{"pattern": "*", "weight": {"format": "int4", "block_size": 64}},
                                                     {"pattern": "lm_head", "weight": head}]}


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3])
@pytest.mark.parametrize("head", list(HEADS))
def test_lookups_read_the_quantized_table(build, head):
    model = leanlm.quantize(build(), _recipe(HEADS[head]), progress=False, freeze=False)
    emb = model.get_input_embeddings()
    assert isinstance(emb, TiedEmbedding)
    scale = 1.0 if emb.embed_scale is None else emb.embed_scale
    with torch.no_grad():
        table = model.lm_head.quantized_weight()
        torch.testing.assert_close(emb(IDS), table[IDS] * scale, rtol=0, atol=0)
        model.lm_head.freeze()  # frozen: only the looked-up rows are decoded, to the same values
        model.lm_head.cache_dequantized = False
        torch.testing.assert_close(emb(IDS), table[IDS] * scale, rtol=0, atol=0)


def test_weight_rows_undo_smoothing():
    q = QuantLinear(100, 8, False, QuantSpec("int4", block_size=64))  # a partial last group
    torch.nn.init.normal_(q.weight)
    q.apply_smooth(torch.rand(100) + 0.5)
    q.freeze()
    q.cache_dequantized = False
    ids = torch.tensor([[0, 7], [3, 3]])
    ref = torch.nn.functional.embedding(ids, q.quantized_weight() / q.smooth)
    torch.testing.assert_close(q.weight_rows(ids), ref, rtol=1e-6, atol=1e-7)


def test_float_embedding_stays_where_nothing_is_tied():
    untied = leanlm.quantize(tiny_qwen2(), _recipe(HEADS["int8"]), progress=False)
    assert type(untied.get_input_embeddings()) is torch.nn.Embedding
    float_head = leanlm.quantize(tiny_llama(), "w4a16_rtn", progress=False)  # lm_head excluded by default
    assert type(float_head.get_input_embeddings()) is torch.nn.Embedding


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3])
def test_saved_once_loaded_packed_and_decoded_natively(tmp_path, tiny_model_dir, build):
    from transformers import AutoTokenizer

    from leanlm.engine import Engine

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = leanlm.quantize(build(), _recipe(HEADS["int8"]), progress=False)
    with torch.no_grad():
        ref = model(IDS).logits
    out = leanlm.save(model, tok, tmp_path / "q")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "embed_tokens" in k]  # the table is lm_head's codes, stored once
    fake, _ = leanlm.load(out, packed=False)
    packed, _ = leanlm.load(out)
    assert isinstance(packed.get_input_embeddings(), TiedEmbedding)
    with torch.no_grad():
        torch.testing.assert_close(fake(IDS).logits, ref, rtol=0, atol=0)
        got = packed(IDS).logits
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 2e-2  # bf16 activations in the int4 kernel
    eng = Engine(packed, max_len=64)
    greedy = eng.generate(IDS[0], 8).tokens
    eng.close()
    eager = Engine(packed, max_len=64, native=False, compile=False).generate(IDS[0], 8).tokens
    assert greedy == eager


def test_compressed_tensors_export_keeps_the_lookups(tmp_path):
    pytest.importorskip("compressed_tensors")
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from leanlm.export import export

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))
    model = leanlm.quantize(tiny_llama(), _recipe(HEADS["int8"]), progress=False)
    with torch.no_grad():
        ref = model(IDS).logits
    out = export(model, "compressed-tensors", tmp_path / "ct", tokenizer=tok)
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out)(IDS).logits
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-2
