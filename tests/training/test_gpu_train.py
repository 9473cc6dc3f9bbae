"""On a GPU: the tiny Llama 4 trains through the Triton kernels (flash attention, MoE, fused
cross-entropy, norms) in bf16 autocast, starting where the CPU reference starts."""

from __future__ import annotations

import pytest
import torch

from tests.training.conftest import run_config
from training.config import TrainConfig
from training.trainer import Trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_tiny_llama4_trains_on_cuda_in_bf16(tmp_path, byte_tokenizer_dir, small_corpus):
    def run(name: str, stop: int, **train) -> list[float]:
        t = Trainer(TrainConfig.from_dict(run_config(
            tmp_path / name, byte_tokenizer_dir, small_corpus, data={"seq_len": 256, "batch_size": 8},
            train={"steps": 60, **train}, schedule={"warmup_steps": 5})))
        losses = t.train(stop_at=stop).losses
        t.close()
        return losses

    gpu = run("gpu", 60, device="cuda", dtype="bfloat16", activation_checkpointing=True)
    cpu_first = run("cpu", 1, device="cpu", dtype="float32")
    assert gpu[0] == pytest.approx(cpu_first[0], abs=0.05)
    assert sum(gpu[-5:]) / 5 < 0.7 * gpu[0]
