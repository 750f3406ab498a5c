"""QAT / QAD / the training loop: STE and LSQ gradients, loss going down, zero self-distillation,
resume after a kill, two processes (data parallel or FSDP) agreeing with one, sharded checkpoints,
the Trainer integration."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import leanlm
from leanlm.quant.formats import (NAMED_SPECS, QuantSpec, compute_qparams, effective_scale, fake_quantize,
                                  fake_quantize_lsq)
from leanlm.quant.linear import QuantLinear
from leanlm.train import DistillConfig, TrainConfig, qad, qat
from leanlm.train.losses import kd_loss, kd_loss_topk, teacher_topk
from tiny import tiny_llama

TESTS = Path(__file__).parent


def _data(n=16, length=32, seed=0):
    # Repetitive sequences: a tiny model can learn them within a few steps.
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (n, 8), generator=g)
    return base.repeat(1, length // 8)


def test_lsq_gradients_match_the_formula():
    spec = QuantSpec("int4", block_size=4)
    w = torch.tensor([[0.1, -0.7, 0.35, 2.0]], requires_grad=True)
    s = torch.tensor([[[0.1]]], requires_grad=True)  # int4 codes -8..7 (range 7.5): 2.0 is clipped
    y = fake_quantize_lsq(w, spec, s)
    assert torch.allclose(y, torch.tensor([[0.1, -0.7, 0.4, 0.7]]))
    y.sum().backward()
    assert torch.equal(w.grad, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))  # straight through, zero where clipped
    # LSQ: q - x/s inside the range, the clipped code (7) outside; scaled by 1/sqrt(numel * range)
    lsq = (1.0 - 1.0) + (-7.0 + 7.0) + (4.0 - 3.5) + 7.0
    assert torch.allclose(s.grad.reshape(()), torch.tensor(lsq / (4 * 7.5) ** 0.5))


@pytest.mark.parametrize("width", [20, 32])  # 20: partial blocks (PyTorch ops); 32: the fused kernel where it applies
def test_scale_gradients_match_autograd_through_the_scale(width):
    from leanlm.quant.formats import from_blocks, round_to_format, to_blocks

    torch.manual_seed(0)
    for spec in (NAMED_SPECS["nvfp4"], QuantSpec("int4", block_size=8), QuantSpec("int8", block_size=-1),
                 QuantSpec("int4", block_size=0)):
        x = torch.randn(3, width, requires_grad=True)
        g = torch.randn(3, width)
        (fake_quantize(x, spec, scale_grad=True) * g).sum().backward()
        # Reference: scale = amax * (stored scale / amax) (straight through the scale's rounding), values
        # straight through their rounding inside the range and constant (+-range) where clipped.
        ref = x.detach().clone().requires_grad_(True)
        xb = to_blocks(ref, spec.block_size)  # (zero padding of partial blocks: its gradient is dropped)
        amax = xb.abs().amax(-1, keepdim=True)
        s = amax * (effective_scale(compute_qparams(ref.detach(), spec)) / amax).detach()
        v = xb / s
        inside = (v.detach().abs() <= spec.element.range).float()
        vq = v * inside + (round_to_format(v.detach(), spec.element) - v * inside).detach()
        (from_blocks(vq * s, ref.shape) * g).sum().backward()
        assert torch.allclose(x.grad, ref.grad, atol=1e-5), spec
        plain = x.detach().clone().requires_grad_(True)
        (fake_quantize(plain, spec) * g).sum().backward()
        assert not torch.allclose(plain.grad, x.grad)  # without it, only the straight-through part
    q = QuantLinear(32, 8, False, None, NAMED_SPECS["nvfp4"].with_(dynamic=True))  # a layer's dynamic inputs
    torch.nn.init.normal_(q.weight)
    grads = []
    assert q.scale_grad  # on unless turned off
    for q.scale_grad in (False, True):
        x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
        q(x).sum().backward()
        grads.append(x.grad)
    assert not torch.allclose(*grads)


def test_lsq_forward_uses_the_stored_scale_encoding():
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    for name in ("nvfp4", "mxfp4"):
        spec = NAMED_SPECS[name]
        qp = compute_qparams(w, spec)
        scale = effective_scale(qp) * 1.013  # off the E4M3 / E8M0 grid: the forward rounds it as freeze would
        q = QuantLinear(32, 8, False, spec)
        q.weight.data.copy_(w)
        q.learn_scales()
        q.learned_scale.data.copy_(scale)
        fake = q.quantized_weight().detach()
        q.freeze()
        assert torch.equal(fake, q._dequantize_frozen()), name
        assert "learned_scale" not in dict(q.named_parameters())


def test_qat_lowers_the_loss_and_saves_like_ptq(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = tiny_llama(seed=1)
    data = _data(32)
    held = data[:8]  # memorizing the repeated patterns is the learnable part
    before = copy.deepcopy(model)
    leanlm.quantize(before, "w4a16_rtn_g64")
    cfg = TrainConfig(batch_size=8, micro_batch=4, lr=1e-2, epochs=6, bf16=False, seq_len=32)
    qat(model, "w4a16_rtn_g64", data, config=cfg, progress=False, learn_scales=True, train_embeddings=True)
    assert all(q.frozen for q in model.modules() if isinstance(q, QuantLinear))
    from leanlm.train.losses import next_token_loss

    with torch.no_grad():
        loss_before = next_token_loss(before(held).logits, held) / held[:, 1:].numel()
        loss_after = next_token_loss(model(held).logits, held) / held[:, 1:].numel()
    assert loss_after < loss_before - 0.5
    hist = model.leanlm_training["history"]
    assert hist[-1]["loss"] < hist[0]["loss"]
    leanlm.save(model, tokenizer, tmp_path / "out")
    again, _ = leanlm.load(tmp_path / "out", packed=False)  # exactly what was saved
    with torch.no_grad():
        assert torch.equal(again(held).logits, model(held).logits)
    assert json.loads((tmp_path / "out" / "training.json").read_text())["method"] == "qat"


def test_self_distillation_loss_is_zero():
    torch.manual_seed(0)
    model = tiny_llama(seed=2)
    ids = _data(2)
    with torch.no_grad():
        logits = model(ids).logits
        other = tiny_llama(seed=3)(ids).logits
    for t in (1.0, 2.0):
        assert kd_loss(logits, logits.clone(), t).abs() < 1e-4
        v, ix = teacher_topk(logits, 16, t)
        assert kd_loss_topk(logits, v, ix, t).abs() < 1e-4
        assert kd_loss_topk(other, v, ix, t) > 0.1
        # the k+1 buckets bound the full KL from below (grouping outcomes never increases KL)
        assert kd_loss_topk(other, v, ix, t) <= kd_loss(other, logits, t) + 1e-3


def test_qad_with_the_teacher_as_student_starts_at_zero(tmp_path):
    student = tiny_llama(seed=4)
    teacher = copy.deepcopy(student)
    losses = []
    cfg = TrainConfig(batch_size=4, micro_batch=4, lr=0.0, bf16=False, seq_len=32)
    # No quantization (every layer excluded) and lr 0: the student is the teacher, the loss is zero.
    recipe = {"name": "none", "rules": [{"pattern": "*", "enable": False}, {"pattern": "*.q_proj", "weight": "int8"}],
              "exclude": ["*"]}
    with pytest.raises(leanlm.LeanLMError, match="selects no linear layer"):
        qad(student, teacher, recipe, _data(4), config=cfg, progress=False)
    student = copy.deepcopy(teacher)
    qad(student, teacher, "w8a16", _data(8), config=cfg, progress=False,
        on_step=lambda step, rec: losses.append(rec["loss"]))
    assert 0 < losses[0] < 1e-3  # only the INT8 rounding separates them
    cfg.lr = 3e-3
    cfg.epochs = 3
    student = copy.deepcopy(teacher)
    qad(student, teacher, "nvfp4", _data(16), config=cfg, progress=False, work=tmp_path / "w",
        distill=DistillConfig(topk=8, ce_weight=0.1), on_step=lambda step, rec: losses.append(rec["loss"]))
    assert (tmp_path / "w" / "teacher_topk.safetensors").is_file()
    hist = student.leanlm_training["history"]
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_resume_after_a_kill_gives_the_uninterrupted_result(tmp_path):
    cfg = TrainConfig(batch_size=4, micro_batch=2, lr=1e-3, epochs=2, bf16=False, seq_len=32, checkpoint_every=2)
    data = _data(16)

    def run(work, kill_at=None):
        model = tiny_llama(seed=5)

        def on_step(step, rec):
            if step == kill_at:
                raise KeyboardInterrupt

        qat(model, "nvfp4", data, config=cfg, progress=False, work=work, on_step=on_step)
        return model

    ref = run(None)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "w", kill_at=5)  # steps 5 is lost; the checkpoint holds step 4
    assert json.loads((tmp_path / "w" / "checkpoint.json").read_text())["step"] == 4
    resumed = run(tmp_path / "w")
    for (n, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    assert ref.leanlm_training["history"] == resumed.leanlm_training["history"]
    cfg.lr = 2e-3  # other settings cannot resume that checkpoint
    with pytest.raises(leanlm.LeanLMError, match="other lr"):
        run(tmp_path / "w")


def _torchrun(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """tests/train_script.py under torchrun, two processes (gloo, one thread each)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)]), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(TESTS / "train_script.py"), *args], env=env, cwd=cwd, capture_output=True, text=True,
                         timeout=300)
    if check and run.returncode:
        tail = run.stderr if len(run.stderr) < 8000 else run.stderr[:3000] + "\n[...]\n" + run.stderr[-5000:]
        raise AssertionError(f"torchrun failed (exit {run.returncode}):\n{tail}")
    return run


