"""Speculative decoding: lossless greedy output for every drafter, exact sampling, KV rollback,
EAGLE-3 training/attention consistency and checkpoints, clear errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny import tiny_gemma3, tiny_llama

from leanlm.cli import main
from leanlm.engine import Engine
from leanlm.errors import LeanLMError
from leanlm.speculative import (Eagle3Config, Eagle3Drafter, Eagle3Head, Eagle3TrainConfig, ModelDrafter,
                                NGramDrafter, load_eagle3, save_eagle3, speculative_generate, train_eagle3, verify)
from leanlm.speculative.train import ttt_forward


def _prompts(n, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g) for _ in range(n)]


def _plain(model, prompts, n):
    with Engine(model, max_len=128, compile=False) as eng:
        return [eng.generate(p, n).tokens for p in prompts]


def _eagle_drafter(model, max_len=128, seed=0):
    torch.manual_seed(seed)
    head = Eagle3Head(Eagle3Config.for_target(model.config, 200))
    for p in head.parameters():  # a random but not degenerate head
        p.data.normal_(0, 0.2) if p.dim() > 1 else None
    return head, Eagle3Drafter(head, model.get_input_embeddings(), max_len=max_len)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_greedy_speculative_equals_plain_for_every_drafter(family):
    model = (tiny_llama if family == "llama" else tiny_gemma3)(layers=3)
    prompts = _prompts(4)
    ref = _plain(model, prompts, 40)
    head, eagle = _eagle_drafter(model)
    drafters = {"ngram": (NGramDrafter(), ()), "self": (ModelDrafter(model, 128, compile=False), ()),
                "other": (ModelDrafter(tiny_llama(seed=5, layers=1) if family == "llama" else tiny_gemma3(seed=5, layers=2),
                                       128, compile=False), ()),
                "eagle3": (eagle, tuple(head.config.aux_layers))}
    for name, (drafter, hidden) in drafters.items():
        with Engine(model, max_len=128, compile=False, hidden_layers=hidden) as eng:
            for k, tree in ((1, False), (3, False), (5, False), (3, True), (8, True)):
                if tree and not hasattr(drafter, "propose_tree"):
                    continue
                for p, r in zip(prompts, ref):
                    out = speculative_generate(eng, drafter, p, 40, k=k, tree=tree)
                    assert out.tokens == r, (name, k, tree)
                    assert eng.length == p.numel() + len(r) - 1 - (len(out.tokens) - len(r))  # rolled back
                    if name == "self":  # the target drafting for itself: every draft accepted
                        assert out.acceptance_length > k * 0.9


@pytest.mark.parametrize("recipe", ["w4a16_rtn", "w8a16"])
def test_quantized_target_with_eagle3_and_ngram(recipe):
    import leanlm

    model = leanlm.quantize(tiny_llama(layers=4), recipe, progress=False)
    prompts = _prompts(3, seed=4)
    ref = _plain(model, prompts, 24)
    head, eagle = _eagle_drafter(model)
    with Engine(model, max_len=128, compile=False, hidden_layers=tuple(head.config.aux_layers)) as eng:
        for drafter in (eagle, NGramDrafter()):
            for tree in (False, True):
                assert [speculative_generate(eng, drafter, p, 24, k=4, tree=tree).tokens for p in prompts] == ref


def test_draft_model_with_a_quantized_lm_head():
    import leanlm

    everything = {"name": "w8_all", "rules": [{"pattern": "*", "weight": "int8"}], "exclude": []}
    draft = leanlm.quantize(tiny_llama(seed=5, layers=1), everything, progress=False)
    assert isinstance(draft.get_output_embeddings(), leanlm.quant.linear.QuantLinear)
    target = tiny_llama(layers=2)
    prompts = _prompts(3, seed=6)
    with Engine(target, max_len=128, compile=False) as eng:
        drafter = ModelDrafter(draft, 128, compile=False, target_vocab=256)
        assert [speculative_generate(eng, drafter, p, 20, k=3).tokens for p in prompts] == _plain(target, prompts, 20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_native_rows_linear_matches_matmul(dtype):
    from leanlm.native import rows_linear, rows_linear_available

    assert rows_linear_available()
    g = torch.Generator().manual_seed(0)
    for k in (64, 100, 576):  # whole and partial vectors
        w = torch.randn(96, k, generator=g)
        w = (w * 40).round().clamp(-127, 127).to(dtype) if dtype == torch.int8 else w.to(dtype)
        for m in (1, 2, 5, 16):
            x = torch.randn(m, k, generator=g)
            ref = x.double() @ w.double().T
            torch.testing.assert_close(rows_linear(x, w).double(), ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-4)


def test_compiled_speculative_equals_plain():
    model = tiny_llama(layers=2)
    prompts = _prompts(3, seed=3)
    ref = _plain(model, prompts, 30)
    head, _ = _eagle_drafter(model)
    eagle = Eagle3Drafter(head, model.get_input_embeddings(), max_len=128, compile=True)
    with Engine(model, max_len=128, compile=True, hidden_layers=tuple(head.config.aux_layers)) as eng:
        for drafter in (NGramDrafter(), eagle):
            outs = [speculative_generate(eng, drafter, p, 30, k=4) for p in prompts]
            assert [o.tokens for o in outs] == ref
        assert eng.compile_error is None and eagle.compile


def test_acceptance_stats_and_eos():
    model = tiny_llama(layers=2)
    p = _prompts(1, seed=7)[0]
    ref = _plain(model, [p], 30)[0]
    with Engine(model, max_len=128, compile=False) as eng:
        out = speculative_generate(eng, ModelDrafter(model, 128, compile=False), p, 30, k=3)
        assert out.accepted == out.proposed and out.acceptance_rates == [1.0, 1.0, 1.0]
        assert out.cycles == math.ceil((30 - 1) / 4)
        stop = ref[12]
        out = speculative_generate(eng, NGramDrafter(), p, 30, k=3, eos_token_id=stop)
        assert out.tokens == ref[:ref.index(stop) + 1] and out.stopped_by == "eos"


@pytest.mark.parametrize("one_hot", [True, False])
def test_rejection_sampling_is_exact(one_hot):
    """Whatever the drafter proposes, the accepted-or-resampled token follows the target's p."""
    g = torch.Generator().manual_seed(0)
    vocab, n = 6, 20000
    logits = torch.randn(2, vocab, generator=g) * 1.5
    p = torch.softmax(logits[0], -1)
    q = torch.softmax(torch.randn(vocab, generator=g) * 2, -1)
    counts = torch.zeros(vocab)
    for _ in range(n):
        x = int(torch.multinomial(q, 1, generator=g))
        acc, nxt = verify(logits, [x], None if one_hot else q[None], 1.0, 1.0, g)
        counts[x if acc == 1 else nxt] += 1
    expected = p * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 25.0, (counts / n, p)  # 5 degrees of freedom: p-value ~ 1e-4


