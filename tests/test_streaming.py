"""Streaming PTQ: one decoder layer in memory at a time, the same result as `quantize`, resumable."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import leanlm
from leanlm.quant.streaming import merge_safetensors, quantize_streaming

from tiny import tiny_gemma3, tiny_llama, tiny_qwen2

TESTS = Path(__file__).parent


def _save_with_tokenizer(model, out: Path, tok_dir: Path) -> Path:
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / f, out / f)
    return out


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _assert_same_folder(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    assert (a / "leanlm_quant.json").read_text() == (b / "leanlm_quant.json").read_text()


@pytest.mark.parametrize("build,recipe", [
    (tiny_llama, "w4a16_awq"),
    (tiny_llama, "int8_sq_kv_fp8"),
    (tiny_qwen2, "w4a16_gptq"),
    (tiny_gemma3, "nvfp4"),
    (tiny_llama, {"name": "lm_head_too", "rules": [{"pattern": "*", "weight": {"format": "int4", "block_size": 64}}],
                  "exclude": []}),
])
def test_streaming_equals_in_memory(tmp_path, default_model_dir, build, recipe):
    src = _save_with_tokenizer(build(vocab=49152), tmp_path / "float", default_model_dir)
    needs_data = leanlm.get_recipe(recipe).needs_data
    calib = torch.randint(0, 49152, (6, 24), generator=torch.Generator().manual_seed(0)) if needs_data else None
    model, tok = leanlm.load(src)
    leanlm.quantize(model, recipe, calib=calib, progress=False)
    leanlm.save(model, tok, tmp_path / "in_memory")
    out = quantize_streaming(src, recipe, calib, tmp_path / "streamed", progress=False)
    _assert_same_folder(tmp_path / "in_memory", out)
    assert not (tmp_path / "streamed.work").exists()
    ids = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = leanlm.load(tmp_path / "in_memory", packed=False)[0](ids).logits
        b = leanlm.load(out, packed=False)[0](ids).logits
    assert torch.equal(a, b)


def test_killed_run_resumes_from_last_layer(tmp_path, default_model_dir):
    src = _save_with_tokenizer(tiny_llama(vocab=49152, layers=4), tmp_path / "float", default_model_dir)
    calib = torch.randint(0, 49152, (4, 16), generator=torch.Generator().manual_seed(0))
    ref = quantize_streaming(src, "w4a16_gptq", calib, tmp_path / "ref", progress=False)
    done = []

    def kill_after_two(i, seconds):
        done.append(i)
        if i == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_streaming(src, "w4a16_gptq", calib, tmp_path / "out", progress=False, on_layer=kill_after_two)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in (tmp_path / "out.work").glob("layer_*")) == ["layer_0000.safetensors",
                                                                                "layer_0001.safetensors"]
    resumed = []
    quantize_streaming(src, "w4a16_gptq", calib, tmp_path / "out", progress=False,
                       on_layer=lambda i, s: resumed.append(i))
    assert resumed == [2, 3]
    _assert_same_folder(ref, tmp_path / "out")


def test_resume_with_other_inputs_is_refused(tmp_path, default_model_dir):
    src = _save_with_tokenizer(tiny_llama(vocab=49152), tmp_path / "float", default_model_dir)
    calib = torch.randint(0, 49152, (4, 16), generator=torch.Generator().manual_seed(0))

    def kill(i, seconds):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_streaming(src, "w4a16_awq", calib, tmp_path / "out", progress=False, on_layer=kill)
    with pytest.raises(leanlm.LeanLMError, match="another model, recipe or calibration set"):
        quantize_streaming(src, "w4a16_awq", calib[:2], tmp_path / "out", progress=False)


def test_bad_streaming_input_is_a_clear_error(tmp_path, tiny_model_dir):
    with pytest.raises(leanlm.LeanLMError, match="calibrates on data"):
        quantize_streaming(tiny_model_dir, "w4a16_awq", None, tmp_path / "o", progress=False)
    with pytest.raises(leanlm.LeanLMError, match="pass out=DIR"):
        quantize_streaming(tiny_model_dir, "w4a16_rtn", None, None, progress=False)
    quantize_streaming(tiny_model_dir, "w4a16_rtn", None, tmp_path / "q", progress=False)
    with pytest.raises(leanlm.LeanLMError, match="already quantized"):
        quantize_streaming(tmp_path / "q", "w4a16_rtn", None, tmp_path / "q2", progress=False)
    with pytest.raises(leanlm.LeanLMError, match="already exists"):
        quantize_streaming(tiny_model_dir, "w4a16_rtn", None, tmp_path / "q", progress=False)


def test_merge_safetensors_streams_parts(tmp_path):
    from safetensors.torch import save_file

    a = {"x": torch.randn(3, 5), "i": torch.arange(7, dtype=torch.int8)}
    b = {"y": torch.randn(2, 2).to(torch.bfloat16)}
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    merge_safetensors(tmp_path / "m.safetensors", [tmp_path / "a.safetensors", tmp_path / "b.safetensors"], chunk=7)
    got = _tensors_file(tmp_path / "m.safetensors")
    for k, v in {**a, **b}.items():
        assert torch.equal(got[k], v)
    with pytest.raises(leanlm.LeanLMError, match="appears in two"):
        merge_safetensors(tmp_path / "m2.safetensors", [tmp_path / "a.safetensors", tmp_path / "a.safetensors"])


def _tensors_file(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_model_larger_than_the_memory_limit_streams(tmp_path, default_model_dir):
    from leanlm.synthetic import write_random_llama

    limit_mib = 800
    src = write_random_llama(tmp_path / "big", hidden=1024, intermediate=4096, layers=16, heads=16, kv_heads=4,
                             vocab=49152, tokenizer_from=default_model_dir)
    weights = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    assert weights > (limit_mib << 20) * 1.3  # float32 weights well past the limit
    # RLIMIT_DATA counts the heap's address space. glibc's default lets that grow with fragmentation while
    # the memory actually held stays flat; a fixed mmap threshold makes the limit measure what is held.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)]),
           "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}

    def child(mode):
        return subprocess.run([sys.executable, str(TESTS / "streaming_script.py"), mode, str(src),
                               str(tmp_path / "q"), str(limit_mib)], env=env, capture_output=True, text=True,
                              timeout=600)

    assert "Cannot allocate memory" in child("load").stderr  # the limit binds: the float model cannot load
    run = child("stream")
    assert run.returncode == 0, run.stderr[-2000:]
    model, tok = leanlm.load(tmp_path / "q")
    assert model.leanlm_kernels == {"w8a8": 16 * 7}
    ids = tok("Streaming works", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_cli_streaming_quantize(tmp_path, tiny_model_dir, capsys):
    from leanlm.cli import main

    out = tmp_path / "q"
    assert main(["quantize", str(tiny_model_dir), "--recipe", "w4a16_awq", "--calib", "wiki", "--calib-samples", "4",
                 "--seq-len", "32", "--out", str(out), "--streaming"]) == 0
    captured = capsys.readouterr()
    assert "(streaming)" in captured.out and "peak memory:" in captured.err
    model, _ = leanlm.load(out)
    assert model.leanlm_kernels == {"int4": 14}
    assert main(["quantize", str(tiny_model_dir), "--recipe", "w4a16_awq", "--out", str(tmp_path / "x"),
                 "--streaming"]) == 2
    assert "calibrates on data" in capsys.readouterr().err