def _train_script():
    sys.path.insert(0, str(TESTS))
    import train_script

    return train_script


def test_two_processes_match_one(tmp_path):
    single = _train_script().run(micro_batch=2)
    _torchrun(tmp_path, str(tmp_path / "ddp.json"), "2")
    assert json.loads((tmp_path / "ddp.json").read_text()) == single
    # FSDP (learned LSQ scales, frozen embeddings sharded too): the same curve; here even bit for bit
    _torchrun(tmp_path, str(tmp_path / "fsdp.json"), "2", "--fsdp")
    fsdp = json.loads((tmp_path / "fsdp.json").read_text())
    assert fsdp["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert fsdp["weight"] == pytest.approx(single["weight"], rel=1e-5, abs=1e-6)


@pytest.fixture(scope="module")
def fsdp_distilled(tmp_path_factory):
    """An uninterrupted two-process FSDP distillation of a 2:4-sparse student: (result, weights file)."""
    folder = tmp_path_factory.mktemp("fsdp")
    _torchrun(folder, str(folder / "run.json"), "2", "--method", "distill", "--fsdp")
    return json.loads((folder / "run.json").read_text()), folder / "run.json.safetensors"


def test_fsdp_distillation_matches_one_process(tmp_path, fsdp_distilled):
    from safetensors.torch import load_file

    single = _train_script().run(str(tmp_path / "one.json"), micro_batch=2, method="distill")
    fsdp, weights = fsdp_distilled
    # Same global batch of 4: one process runs two micro-batches of 2, each of two processes one.
    # Seen: losses within 5e-8 relative (grad norms 1.4e-7: float64 global norm vs float32 per tensor).
    for key in ("loss", "eval_loss", "grad_norm"):
        assert fsdp[key] == pytest.approx(single[key], rel=1e-5), key
    assert fsdp["zeros_kept"] and single["zeros_kept"]  # the sparsity masks work on shards
    assert fsdp["same_on_every_process"]  # the trained weights are back, whole, on every process
    one, two = load_file(str(tmp_path / "one.json.safetensors")), load_file(str(weights))
    for n in one:
        torch.testing.assert_close(two[n], one[n], rtol=1e-4, atol=1e-6, msg=n)


def test_fsdp_checkpoint_resumes_sharded(tmp_path, fsdp_distilled):
    from safetensors.torch import load_file

    work, args = tmp_path / "w", ["2", "--method", "distill", "--fsdp", "--work", str(tmp_path / "w")]
    killed = _torchrun(tmp_path, str(tmp_path / "killed.json"), *args, "--kill-at", "5", check=False)
    assert killed.returncode and "KeyboardInterrupt" in killed.stderr
    assert json.loads((work / "checkpoint.json").read_text())["step"] == 4  # step 5 is lost
    assert sorted(f.name for f in work.glob("checkpoint-*.safetensors")) == [
        "checkpoint-step4-rank0-of-2.safetensors", "checkpoint-step4-rank1-of-2.safetensors"]  # step 2's are gone
    _torchrun(tmp_path, str(tmp_path / "resumed.json"), *args)
    reference, weights = fsdp_distilled
    assert json.loads((tmp_path / "resumed.json").read_text()) == reference
    resumed, uninterrupted = load_file(str(tmp_path / "resumed.json.safetensors")), load_file(str(weights))
    for n in uninterrupted:
        assert torch.equal(resumed[n], uninterrupted[n]), n
    with pytest.raises(leanlm.LeanLMError, match="a run on 2 process.*resume it on 2 processes"):
        _train_script().run(micro_batch=2, method="distill", fsdp=True, work=str(work))


def test_cli_fsdp_flag():
    from leanlm.cli import _train_config, build_parser

    commands = (["qat", "m", "--recipe", "nvfp4"], ["qad", "m", "--recipe", "nvfp4"], ["distill", "m", "--teacher", "t"])
    for command in commands:
        args = build_parser().parse_args([*command, "--out", "o"])
        assert not _train_config(args).fsdp
        assert _train_config(build_parser().parse_args([*command, "--out", "o", "--fsdp"])).fsdp


def test_trainer_integration(tmp_path):
    from transformers import TrainingArguments

    from leanlm.train.hf import DistillationTrainer

    teacher = tiny_llama(seed=6)
    student = copy.deepcopy(teacher)
    leanlm.quantize(student, "nvfp4", freeze=False)
    data = [{"input_ids": x, "labels": x} for x in _data(16)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=3,
                             learning_rate=3e-3, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                             disable_tqdm=True)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=data, teacher=teacher,
                                  distill=DistillConfig(ce_weight=0.1))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    leanlm.freeze_model(student)
    assert all(q.frozen for q in student.modules() if isinstance(q, QuantLinear))


