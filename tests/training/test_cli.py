"""`herd train CONFIG` as a user runs it: a progress bar with loss, tokens/s and MFU; stop part-way
and run again to resume; metrics JSONL, loss plot and export at the end."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from tests.training.conftest import run_config
from training.records import read_metrics


def herd_train(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see conftest.one_thread
    return subprocess.run([sys.executable, "-m", "herd", "train", *args], capture_output=True, text=True, check=False,
                          timeout=300, env=env)


def test_train_stop_resume_and_records(tmp_path, byte_tokenizer_dir, small_corpus):
    out = tmp_path / "run"
    raw = run_config(out, byte_tokenizer_dir, small_corpus, train={"steps": 6},
                     output={"progress": True, "plot": True, "export": True})
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))

    first = herd_train(str(config), "--stop-at", "3")
    assert first.returncode == 0, first.stderr
    assert "loss=" in first.stderr and "tok/s=" in first.stderr and "MFU=" in first.stderr
    assert (out / "checkpoints" / "step_000003" / "COMPLETE").is_file() and not (out / "export").exists()
    assert first.stdout.startswith("step 3/6: loss ")

    second = herd_train(str(config))
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stderr and "step_000003" in second.stderr
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert (out / "loss.png").is_file() and (out / "export" / "model.safetensors").is_file()
    assert "exported" in second.stdout