def test_sampled_speculative_follows_target_distribution():
    """End to end: the second generated token's marginal matches the target's exact marginal."""
    target, draft = tiny_llama(seed=0, vocab=16, layers=1), tiny_llama(seed=1, vocab=16, layers=1)
    prompt = torch.tensor([3, 7, 1])
    with torch.no_grad():
        p1 = torch.softmax(target(prompt[None]).logits[0, -1], -1)
        both = torch.cat([prompt.repeat(16, 1), torch.arange(16)[:, None]], 1)
        p2 = (p1[:, None] * torch.softmax(target(both).logits[:, -1], -1)).sum(0)
    n = 3000
    counts = torch.zeros(16)
    drafter = ModelDrafter(draft, 32, compile=False)
    with Engine(target, max_len=32, compile=False) as eng:
        for s in range(n):
            out = speculative_generate(eng, drafter, prompt, 2, k=2, temperature=1.0, seed=s)
            counts[out.tokens[1]] += 1
    expected = p2 * n
    keep = expected > 5
    chi2 = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    assert chi2 < 45.0, (counts / n, p2)  # <= 15 degrees of freedom: p-value ~ 1e-4


def test_ngram_drafter_continues_a_repeating_pattern():
    d = NGramDrafter(max_n=3)
    assert d.propose([5, 1, 2, 3, 9, 1, 2], 3)[0] == [3, 9, 1]
    assert d.propose([1, 2, 1, 2], 5)[0] == [1, 2, 1, 2, 1]  # match runs into the draft itself
    assert d.propose([1, 2, 3], 2)[0] == []
    # Trees merge the continuations of several matches: 4 1 2 (latest) and 3 1 2.
    assert d.propose_tree([1, 2, 3, 1, 2, 4, 1, 2], 6) == ([4, 1, 2, 3, 1, 2], [-1, 0, 1, -1, 3, 4])


