"""silu_and_mul's Triton path (forward and d gate_up) against the plain-PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from kernels.swiglu import silu_and_mul, silu_and_mul_reference

TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


def check(gate_up, dtype, seed=0):
    gu_t = gate_up.detach().clone().requires_grad_(True)
    gu_r = gate_up.detach().clone().requires_grad_(True)
    out_t, out_r = silu_and_mul(gu_t), silu_and_mul_reference(gu_r)
    assert out_t.shape == out_r.shape and out_t.dtype == out_r.dtype
    torch.testing.assert_close(out_t, out_r, **TOL[dtype])
    dout = torch.randn(out_r.shape, generator=torch.Generator().manual_seed(seed)).to(out_r.device, dtype)
    (g_t,), (g_r,) = torch.autograd.grad(out_t, gu_t, dout), torch.autograd.grad(out_r, gu_r, dout)
    assert g_t.dtype == g_r.dtype
    torch.testing.assert_close(g_t.float(), g_r.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (37, 2 * 48), (2, 5, 2 * 1100)], ids=["one-token", "ragged", "3d-wide"])
def test_matches_reference(triton_kernels, dtype, shape):
    gate_up = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    check(gate_up, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_input(triton_kernels, dtype):
    """A slice of a wider tensor (row stride > 2I) and a transposed one (needs a copy)."""
    g = torch.Generator().manual_seed(2)
    wide = torch.randn(9, 3 * 32, generator=g).to(dtype)
    check(wide[:, 16:16 + 2 * 32], dtype)
    check(torch.randn(64, 9, generator=g).to(dtype).T, dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy's exp(100) in the interpreter
def test_extreme_gates(triton_kernels):
    """Large |gate|: sigmoid saturates without inf/nan in the value or the gradient."""
    gate = torch.tensor([[-100.0, -30.0, -1.0, 0.0, 1.0, 30.0, 100.0, 5.0]])
    check(torch.cat([gate, torch.ones_like(gate)], dim=-1), torch.float32)


def test_inference_and_empty(triton_kernels):
    with torch.no_grad():
        gu = torch.randn(3, 20)
        torch.testing.assert_close(silu_and_mul(gu), silu_and_mul_reference(gu))
    assert silu_and_mul(torch.randn(0, 20)).shape == (0, 10)


@pytest.mark.parametrize("mode", ["triton", "reference"])
def test_bad_input_names_the_argument(monkeypatch, mode):
    pytest.importorskip("triton")
    monkeypatch.setenv("HERD_KERNELS", mode)
    with pytest.raises(ValueError, match="gate_up's last dim 7 is odd"):
        silu_and_mul(torch.randn(3, 7))
    with pytest.raises(ValueError, match="gate_up has dtype"):
        silu_and_mul(torch.ones(3, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="gate_up is a scalar"):
        silu_and_mul(torch.tensor(1.0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_llama4_width(dtype):
    check((torch.randn(1000, 2 * 8192, generator=torch.Generator().manual_seed(3))).to(dtype).cuda(), dtype)