def test_bad_training_input_is_a_clear_error():
    model = tiny_llama()
    with pytest.raises(leanlm.LeanLMError, match="fewer than one batch"):
        qat(model, "w8a16", _data(2), config=TrainConfig(batch_size=8), progress=False)
    with pytest.raises(leanlm.LeanLMError, match="separate float copy"):
        qad(model, model, "w8a16", _data(8), progress=False)
    with pytest.raises(leanlm.LeanLMError, match="temperature"):
        DistillConfig(temperature=0)


def test_cli_qat_and_qad(tmp_path, tiny_model_dir, capsys):
    from leanlm.cli import main

    common = ["--tokens", "1024", "--seq-len", "64", "--batch-size", "4", "--micro-batch", "2", "--no-bf16",
              "--eval-every", "2", "--eval-tokens", "256"]
    assert main(["qat", str(tiny_model_dir), "--recipe", "w4a16_rtn_g64", "--out", str(tmp_path / "qat"),
                 "--learn-scales", "--no-scale-grad", *common]) == 0
    assert main(["qad", str(tiny_model_dir), "--recipe", "nvfp4", "--out", str(tmp_path / "qad"), "--topk", "8",
                 "--data", "generated:pydoc", *common]) == 0
    out = capsys.readouterr().out
    assert "QAT of" in out and "QAD of" in out
    for name in ("qat", "qad"):
        model, _ = leanlm.load(tmp_path / name)
        assert all(q.frozen for q in model.modules() if isinstance(q, QuantLinear))
        history = json.loads((tmp_path / name / "training.json").read_text())["history"]
        assert any("eval_loss" in h for h in history)
        assert (tmp_path / name / "eval.json").is_file()
    for name, scale_grad in (("qat", False), ("qad", True)):  # recorded: a resumed run must match it
        assert json.loads((tmp_path / name / "training.json").read_text())["scale_grad"] is scale_grad
    assert not (tmp_path / "qat.work").exists()  # finished: checkpoint gone
    assert (tmp_path / "qad.work" / "teacher_topk.safetensors").is_file()  # the caches stay for reruns
    assert (tmp_path / "qad.work" / "generated.safetensors").is_file()
    assert main(["qat", str(tiny_model_dir), "--recipe", "nope", "--out", str(tmp_path / "x")]) == 2


