"""`herd generate` as a user runs it: a real process, the default model, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.parity import tiny_checkpoints as tiny


def herd(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "herd", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_generate_answers_on_the_default_model_with_stats():
    out = herd("generate", "What is the capital of France?", "--max-tokens", "24", "--stats")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "loaded in" in out.stderr and "tokens/s" in out.stderr


def test_generate_takes_a_checkpoint_directory_and_sampling_flags(tmp_path):
    path = tiny.save_llama4(tmp_path / "tiny")
    args = ["generate", "hello", "--model", str(path), "--max-tokens", "8", "--temperature", "0.8",
            "--seed", "3", "--dtype", "float32"]
    first, second = herd(*args), herd(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout  # seeded


@pytest.mark.parametrize("args,needle", [
    (["--model", "/nonexistent/model"], "no such checkpoint"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--temperature", "-1"], "--temperature"),
    (["--dtype", "int3"], "dtype"),
])
def test_bad_input_is_one_line_without_traceback(args, needle):
    out = herd("generate", "hi", *args)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("herd generate: error:") and needle in lines[0]


def test_truncated_gguf_is_one_line(tmp_path):
    from models.default import default_model_path

    bad = tmp_path / "cut.gguf"
    bad.write_bytes(default_model_path().read_bytes()[:5_000_000])
    out = herd("generate", "hi", "--model", str(bad))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert str(bad) in out.stderr and len(out.stderr.strip().splitlines()) == 1
