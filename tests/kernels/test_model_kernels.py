"""The tiny Llama 4 on the Triton kernels equals its reference path, forward and backward, as a
training step sees it: packed documents (DenseAttention -> varlen flash attention), MoE routing and
grouped GEMMs, norms, rotary and the fused linear + cross-entropy."""

from __future__ import annotations

import pytest
import torch

from kernels import fused_linear_cross_entropy
from models.llama4.attention import DenseAttention


def _loss_and_grads(model, ids, positions, seq_lens):
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad():
        hidden = model(ids, positions, DenseAttention(seq_lens, positions))
        head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        loss = fused_linear_cross_entropy(hidden[:-1], head, ids[1:])
        return loss, torch.autograd.grad(loss, params)


def test_training_step_on_triton_kernels_equals_reference(tiny_llama4, monkeypatch):
    pytest.importorskip("triton")
    model = tiny_llama4.model
    for p in model.parameters():
        p.requires_grad_(True)
    seq_lens = [11, 21, 5]  # 21 crosses the chunk boundary (8) of the chunked layers
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (sum(seq_lens),), generator=g)
    positions = torch.cat([torch.arange(n) for n in seq_lens])
    monkeypatch.setenv("HERD_KERNELS", "reference")
    ref_loss, ref_grads = _loss_and_grads(model, ids, positions, seq_lens)
    import kernels.flash_attention_triton as fa_triton

    calls = []
    flash = fa_triton.flash_attention_triton
    monkeypatch.setattr(fa_triton, "flash_attention_triton", lambda *a, **k: calls.append(1) or flash(*a, **k))
    monkeypatch.setenv("HERD_KERNELS", "triton")
    loss, grads = _loss_and_grads(model, ids, positions, seq_lens)
    assert len(calls) == model.config.num_hidden_layers  # one varlen launch per layer for all documents
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, got, want in zip(names, grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