def test_tree_verification_keeps_the_accepted_branch():
    """A tree whose first branch is wrong and second right: the kept cache equals a plain run's."""
    model = tiny_llama(layers=2)
    p = _prompts(1, seed=9)[0]
    ref = _plain(model, [p], 12)[0]

    class Fixed:  # branch 1: a wrong token; branch 2: the next 3 greedy tokens
        def start(self, engine, seq):
            pass

        def propose_tree(self, seq, k):
            n = len(seq) - p.numel()
            right = ref[n:n + 3]
            wrong = (right[0] + 1) % 256
            return [wrong, wrong] + right, [-1, 0, -1, 2, 3]

        def commit(self, seq, new, hidden):
            pass

    with Engine(model, max_len=64, compile=False) as eng:
        out = speculative_generate(eng, Fixed(), p, 12, k=5, tree=True)
        assert out.tokens == ref
        assert out.accepted[:3] == [out.cycles] * 3  # the right branch, fully, every cycle
        logits = eng.forward(torch.tensor([ref[-1]]))[-1]  # continue from the compacted cache
    with Engine(model, max_len=64, compile=False) as eng:
        assert int(logits.argmax()) == eng.generate(p, 13).tokens[-1]


def test_eagle3_drafting_attention_equals_training_time_test():
    """The head's drafting (KV cache) computes what training-time test trains, step by step."""
    model = tiny_llama(layers=4)
    head, drafter = _eagle_drafter(model)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        aux = torch.cat([out.hidden_states[i] for i in head.config.aux_layers], -1)
        labels = torch.zeros_like(ids)
        steps = [r for r in _ttt_logits(head, model, ids, aux, labels, 3)]
    i = 11  # draft from position i: the drafter has committed positions 0..i
    with Engine(model, max_len=64, compile=False, hidden_layers=tuple(head.config.aux_layers)) as eng:
        eng.prefill(ids[0, :i + 1])
        drafter.start(eng, ids[0, :i + 2].tolist())
        h, logits = drafter._out
        torch.testing.assert_close(logits, steps[0][0, i], atol=1e-4, rtol=1e-4)
        for j in (2, 3):
            slot = i + j - 1
            h, lg = drafter._run(h, [int(ids[0, i + j])], slot)
            torch.testing.assert_close(lg[-1], steps[j - 1][0, i], atol=1e-4, rtol=1e-4)


def _ttt_logits(head, model, ids, aux, labels, steps):
    captured = []
    finish = head.finish

    def spy(attn, residual):
        h, logits = finish(attn, residual)
        captured.append(logits)
        return h, logits

    head.finish = spy
    try:
        ttt_forward(head, model.get_input_embeddings(), ids, aux, labels, steps)
    finally:
        del head.finish
    return captured


