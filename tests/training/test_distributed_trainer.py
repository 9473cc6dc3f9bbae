"""`herd train` under torchrun (gloo, CPU processes) trains step for step as one process does:
FSDP2 over 2 data-parallel ranks (stopped half-way and resumed from its sharded checkpoint) and
tensor parallel over 2 ranks, against one process on the same global batches. The numerics of
the parallelisation itself are test_parallel.py's; this is the trainer around it: the data split,
the loss scaling, sharded checkpoints, the gathered export."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml

from tests.training.conftest import run_config
from training.config import TrainConfig
from training.records import read_metrics
from training.trainer import Trainer

STEPS = 4


def torchrun(config, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "herd", "train", str(config), *args],
                         capture_output=True, text=True, check=False, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, byte_tokenizer_dir, small_corpus):
    """The reference: one process, 4 windows per step."""
    out = tmp_path_factory.mktemp("one")
    torch.set_num_threads(1)
    t = Trainer(TrainConfig.from_dict(run_config(
        out, byte_tokenizer_dir, small_corpus, data={"batch_size": 4}, train={"steps": STEPS},
        output={"export": True})))
    losses = t.train().losses
    t.close()
    return losses, out / "export"


def _parallel_run(tmp_path, tok_dir, corpus, dp: int, tp: int):
    out = tmp_path / f"dp{dp}_tp{tp}"
    raw = run_config(out, tok_dir, corpus, data={"batch_size": 4 // dp}, parallel={"dp": dp, "tp": tp},
                     train={"steps": STEPS}, output={"export": True})
    config = tmp_path / f"dp{dp}_tp{tp}.yaml"
    config.write_text(yaml.safe_dump(raw))
    return out, config


def _same_model(a, b, atol):
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=k)


def test_fsdp2_two_ranks_with_resume_equal_one_process(tmp_path, byte_tokenizer_dir, small_corpus, one_process):
    losses, export = one_process
    out, config = _parallel_run(tmp_path, byte_tokenizer_dir, small_corpus, dp=2, tp=1)
    torchrun(config, "--stop-at", str(STEPS // 2))
    assert sorted(p.name for p in (out / "checkpoints" / "step_000002").glob("*.distcp")) == \
        ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote its shards
    torchrun(config)
    assert [r["loss"] for r in read_metrics(out)] == pytest.approx(losses, rel=1e-5)
    # The balance loss is a per-rank mean (not additive over ranks), and AdamW magnifies tiny
    # gradient differences on near-zero gradients: weights agree to a fraction of one step.
    _same_model(out / "export", export, atol=0.02)


def test_tensor_parallel_two_ranks_equals_one_process(tmp_path, byte_tokenizer_dir, small_corpus, one_process):
    losses, export = one_process
    out, config = _parallel_run(tmp_path, byte_tokenizer_dir, small_corpus, dp=1, tp=2)
    torchrun(config)
    assert [r["loss"] for r in read_metrics(out)] == pytest.approx(losses, rel=1e-6)
    _same_model(out / "export", export, atol=1e-4)  # gathered back into the checkpoint's layout
