"""GGUF export: tensor layout read back with gguf, transformers loading the file, exact Q4_0 from codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import leanlm
from leanlm.errors import LeanLMError
from leanlm.export import MANIFEST, export, verify_export
from leanlm.export import gguf as gguf_export
from leanlm.export.parts import weight_parts
from leanlm.models import shared_gguf_reads
from tiny import tiny_gemma3, tiny_llama, tiny_qwen2

gguf = pytest.importorskip("gguf")

TEXT = ("The capital of France is Paris. In 2024, 1234 people walked 56 km! Tokenizers split text into pieces; "
        "quantized models run on a laptop CPU as well as a GPU. <|im_start|>user hello<|im_end|>")
W4G32 = {"name": "w4g32", "rules": [{"pattern": "*", "weight": {"format": "int4", "block_size": 32}}]}
LINEARS = 14  # 2 layers x (q, k, v, o, gate, up, down)


@pytest.fixture(scope="module")
def small_tok():
    """A byte-level BPE tokenizer (GPT-2 style, like SmolLM2's) with 300 tokens: fast to write and read."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([TEXT] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>")
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    return tok


def _reader(out):
    return gguf.GGUFReader(str(out / "model.gguf"))


def _summary(out) -> dict:
    return json.loads((out / MANIFEST).read_text())


def _hf(out):
    from transformers import AutoModelForCausalLM

    with shared_gguf_reads():  # transformers alone parses the file three times
        return AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf", dtype=torch.float32).eval()


def _ids(tok):
    return torch.tensor([tok(TEXT)["input_ids"]])


def _rel(a, b) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


def test_q8_0_float_model_reads_back_and_loads_in_transformers(tmp_path, small_tok):
    from transformers import AutoTokenizer

    model = tiny_llama(vocab=320)
    out = export(model, "gguf", tmp_path / "q8", tokenizer=small_tok, qtype="Q8_0")
    r = _reader(out)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "llama" and f["general.file_type"] == 7
    assert (f["llama.block_count"], f["llama.embedding_length"], f["llama.attention.head_count"],
            f["llama.attention.head_count_kv"], f["llama.rope.dimension_count"]) == (2, 64, 4, 2, 16)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert len(f["tokenizer.ggml.tokens"]) == 320 and f["tokenizer.ggml.tokens"][300] == "[PAD300]"
    assert f["tokenizer.ggml.token_type"][:3] == [3, 3, 3] and f["tokenizer.ggml.token_type"][310] == 5
    assert f["tokenizer.ggml.eos_token_id"] == small_tok.eos_token_id and "im_start" in f["tokenizer.chat_template"]
    types = {t.name: (t.tensor_type.name, [int(d) for d in t.shape]) for t in r.tensors}
    assert types["token_embd.weight"] == ("Q8_0", [64, 320])  # gguf lists dims innermost first
    assert types["blk.1.attn_k.weight"] == ("Q8_0", [64, 32])
    assert types["blk.0.ffn_down.weight"] == ("Q8_0", [128, 64])
    assert types["blk.0.attn_norm.weight"] == ("F32", [64]) and types["output_norm.weight"] == ("F32", [64])
    assert "output.weight" not in types and len(types) == 2 * 9 + 2  # tied head: llama.cpp reuses token_embd
    summary = _summary(out)["summary"]
    assert summary["types"] == {"Q8_0": 15, "F32": 5} and summary["methods"]["quantized"] == 15

    hf = _hf(out)
    with torch.no_grad():
        assert _rel(model(_ids(small_tok)).logits, hf(_ids(small_tok)).logits) < 0.03
    # transformers' GGUF tokenizer, built from the file's vocabulary and merges, splits text as ours does
    hf_tok = AutoTokenizer.from_pretrained(str(out), gguf_file="model.gguf")
    assert hf_tok(TEXT)["input_ids"] == small_tok(TEXT)["input_ids"]
    assert hf_tok.decode(small_tok(TEXT)["input_ids"]) == TEXT
    verify_export(out)


def test_int4_group32_is_written_exactly_as_q4_0(tmp_path, small_tok):
    model = tiny_llama(vocab=320)
    leanlm.quantize(model, W4G32, progress=False)
    out = export(model, "gguf", tmp_path / "q4", tokenizer=small_tok)  # default qtype for int4: Q4_0
    summary = _summary(out)["summary"]
    assert summary["qtype"] == "Q4_0" and summary["methods"] == {"exact": LINEARS, "quantized": 1, "float": 5}
    # The nibbles are the codes + 8 and d is the group scale in fp16 (down_proj: no row permutation).
    q = model.model.layers[0].mlp.down_proj
    parts = weight_parts(q)
    t = next(t for t in _reader(out).tensors if t.name == "blk.0.ffn_down.weight")
    blocks = np.asarray(t.data).reshape(64, 128 // 32, 18)
    d = blocks[..., :2].copy().view(np.float16)[..., 0]
    lo, hi = blocks[..., 2:] & 0x0F, blocks[..., 2:] >> 4
    codes = np.concatenate([lo, hi], axis=-1).astype(np.int64) - 8
    assert np.array_equal(codes.reshape(64, 128), parts.values.numpy().astype(np.int64))
    assert np.array_equal(d, parts.scale.numpy().astype(np.float16))

    hf = _hf(out)
    for name in ("q_proj", "k_proj", "o_proj"):  # transformers undoes llama.cpp's q/k row permutation
        ours = getattr(model.model.layers[1].self_attn, name)._dequantize_frozen()
        theirs = getattr(hf.model.layers[1].self_attn, name).weight
        assert (ours - theirs).abs().max() <= ours.abs().max() * 2.0**-11
    # Only the float embedding is requantized; with it shared, the logits agree up to fp16 scale rounding.
    model.model.embed_tokens.weight.data.copy_(hf.model.embed_tokens.weight)
    with torch.no_grad():
        assert _rel(model(_ids(small_tok)).logits, hf(_ids(small_tok)).logits) < 5e-4


def test_tied_quantized_head_writes_both_tables(tmp_path, small_tok):
    """A tied model whose lm_head is quantized reads one quantized table (leanlm's TiedEmbedding): the file
    gets the codes twice, exactly: as token_embd and as output."""
    model = tiny_llama(vocab=320)
    leanlm.quantize(model, {**W4G32, "exclude": []}, progress=False)
    out = export(model, "gguf", tmp_path / "tied", tokenizer=small_tok)
    names = {t.name for t in _reader(out).tensors}
    assert {"token_embd.weight", "output.weight"} <= names
    assert _summary(out)["summary"]["methods"]["exact"] == LINEARS + 2  # lm_head and the embedding too
    with torch.no_grad():
        assert _rel(model(_ids(small_tok)).logits, _hf(out)(_ids(small_tok)).logits) < 5e-3


def test_other_layouts_and_smoothing_are_requantized(tmp_path, small_tok):
    model = tiny_llama(vocab=320)
    recipe = {"name": "w4g64", "rules": [{"pattern": "*", "weight": {"format": "int4", "block_size": 64}}]}
    leanlm.quantize(model, recipe, progress=False, freeze=False)
    smoothed = model.model.layers[0].self_attn.q_proj
    smoothed.apply_smooth(torch.linspace(0.5, 2.0, 64))
    leanlm.freeze_model(model)
    out = export(model, "gguf", tmp_path / "q4", tokenizer=small_tok, qtype="Q4_0")
    manifest = _summary(out)
    assert manifest["summary"]["methods"] == {"requantized": LINEARS, "quantized": 1, "float": 5}
    assert manifest["validation"]["max_abs_error"]["Q4_0/requantized"] > 0
    hf = _hf(out)
    ours = smoothed._dequantize_frozen() / smoothed.smooth  # the effective weight (x / s) @ Wq.T
    theirs = hf.model.layers[0].self_attn.q_proj.weight
    assert (ours - theirs).abs().max() <= ours.abs().max() / 7  # one Q4_0 step of the row block's range
    # the same codes as Q8_0: requantized within Q8_0's half step
    out8 = export(model, "gguf", tmp_path / "q8", tokenizer=small_tok, qtype="q8_0")
    assert _summary(out8)["summary"]["methods"]["requantized"] == LINEARS
    with torch.no_grad():
        assert _rel(model(_ids(small_tok)).logits, _hf(out8)(_ids(small_tok)).logits) < 0.03


def test_int4_group32_as_q8_0_is_exact_and_f16_f32(tmp_path, small_tok):
    model = tiny_llama(vocab=320)
    leanlm.quantize(model, W4G32, progress=False)
    out = export(model, "gguf", tmp_path / "q8", tokenizer=small_tok, qtype="Q8_0")
    assert _summary(out)["summary"]["methods"]["exact"] == LINEARS  # int4 codes fit int8 blocks as they are
    out = export(model, "gguf", tmp_path / "f16", tokenizer=small_tok, qtype="F16")
    assert _summary(out)["summary"]["types"] == {"F16": 15, "F32": 5}
    out = export(tiny_llama(vocab=320), "gguf", tmp_path / "f32", tokenizer=small_tok, qtype="F32")
    assert {t.tensor_type.name for t in _reader(out).tensors} == {"F32"}
    assert max(_summary(out)["validation"]["max_abs_error"].values()) == 0.0


def test_rows_not_multiple_of_32_fall_back_to_f16(tmp_path, small_tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=80, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    out = export(model, "gguf", tmp_path / "q4", tokenizer=small_tok, qtype="Q4_0")
    summary = _summary(out)["summary"]
    assert summary["fallback_f16"] == ["blk.0.ffn_down.weight"]  # rows of 80: not whole Q4_0 blocks
    types = {t.name: t.tensor_type.name for t in _reader(out).tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q4_0"
    hf = _hf(out)
    assert torch.allclose(hf.model.layers[0].mlp.down_proj.weight, model.model.layers[0].mlp.down_proj.weight,
                          rtol=2.0**-10, atol=1e-7)


def test_qwen2_keeps_biases_and_untied_head(tmp_path, small_tok):
    model = tiny_qwen2(vocab=320)
    for layer in model.model.layers:  # random biases, so a mis-permuted or missing bias would show
        for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            torch.nn.init.normal_(p.bias, std=0.1)
    out = export(model, "gguf", tmp_path / "qwen", tokenizer=small_tok, qtype="Q8_0")
    types = {t.name: t.tensor_type.name for t in _reader(out).tensors}
    assert types["output.weight"] == "Q8_0" and types["blk.1.attn_q.bias"] == "F32"
    hf = _hf(out)
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        assert _rel(model(_ids(small_tok)).logits, hf(_ids(small_tok)).logits) < 0.03


def test_smollm2_vocabulary_from_a_model_folder(tmp_path, tiny_model_dir):
    # Written before it is first read: export's check, ours and verify's can share one parse.
    with shared_gguf_reads():
        out = export(tiny_model_dir, "gguf", tmp_path / "gguf")  # a folder: loaded with its own tokenizer
        f = {k: v.contents() for k, v in _reader(out).fields.items()
             if k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.pre", "general.file_type")}
        tok = json.loads((tiny_model_dir / "tokenizer.json").read_text())
        assert f["general.file_type"] == 7  # float model: Q8_0 by default
        assert f["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        assert len(f["tokenizer.ggml.tokens"]) == 49152 and len(f["tokenizer.ggml.merges"]) == len(tok["model"]["merges"])
        assert f["tokenizer.ggml.merges"][0] == " ".join(tok["model"]["merges"][0])
        verify_export(out)


def test_bad_inputs_are_clear_errors(tmp_path, small_tok):
    with pytest.raises(LeanLMError, match="unknown gguf qtype 'Q4_K'"):
        export(tiny_llama(vocab=320), "gguf", tmp_path / "a", tokenizer=small_tok, qtype="Q4_K")
    with pytest.raises(LeanLMError, match="gguf export supports llama/qwen2 architectures"):
        export(tiny_gemma3(vocab=320), "gguf", tmp_path / "b", tokenizer=small_tok)
    small = tiny_llama(vocab=256)  # fewer embedding rows than the tokenizer has ids
    with pytest.raises(LeanLMError, match="embedding has only 256 rows"):
        export(small, "gguf", tmp_path / "c", tokenizer=small_tok)
    fake = tiny_llama(vocab=320)
    leanlm.quantize(fake, W4G32, progress=False, freeze=False)
    with pytest.raises(LeanLMError, match="not frozen"):
        export(fake, "gguf", tmp_path / "d", tokenizer=small_tok)
    assert not any((tmp_path / n).exists() for n in "abcd")  # nothing half-written


def test_corruption_is_detected(tmp_path, small_tok):
    model = tiny_llama(vocab=320)
    out = export(model, "gguf", tmp_path / "g", tokenizer=small_tok, qtype="Q4_0")
    with torch.no_grad():  # the file no longer matches the model
        model.model.layers[1].mlp.up_proj.weight[0, 0] += 1.0
    with pytest.raises(LeanLMError, match="blk.1.ffn_up.weight"):
        gguf_export.validate(out, model, small_tok)
    path = out / "model.gguf"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(LeanLMError, match="corrupt"):
        verify_export(out)
    with pytest.raises(LeanLMError, match="truncated|not a readable"):
        gguf_export.validate(out, model, small_tok)


@pytest.mark.slow
def test_smollm2_q8_0_in_transformers(tmp_path, default_model_dir):
    from transformers import AutoTokenizer

    # Written before it is first read: export's check, the tokenizer's and the model's share one parse.
    with shared_gguf_reads():
        model, tok = leanlm.load(default_model_dir)
        out = export(model, "gguf", tmp_path / "smollm2", tokenizer=tok, qtype="Q8_0")
        hf_tok = AutoTokenizer.from_pretrained(str(out), gguf_file="model.gguf")
        assert hf_tok(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
        ids = _ids(tok)
        with torch.no_grad():
            a, b = model(ids).logits, _hf(out)(ids).logits
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9 and _rel(a, b) < 0.05
