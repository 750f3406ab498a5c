"""Bench scripts end bad input in one line naming the fix, never a traceback."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from leanlm.errors import LeanLMError

ROOT = Path(__file__).resolve().parents[1]
# Loaded from its file: putting bench/ on sys.path would let its scripts' names shadow other modules.
_spec = importlib.util.spec_from_file_location("bench_entry", ROOT / "bench" / "entry.py")
_entry = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_entry)
run_script = _entry.run_script


def _exit_message(fn, monkeypatch) -> str | int:
    monkeypatch.setattr(sys, "argv", ["bench/some.py"])
    with pytest.raises(SystemExit) as e:
        run_script(fn)
    return e.value.code


def test_a_leanlm_error_is_one_line(monkeypatch):
    def bad():
        raise LeanLMError("model 'x' is unknown: pass a built-in name")

    assert _exit_message(bad, monkeypatch) == "bench/some.py: error: model 'x' is unknown: pass a built-in name"


def test_a_failed_child_names_its_command(monkeypatch):
    def bad():
        raise subprocess.CalledProcessError(2, ["python", "-m", "leanlm.cli", "speculate", "train", "nope", "--out"])

    msg = _exit_message(bad, monkeypatch)
    assert msg.startswith("bench/some.py: error: a step failed with status 2") and "leanlm.cli speculate" in msg


def test_the_status_of_main_is_the_exit_status(monkeypatch):
    assert _exit_message(lambda: 3, monkeypatch) == 3
    assert _exit_message(lambda: None, monkeypatch) == 0


def test_a_real_script_with_a_bad_model_prints_one_line():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "qat_speed.py"), "--model", "no-such-model"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("bench/qat_speed.py: error: model 'no-such-model'")


@pytest.mark.parametrize("script, flag", [("decode.py", "--model"), ("speed.py", "--model"), ("scale.py", "--out")])
def test_a_child_flag_from_the_user_is_an_error_not_ignored(script, flag):
    # `--model` for `--models` used to be taken as the hidden child flag and the full default benchmark ran.
    r = subprocess.run([sys.executable, str(ROOT / "bench" / script), flag, "x"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "child process" in r.stderr.strip().splitlines()[-1]
