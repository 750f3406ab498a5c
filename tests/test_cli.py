"""The CLI: clear one-line errors with exit status 2, and the commands on tiny inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from leanlm.cli import main


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error" in line.lower()]
    assert len(errors) == 1 and errors[0] == err[-1], err
    assert err[-1].startswith("leanlm: error: ")
    return err[-1]


@pytest.mark.parametrize("argv,match", [
    (["eval", "no-such-model"], "neither a built-in name"),
    (["quantize", "smollm2-135m", "--recipe", "int5", "--out", "x"], "unknown recipe 'int5'"),
    (["convert", "missing.gguf", "out"], "does not exist"),
    (["compare", "missing.json"], "missing.json"),
])
def test_bad_input_exits_2_with_one_line(argv, match, capsys):
    assert main(argv) == 2
    assert match in _error_line(capsys)


def test_not_a_model_folder(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "no config.json" in _error_line(capsys)


def test_non_utf8_data_file(tmp_path, tiny_model_dir, capsys):
    f = tmp_path / "latin1.txt"
    f.write_bytes(b"d\xe9j\xe0 vu\n\n" * 50)
    assert main(["eval", str(tiny_model_dir), "--data", str(f), "--max-tokens", "16"]) == 2
    assert "not UTF-8" in _error_line(capsys)


def test_window_beyond_context(tiny_model_dir, capsys):
    assert main(["eval", str(tiny_model_dir), "--data", "news", "--max-tokens", "1024", "--window", "1024"]) == 2
    assert "exceeds the model's context of 256" in _error_line(capsys)


def test_eval_quantize_compare(tmp_path, tiny_model_dir, capsys):
    res = tmp_path / "float.json"
    assert main(["eval", str(tiny_model_dir), "--data", "news", "--max-tokens", "128", "--window", "64",
                 "--json", str(res)]) == 0
    result = json.loads(res.read_text())
    assert result["scored_tokens"] == 127 and result["perplexity"] > 1
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_model_dir), "--recipe", "w8a16", "--out", str(out),
                 "--eval-tokens", "128", "--eval-data", "news"]) == 0
    assert (out / "leanlm_quant.json").is_file() and (out / "eval.json").is_file()
    assert main(["quantize", str(tiny_model_dir), "--recipe", "w8a16", "--out", str(out)]) == 2
    assert "already exists" in _error_line(capsys)
    assert main(["compare", str(res), str(out / "eval.json"), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.html").is_file()


def test_console_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "leanlm.cli", "recipes"], capture_output=True, text=True, check=True)
    assert "w4a16_rtn" in r.stdout


def test_recipes_prints_yaml_that_loads_back(tmp_path, capsys):
    from leanlm.quant.recipes import PRESETS, get_recipe

    assert main(["recipes", "int8_sq"]) == 0
    f = tmp_path / "r.yaml"
    f.write_text(capsys.readouterr().out)
    assert get_recipe(str(f)).to_dict() == PRESETS["int8_sq"].to_dict()


def test_quantize_with_calibration(tmp_path, tiny_model_dir):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_model_dir), "--recipe", "w4a16_gptq_g64", "--calib", "news",
                 "--calib-samples", "4", "--seq-len", "32", "--out", str(out)]) == 0
    assert (out / "leanlm_quant.json").is_file()


def test_quantize_without_needed_calibration(tmp_path, tiny_model_dir, capsys):
    assert main(["quantize", str(tiny_model_dir), "--recipe", "w4a16_awq", "--out", str(tmp_path / "q")]) == 2
    assert "calibrates on data: pass --calib" in _error_line(capsys)
    assert not (tmp_path / "q").exists()


def test_generate_streams_text_and_stats(tiny_model_dir, capsys):
    assert main(["generate", str(tiny_model_dir), "Once upon a time", "--max-new-tokens", "6", "--no-compile"]) == 0
    out = capsys.readouterr()
    assert out.out.strip()  # some text was streamed
    assert "6 tokens (length)" in out.err and "tokens/s" in out.err


def test_generate_chat_without_template_is_one_line_error(tiny_model_dir, capsys):
    import json as _json

    cfg = tiny_model_dir / "tokenizer_config.json"
    data = _json.loads(cfg.read_text())
    data.pop("chat_template", None)
    cfg.write_text(_json.dumps(data))
    (tiny_model_dir / "chat_template.jinja").unlink(missing_ok=True)
    assert main(["generate", str(tiny_model_dir), "hi", "--chat", "--no-compile"]) == 2
    assert "no chat template" in _error_line(capsys)


def test_export_every_format(tmp_path, tiny_model_dir, capsys):
    q = tmp_path / "q"
    assert main(["quantize", str(tiny_model_dir), "--recipe", "w4a16_rtn_g64", "--out", str(q)]) == 0
    for fmt in ("compressed-tensors", "modelopt", "gguf"):
        out = tmp_path / fmt
        assert main(["export", str(q), "--format", fmt, "--out", str(out)]) == 0
        assert json.loads((out / "leanlm_export.json").read_text())["format"] == fmt
        assert "validated" in capsys.readouterr().out
    assert main(["export", str(q), "--format", "modelopt", "--qtype", "Q8_0", "--out", str(tmp_path / "x")]) == 2
    assert "--qtype applies to --format gguf only" in capsys.readouterr().err
    assert main(["export", str(q), "--format", "gguf", "--out", str(tmp_path / "gguf")]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