def test_generated_text_is_sampled_from_the_model(tmp_path, tokenizer):
    from leanlm.data import calibration_batches
    from leanlm.train.generated import _sample, generated_sequences

    model = tiny_llama(vocab=49152)
    cache = tmp_path / "text.safetensors"
    ids = generated_sequences(model, tokenizer, 6, 24, "pydoc", batch_size=4, cache=cache, progress=False)
    assert ids.shape == (6, 24) and cache.is_file()
    assert torch.equal(ids[:, :8], calibration_batches(tokenizer, "pydoc", 6, 8)[:, :8])  # real prompt tokens
    assert not torch.equal(ids, generated_sequences(model, tokenizer, 6, 24, "pydoc", seed=1, progress=False))
    # Each row has its own generator: the batch a row runs in does not change what it samples.
    assert torch.equal(ids, generated_sequences(model, tokenizer, 6, 24, "pydoc", batch_size=3, progress=False))

    def refuse(*a, **k):
        raise AssertionError("the cache should have been read")

    forward, model.forward = model.forward, refuse
    assert torch.equal(ids, generated_sequences(model, tokenizer, 6, 24, "pydoc", cache=cache, progress=False))
    model.forward = forward
    other = tiny_llama(seed=1, vocab=49152)  # other weights: the cache is stale, the text is written anew
    assert not torch.equal(ids, generated_sequences(other, tokenizer, 6, 24, "pydoc", cache=cache, progress=False))

    # Temperature 0 is the model's greedy continuation, KV cache and all.
    greedy = generated_sequences(model, tokenizer, 2, 20, "pydoc", temperature=0, progress=False)
    ref = model.generate(greedy[:, :8], attention_mask=torch.ones_like(greedy[:, :8]), max_new_tokens=12,
                         do_sample=False, pad_token_id=0)
    assert torch.equal(greedy, ref)

    # At temperature 1 tokens follow the model's distribution.
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    g = [torch.Generator().manual_seed(0)]
    draws = torch.cat([_sample(logits, 1.0, g) for _ in range(20000)]).flatten()
    freq = torch.bincount(draws, minlength=5) / len(draws)
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.012)
    masked = torch.tensor([[-float("inf"), 0.0, -float("inf"), 0.0, -float("inf")]])
    draws = torch.cat([_sample(masked, 1.0, g) for _ in range(2000)]).flatten()
    assert set(draws.tolist()) == {1, 3}  # a token of probability zero is never drawn


