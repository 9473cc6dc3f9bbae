"""Session-wide fixtures: each model is loaded once per test session."""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels run on CPU only in Triton's interpreter, which must be chosen before triton is
# imported; kernel tests then force the Triton path with HERD_KERNELS=triton (see `triton_kernels`).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.parity import tiny_checkpoints as tiny


@pytest.fixture(scope="session")
def default_fp32():
    from models.default import default_model_path
    from models.llama4 import load_model

    return load_model(default_model_path(), dtype="float32")


@pytest.fixture(scope="session")
def tiny_llama4_dir(tmp_path_factory):
    """MoE on every other layer, top-2, a NoPE layer, chunks of 8, temperature tuning on."""
    return tiny.save_llama4(tmp_path_factory.mktemp("tiny_llama4"), seed=7, interleave_moe_layer_step=2,
                            num_experts_per_tok=2)


@pytest.fixture(scope="session")
def tiny_llama4(tiny_llama4_dir):
    from models.llama4 import load_model

    return load_model(tiny_llama4_dir, dtype="float32")


@pytest.fixture
def triton_kernels(monkeypatch):
    """Kernel wrappers run their Triton implementation (interpreted on CPU) for this test."""
    pytest.importorskip("triton")
    monkeypatch.setenv("HERD_KERNELS", "triton")


@pytest.fixture
def reference_kernels(monkeypatch):
    monkeypatch.setenv("HERD_KERNELS", "reference")
