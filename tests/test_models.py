"""Loading, saving and the clear one-line errors for bad model inputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import leanlm
from leanlm.atomic import atomic_dir
from leanlm.errors import LeanLMError
from leanlm.models import check_gguf, check_safetensors, resolve


def test_load_local_folder_and_save_roundtrip(tiny_model_dir, tmp_path):
    model, tok = leanlm.load(tiny_model_dir)
    ids = torch.tensor([[1, 2, 3, 4]])
    out = leanlm.save(model, tok, tmp_path / "copy")
    again, _ = leanlm.load(out)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, again(ids).logits)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "temporary folders left behind"


def test_unknown_name_is_one_clear_line():
    with pytest.raises(LeanLMError, match="neither a built-in name") as e:
        resolve("no-such-model")
    assert "\n" not in str(e.value)


def test_folder_without_config(tmp_path):
    with pytest.raises(LeanLMError, match="no config.json"):
        resolve(tmp_path)


def test_pickled_weights_are_refused(tiny_model_dir):
    for f in tiny_model_dir.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(LeanLMError, match="pickled weights are never loaded"):
        resolve(tiny_model_dir)


def test_truncated_safetensors(tiny_model_dir):
    f = next(tiny_model_dir.glob("*.safetensors"))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(LeanLMError, match="truncated"):
        leanlm.load(tiny_model_dir)


def test_corrupt_safetensors_header(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}")
    with pytest.raises(LeanLMError, match="corrupt"):
        check_safetensors(f)


def test_gguf_bad_magic_and_truncated(tmp_path, default_model_dir):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(LeanLMError, match="not a GGUF file"):
        check_gguf(bad)
    src = json.loads((default_model_dir / "leanlm_source.json").read_text())["converted_from"]
    cut = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        cut.write_bytes(f.read(5_000_000))
    with pytest.raises(LeanLMError, match="truncated|corrupt"):
        check_gguf(cut)
    with pytest.raises(LeanLMError):
        leanlm.convert_gguf(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gguf_path_given_to_load_says_convert(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(LeanLMError, match="leanlm convert"):
        resolve(f)


def test_atomic_dir_leaves_nothing_on_crash(tmp_path):
    dest = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_refuses_existing_unless_overwrite(tmp_path):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "old").write_text("x")
    with pytest.raises(LeanLMError, match="already exists"):
        with atomic_dir(dest):
            pass
    with atomic_dir(dest, overwrite=True) as tmp:
        (tmp / "new").write_text("y")
    assert sorted(p.name for p in dest.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_list_models_names_builtins():
    names = [m["name"] for m in leanlm.list_models()]
    assert names == ["smollm2-135m", "gemma3-270m"]


def test_shared_gguf_reads_parse_each_file_once(tmp_path):
    """One parse per file inside the block (transformers asks four times per load), a fresh one after a
    rewrite, and gguf's own reader back afterwards."""
    gguf = pytest.importorskip("gguf")
    from leanlm.models import shared_gguf_reads

    path = tmp_path / "m.gguf"

    def write(n):
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_block_count(n)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    write(1)
    original = gguf.GGUFReader
    with shared_gguf_reads():
        first = gguf.GGUFReader(str(path))
        assert gguf.GGUFReader(path) is first
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        write(22)  # a different file under the same name
        again = gguf.GGUFReader(str(path))
        assert again is not first and again.fields["llama.block_count"].contents() == 22
    assert gguf.GGUFReader is original