def test_eagle3_checkpoint_round_trip_and_layout(tmp_path):
    model = tiny_llama(layers=4)
    head, _ = _eagle_drafter(model)
    head.set_draft_vocab(torch.arange(56, 256))
    save_eagle3(head, tmp_path / "head")
    cfg = json.loads((tmp_path / "head" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["draft_vocab_size"] == 200
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == head.config.aux_layers
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "head" / "model.safetensors")))
    assert {"fc.weight", "midlayer.self_attn.q_proj.weight", "midlayer.hidden_norm.weight", "lm_head.weight",
            "d2t", "t2d", "norm.weight"} <= keys
    back = load_eagle3(tmp_path / "head")
    for (k, a), b in zip(head.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    assert int(back.target_ids[0]) == 56 and back.config.vocab_size == 256
    with pytest.raises(LeanLMError, match="already exists"):
        save_eagle3(head, tmp_path / "head")
    (tmp_path / "head" / "model.safetensors").write_bytes(b"\x00" * 100)  # truncated / corrupt
    with pytest.raises(LeanLMError, match="incomplete or corrupt"):
        load_eagle3(tmp_path / "head")
    with pytest.raises(LeanLMError, match="not an EAGLE-3 head folder"):
        load_eagle3(tmp_path)


class _CharTokenizer:
    eos_token_id, pad_token_id, chat_template = None, 0, None

    def __call__(self, text):
        return type("Enc", (), {"input_ids": [(ord(c) % 250) + 1 for c in text[:24]]})()


def test_eagle3_training_loss_decreases_and_resumes(tmp_path):
    model = tiny_llama(layers=4)
    cfg = Eagle3TrainConfig(prompts="news", num_prompts=24, max_new_tokens=12, draft_vocab=64, epochs=4,
                            batch_size=4, lr=3e-3, checkpoint_every=5, ttt_steps=3)
    head = train_eagle3(model, _CharTokenizer(), tmp_path / "a", cfg, progress=False)
    assert (tmp_path / "a.work" / "data.safetensors").is_file()
    import leanlm.speculative.train as tr

    seqs, feats, _, prompt_lengths = tr._load_data(tmp_path / "a.work" / "data.safetensors")
    assert all(0 < p < len(s) for p, s in zip(prompt_lengths, seqs))  # responses follow their prompts
    lookup = head.to_draft_ids(torch.arange(head.config.vocab_size))
    _, _, labels = tr._collate(seqs, feats, lookup, [0, 1], [p - 1 for p in prompt_lengths])
    for r in range(2):  # held-out accuracy counts only the positions drafting starts from
        assert (labels[r, :prompt_lengths[r] - 1] == -100).all()
        assert (labels[r, prompt_lengths[r] - 1:len(seqs[r])] != -100).any()

    orig = tr._save_checkpoint

    def kill_after_first(work, h, opt, step, history):  # a run killed right after its step-10 checkpoint
        orig(work, h, opt, step, history)
        if step == 10:
            raise KeyboardInterrupt

    tr._save_checkpoint = kill_after_first
    try:
        with pytest.raises(KeyboardInterrupt):
            train_eagle3(model, _CharTokenizer(), tmp_path / "b", cfg, progress=False)
    finally:
        tr._save_checkpoint = orig
    assert not (tmp_path / "b").exists()  # nothing half-written
    with pytest.raises(LeanLMError, match="other lr"):
        train_eagle3(model, _CharTokenizer(), tmp_path / "b", Eagle3TrainConfig(**{**cfg.__dict__, "lr": 1e-4}),
                     progress=False)
    resumed = train_eagle3(model, _CharTokenizer(), tmp_path / "b", cfg, progress=False)
    for (k, a), b in zip(head.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    hist = head.config.extra
    assert hist["trained_steps"] == hist["planned_steps"]


def test_eagle3_training_reduces_loss(tmp_path):
    import leanlm.speculative.train as tr

    model = tiny_llama(layers=4)
    cfg = Eagle3TrainConfig(prompts="news", num_prompts=32, max_new_tokens=16, draft_vocab=64, epochs=6,
                            batch_size=4, lr=3e-3, checkpoint_every=1000, ttt_steps=2, train_lm_head=True)
    seen = []
    orig = tr._save_checkpoint
    tr._save_checkpoint = lambda work, h, opt, step, history: seen.append(list(history)) or orig(work, h, opt, step, history)
    try:
        train_eagle3(model, _CharTokenizer(), tmp_path / "h", cfg, progress=False)
    finally:
        tr._save_checkpoint = orig
    losses = [h["loss"] for h in seen[-1]]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)


def test_draft_model_with_other_vocabulary_is_refused():
    with pytest.raises(LeanLMError, match="share the target's tokenizer"):
        ModelDrafter(tiny_llama(vocab=128), 64, compile=False, target_vocab=256)


def test_cli_generate_and_bench_with_drafts(tiny_model_dir, tmp_path, capsys):
    assert main(["generate", str(tiny_model_dir), "The cat", "--max-new-tokens", "12", "--draft", "ngram",
                 "--no-compile", "--tree", "--draft-tokens", "6"]) == 0
    assert "tokens per target step" in capsys.readouterr().err
    assert main(["generate", str(tiny_model_dir), "The cat", "--draft", str(tiny_model_dir), "--tree",
                 "--no-compile"]) == 2
    assert "drafts chains only" in capsys.readouterr().err
    res = tmp_path / "bench.json"
    assert main(["speculate", "bench", str(tiny_model_dir), "--draft", "ngram", "--draft", str(tiny_model_dir),
                 "--prompts", "news", "--num-prompts", "2", "--max-new-tokens", "16", "--no-compile",
                 "--json", str(res)]) == 0
    rows = json.loads(res.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["plain", "ngram", "tiny"]
    assert rows[2]["acceptance_length"] > 4.5  # the target as its own draft model accepts everything
    assert main(["generate", str(tiny_model_dir), "x", "--draft", str(tmp_path), "--no-compile"]) == 2
    assert "leanlm: error:" in capsys.readouterr().err