def test_generated_source_names():
    from leanlm.train import training_sequences
    from leanlm.train.generated import prompt_source

    assert prompt_source("wiki") is None and prompt_source("notes.txt") is None
    assert prompt_source("generated") == "wiki" and prompt_source("generated:news") == "news"
    with pytest.raises(leanlm.LeanLMError, match="name the prompt source"):
        prompt_source("generated:")
    with pytest.raises(leanlm.LeanLMError, match="sampled from the float model"):
        training_sequences(None, "generated", TrainConfig())


def test_bf16_autocast_only_where_the_hardware_has_it(monkeypatch, caplog):
    """An emulated bf16 matmul is far slower than float32 (AVX2 CPUs), so autocast then stays off, said once."""
    from leanlm.train import loop

    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    monkeypatch.setattr(loop, "bf16_is_native", lambda device: True)
    with loop.autocast(lin, True):
        assert lin(x).dtype == torch.bfloat16
    with loop.autocast(lin, False):
        assert lin(x).dtype == torch.float32
    monkeypatch.setattr(loop, "bf16_is_native", lambda device: False)
    loop._say_once.cache_clear()
    with caplog.at_level("WARNING", logger="leanlm.train.loop"):
        for _ in range(2):
            with loop.autocast(lin, True):
                assert lin(x).dtype == torch.float32
    assert sum("bf16 autocast is off" in r.message for r in caplog.records) == 1
