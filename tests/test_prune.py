"""Structured pruning, importance, sparsity and distillation on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch

import leanlm
from leanlm.cli import main
from leanlm.prune import Keep, apply_keep, importance, non_embedding_parameters, prune, shape_for_target
from leanlm.prune.sparsity import prune_mask, sparsify, sparsity_report
from tiny import tiny_gemma3, tiny_llama, tiny_qwen2

MODELS = [tiny_llama, tiny_qwen2, tiny_gemma3]


def _ids(n=8, length=32, seed=0):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def _loop(ids):
    return lambda m: m(ids, use_cache=False)


@pytest.mark.parametrize("make", MODELS)
def test_pruning_nothing_reproduces_the_logits_exactly(make):
    model = make()
    same = apply_keep(model, Keep.everything(model))
    ids = _ids(2)
    with torch.no_grad():
        assert torch.equal(same(ids).logits, model(ids).logits)


@pytest.mark.parametrize("make", MODELS)
def test_pruned_shapes_counts_and_plain_transformers_reload(make, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make()
    small = prune(model, _ids(), heads=2, kv_heads=1, ffn=64, hidden=48, layers=1)
    c = small.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.hidden_size, c.num_hidden_layers) == \
        (2, 1, 64, 48, 1)
    layer = small.model.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (2 * 16, 48)
    assert layer.self_attn.k_proj.weight.shape == (16, 48)
    assert layer.mlp.down_proj.weight.shape == (48, 64)
    assert small.model.embed_tokens.weight.shape == (256, 48)
    assert non_embedding_parameters(small) == sum(p.numel() for n, p in small.named_parameters()
                                                  if ".layers." in n and p.ndim == 2)
    small.save_pretrained(tmp_path / "small")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "small")
    ids = _ids(2)
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, small(ids).logits, atol=1e-6)


@pytest.mark.parametrize("make", MODELS)
def test_dead_hidden_channel_ranks_last_and_prunes_away_harmlessly(make):
    model = make()
    with torch.no_grad():  # channel 5 is never written: embeddings, o_proj and down_proj rows are zero
        model.model.embed_tokens.weight[:, 5] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[5] = 0
            layer.mlp.down_proj.weight[5] = 0
    ids = _ids()
    imp = importance(model, _loop(ids))
    assert imp.hidden.argmin() == 5
    keep = Keep.everything(model)
    keep.hidden = [i for i in range(64) if i != 5]
    small = apply_keep(model, keep)  # norm gains compensate the narrower RMS: only epsilon differs
    with torch.no_grad():
        assert torch.allclose(small(ids).logits, model(ids).logits, atol=2e-3)


@pytest.mark.parametrize("make", MODELS)
def test_silent_query_heads_prune_away_without_changing_the_logits(make):
    from leanlm.prune.shapes import attention_shape

    model = make()
    n_heads, n_kv, hd, _ = attention_shape(model)
    silent = [1, n_heads - 1]  # one query head in the first and the last KV group
    with torch.no_grad():  # their attention outputs never reach the residual stream
        for layer in model.model.layers:
            for h in silent:
                layer.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
    ids = _ids()
    small = prune(model, ids, heads=n_heads - n_kv)
    assert small.config.num_attention_heads == n_heads - n_kv
    with torch.no_grad():
        assert torch.allclose(small(ids).logits, model(ids).logits, atol=1e-5)


def test_planted_dead_head_and_neuron_rank_last():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[16:32] = 0  # KV head 1 feeds query heads 2 and 3
        model.model.layers[1].self_attn.q_proj.weight[0:16] *= 0  # query head 0 still attends (uniformly)
        model.model.layers[0].mlp.up_proj.weight[7] = 0  # neuron 7 is always zero
    imp = importance(model, _loop(_ids()))
    assert set(imp.heads[1].argsort()[:2].tolist()) == {2, 3}
    assert imp.kv_groups[1].argmin() == 1
    assert imp.neurons[0].argmin() == 7 and imp.neurons[0, 7] == 0
    small = prune(model, _ids(), kv_heads=1, ffn=127)
    assert small.config.num_key_value_heads == 1 and small.config.intermediate_size == 127
    with torch.no_grad():  # layer 1 kept KV group 0: its K and V are the original group 0's
        assert torch.equal(small.model.layers[1].self_attn.v_proj.weight, model.model.layers[1].self_attn.v_proj.weight[:16])
        assert torch.equal(small.model.layers[0].mlp.up_proj.weight,
                           model.model.layers[0].mlp.up_proj.weight[[i for i in range(128) if i != 7]])


def test_layer_importance_finds_an_identity_layer():
    model = tiny_llama(layers=3)
    with torch.no_grad():  # layer 1 adds nothing to the residual stream
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    ids = _ids()
    imp = importance(model, _loop(ids))
    assert imp.layers.argmin() == 1 and imp.layers[1] < 1e-6
    from leanlm.prune import layer_loss_importance

    assert layer_loss_importance(model, ids).abs()[1] < 1e-5
    small = prune(model, ids, layers=2)
    with torch.no_grad():
        assert torch.allclose(small(ids).logits, model(ids).logits, atol=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_greedy_layer_loss_matches_brute_force_skipping(make):
    from leanlm.prune import layer_loss_importance
    from leanlm.train.losses import next_token_loss

    model = make(layers=5).eval()
    ids = _ids(6)

    @torch.no_grad()
    def loss_without(gone):  # full forwards with the layers in `gone` passing their input through
        def through(mod, args, kwargs, out):
            h = args[0] if args else kwargs["hidden_states"]
            return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

        hooks = [model.model.layers[j].register_forward_hook(through, with_kwargs=True) for j in gone]
        try:
            return sum(float(next_token_loss(model(ids[i:i + 4], use_cache=False).logits, ids[i:i + 4]))
                       for i in range(0, 6, 4)) / ids[:, 1:].numel()
        finally:
            for h in hooks:
                h.remove()

    base = loss_without([])
    one = layer_loss_importance(model, ids)
    assert torch.allclose(one, torch.tensor([loss_without([j]) - base for j in range(5)]), atol=1e-5)
    first = int(one.argmin())
    second = min((j for j in range(5) if j != first), key=lambda j: loss_without([first, j]))
    greedy = layer_loss_importance(model, ids, drop=2)
    assert greedy.argsort()[:2].tolist() == [first, second]


def test_parameter_targets():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=512, num_hidden_layers=10,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    model = LlamaForCausalLM(config)
    assert shape_for_target(model, 0.7, "depth") == {"layers": 7}
    ffn = shape_for_target(model, 0.7, "width")["ffn"]
    small = prune(model, _ids(), params="70%", axis="width")
    assert small.config.intermediate_size == ffn
    assert abs(non_embedding_parameters(small) / non_embedding_parameters(model) - 0.7) < 0.03
    with pytest.raises(leanlm.LeanLMError, match="like 70%"):
        prune(model, _ids(), params="most")
    with pytest.raises(leanlm.LeanLMError, match="multiple of the KV heads"):
        prune(model, _ids(), heads=3)


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(leanlm.LeanLMError, match="does not support 'gpt2'"):
        prune(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=4)), _ids(), layers=1)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_sparsity_masks_have_the_exact_pattern(method):
    model = tiny_llama()
    ids = _ids()
    sparsify(model, method, "2:4", calib=ids, progress=False)
    for layer in model.model.layers:
        for lin in (layer.self_attn.q_proj, layer.mlp.down_proj, layer.mlp.gate_proj):
            assert ((lin.weight.reshape(-1, 4) != 0).sum(-1) == 2).all()
    assert sparsity_report(model)["zero_fraction"] == 0.5
    model = tiny_llama()
    sparsify(model, method, 0.5, calib=ids, progress=False)
    rows = model.model.layers[0].mlp.up_proj.weight
    assert ((rows == 0).sum(-1) == rows.shape[1] // 2).all()


def test_sparsegpt_beats_magnitude_on_the_layer_outputs():
    model = tiny_llama()
    ids = _ids(16)
    with torch.no_grad():
        ref = model(ids).logits
    err = {}
    for method in ("magnitude", "sparsegpt"):
        m = sparsify(copy.deepcopy(model), method, "2:4", calib=ids, progress=False)
        with torch.no_grad():
            err[method] = (m(ids).logits - ref).pow(2).mean()
    assert err["sparsegpt"] < err["magnitude"]


def test_prune_mask():
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 5.0, 6.0, 7.0]])
    assert prune_mask(score, "2:4").tolist() == [[True, False, True, False, False, False, True, True]]
    assert prune_mask(score, 0.25).tolist() == [[True, False, True, True, False, True, True, True]]


def test_distillation_recovers_and_keeps_sparsity(tmp_path):
    teacher = tiny_llama(seed=3)
    ids = _ids(32)
    student = prune(teacher, ids, ffn=64, hidden=48)
    sparsify(student, "magnitude", "2:4")
    zeros = student.model.layers[0].mlp.up_proj.weight == 0
    cfg = leanlm.TrainConfig(batch_size=8, micro_batch=4, lr=3e-3, epochs=3, bf16=False, seq_len=32)
    dcfg = leanlm.DistillConfig(hidden_weight=0.5)
    emb = student.get_input_embeddings().weight.detach().clone()
    leanlm.train.distill(student, teacher, ids, cfg, dcfg, work=tmp_path / "w", progress=False, train_embeddings=True)
    hist = student.leanlm_training["history"]
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert torch.equal(student.model.layers[0].mlp.up_proj.weight == 0, zeros)
    assert not torch.equal(student.get_input_embeddings().weight, emb)


def test_cli_prune_sparsify_distill(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", str(tiny_model_dir), "--ffn", "64", "--layers", "1", "--out", str(out),
                 "--calib-samples", "4", "--seq-len", "64"]) == 0
    assert "non-embedding parameters" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1
    assert leanlm.load(out)[0].leanlm_pruned_from["kept_layers"] in ([0], [1])  # for the hidden-state loss
    assert main(["sparsify", str(out), "--method", "wanda", "--out", str(tmp_path / "sparse"),
                 "--calib-samples", "4", "--seq-len", "64"]) == 0
    assert main(["distill", str(tmp_path / "sparse"), "--teacher", str(tiny_model_dir), "--out",
                 str(tmp_path / "dist"), "--tokens", "1024", "--seq-len", "64", "--batch-size", "4",
                 "--no-bf16", "--hidden-weight", "0.5"]) == 0
    model, _ = leanlm.load(tmp_path / "dist")
    sparse, _ = leanlm.load(tmp_path / "sparse")  # the embeddings stay fixed without --train-embeddings
    assert torch.equal(model.get_input_embeddings().weight, sparse.get_input_embeddings().weight)
    w = model.model.layers[0].mlp.up_proj.weight
    assert ((w.reshape(-1, 4) != 0).sum(-1) <= 2).all()  # the 2:4 mask survived distillation
    assert not (tmp_path / "dist.work").exists()
    assert main(["prune", str(tiny_model_dir), "--out", str(tmp_path / "x")]) == 2
    assert "nothing to prune" in capsys.readouterr().err


def test_hidden_loss_pairs_a_depth_pruned_student_with_the_layers_it_kept():
    from leanlm.train.distill import hidden_loss
    from leanlm.train.losses import hidden_pairs

    assert hidden_pairs(3, 6, "all", [0, 2, 5]) == [(1, 1), (2, 3), (-1, -1)]
    assert hidden_pairs(3, 6, "all") == [(1, 2), (2, 4), (-1, -1)]
    assert hidden_pairs(3, 6, "final") == [(-1, -1)]
    teacher = tiny_llama(layers=5)
    with torch.no_grad():  # layer 1 adds nothing: dropping it leaves every kept layer's output as it was
        teacher.model.layers[1].self_attn.o_proj.weight.zero_()
        teacher.model.layers[1].mlp.down_proj.weight.zero_()
    ids = _ids(2)
    student = prune(teacher, ids, layers=4, layer_metric="block", reconstruct=False)
    assert student.leanlm_pruned_from["kept_layers"] == [0, 2, 3, 4]
    with torch.no_grad():
        s_h = student(ids, output_hidden_states=True).hidden_states
        t_h = teacher(ids, output_hidden_states=True).hidden_states
        assert float(hidden_loss(student, teacher)(s_h, t_h)) < 1e-8
        del student.leanlm_pruned_from  # unknown origin: evenly spaced layers, which are not these
        assert float(hidden_loss(student, teacher)(s_h, t_h)) > 1e-3


def test_pruned_model_quantizes_and_drafts_for_its_teacher():
    from leanlm.engine import Engine
    from leanlm.speculative import ModelDrafter, speculative_generate

    teacher = tiny_llama(layers=2)
    small = prune(teacher, _ids(), ffn=64, layers=1)
    leanlm.quantize(small, "w4a16_rtn_g64")
    prompt = _ids(1, 8, seed=3)[0]
    with Engine(teacher, max_len=64, compile=False) as eng:
        plain = eng.generate(prompt, 20).tokens
        out = speculative_generate(eng, ModelDrafter(small, 64, compile=False), prompt, 20, k=3)
    assert out.tokens == plain  # the pruned, quantized draft never changes the teacher's output


def test_refit_columns_recovers_what_correlated_dropped_inputs_carried():
    from leanlm.prune.reconstruct import refit_columns

    g = torch.Generator().manual_seed(0)
    base = torch.randn(512, 6, generator=g)
    x = torch.cat([base, base[:, :2] + 0.05 * torch.randn(512, 2, generator=g)], 1)  # inputs 6, 7 echo 0, 1
    w = torch.randn(5, 8, generator=g)
    keep = torch.arange(6)
    refit = refit_columns(w, x.T @ x, keep)
    err_cut = (x @ w.T - x[:, keep] @ w[:, keep].T).norm()
    err_refit = (x @ w.T - x[:, keep] @ refit.T).norm()
    assert err_refit < 0.1 * err_cut
    silent = w.clone()
    silent[:, 6:] = 0  # the dropped columns carried nothing: the kept ones stay exactly
    assert torch.equal(refit_columns(silent, x.T @ x, keep), silent[:, keep])
    assert torch.equal(refit_columns(w, x.T @ x, torch.arange(8)), w)
    extra = torch.randn(5, 8, generator=g)  # a target that is linear in the inputs: d = extra @ x
    both = refit_columns(w, x.T @ x, torch.arange(8), damp=1e-6, cross=(x @ extra.T).T @ x)
    assert (x @ both.T - x @ (w + extra).T).norm() < 1e-3 * (x @ extra.T).norm()


def test_skipped_runs_pair_each_kept_layer_with_the_run_it_precedes():
    from leanlm.prune.reconstruct import skipped_runs

    assert skipped_runs([0, 1, 4], 6) == {1: 3, 4: 5}
    assert skipped_runs([1, 2], 3) == {}  # a dropped first layer has nothing before it to write for it
    assert skipped_runs(list(range(4)), 4) == {}


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
def test_depth_refit_brings_a_layer_dropped_model_closer_to_the_original(make):
    from leanlm.prune.reconstruct import reconstruct_pruned

    model = make(layers=4)
    calib = _ids(64, seed=1)
    keep = Keep.everything(model)
    keep.layers = [0, 3]
    plain = apply_keep(model, keep)
    refit = reconstruct_pruned(copy.deepcopy(plain), model, keep, _loop(calib), progress=False)
    # Only the down_proj before the dropped run (layers 1, 2) moves.
    assert not torch.equal(plain.model.layers[0].mlp.down_proj.weight, refit.model.layers[0].mlp.down_proj.weight)
    for a, b in zip(plain.state_dict().items(), refit.state_dict().items()):
        assert a[0] == "model.layers.0.mlp.down_proj.weight" or torch.equal(a[1], b[1]), a[0]

    def stream_error(small):  # the residual stream where the dropped run ended, against the original's
        with torch.no_grad():
            want = model(calib, output_hidden_states=True).hidden_states[3]
            return float((small(calib, output_hidden_states=True).hidden_states[1] - want).norm())

    # A random tiny model's layers are far from linear in each other (SmolLM2's are not: 63 -> 40
    # perplexity), but least squares must still lower the error on the calibration tokens.
    assert stream_error(refit) < 0.97 * stream_error(plain)


def test_depth_refit_leaves_models_that_normalize_the_mlp_output_alone():
    from leanlm.prune.reconstruct import reconstruct_pruned

    model = tiny_gemma3(layers=4)
    keep = Keep.everything(model)
    keep.layers = [0, 3]
    plain = apply_keep(model, keep)
    refit = reconstruct_pruned(copy.deepcopy(plain), model, keep, _loop(_ids(16, seed=1)), progress=False)
    for a, b in zip(plain.parameters(), refit.parameters()):
        assert torch.equal(a, b)


def test_select_columns_drops_the_inputs_the_others_can_rebuild():
    from leanlm.prune.reconstruct import refit_columns, select_columns

    g = torch.Generator().manual_seed(0)
    base = torch.randn(512, 6, generator=g)
    small = 0.3 * torch.randn(512, 2, generator=g)  # quiet but independent: nothing else can stand in for them
    loud = 3 * base[:, :2] + 0.01 * torch.randn(512, 2, generator=g)  # loud echoes of inputs 0 and 1
    x = torch.cat([base, small, loud], 1)
    w = torch.randn(5, 10, generator=g)
    h = x.T @ x
    keep = select_columns(w, h, 8, rounds=2)
    assert len(keep) == 8 and keep == sorted(keep)
    assert {6, 7} <= set(keep)  # activation size alone would have dropped these
    assert len({0, 1, 8, 9} - set(keep)) == 2  # one of each echoing pair goes

    def err(cols):
        cols = torch.tensor(cols)
        return (x @ w.T - x[:, cols] @ refit_columns(w, h, cols).T).norm()

    by_size = sorted(x.abs().mean(0).topk(8).indices.tolist())
    assert err(keep) < 0.1 * err(by_size)


@pytest.mark.parametrize("make", MODELS)
def test_reconstruction_brings_pruned_logits_closer_to_the_original(make):
    model = make()
    calib, held_out = _ids(16, seed=1), _ids(4, seed=2)
    plain = prune(model, calib, heads=2, ffn=64, reconstruct=False)
    refit = prune(model, calib, heads=2, ffn=64)
    for name in ("q_proj", "k_proj", "v_proj"):  # only the projections that lost inputs change
        assert torch.equal(getattr(plain.model.layers[0].self_attn, name).weight,
                           getattr(refit.model.layers[0].self_attn, name).weight)
    assert not torch.equal(plain.model.layers[0].mlp.down_proj.weight, refit.model.layers[0].mlp.down_proj.weight)

    def kl(small):
        with torch.no_grad():
            p = torch.log_softmax(model(held_out).logits, -1)
            q = torch.log_softmax(small(held_out).logits, -1)
        return float((p.exp() * (p - q)).sum(-1).mean())

    assert kl(refit) < 0.8 * kl(plain)
