"""rms_norm's Triton path (forward and backward) against the plain-PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from kernels.rms_norm import rms_norm, rms_norm_reference

EPS = 1e-5
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2}}
GRAD_TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.bfloat16: {"atol": 6e-2, "rtol": 6e-2}}


def reference(x, weight, residual):
    s = x if residual is None else x + residual
    return rms_norm_reference(s, weight, EPS), s


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def check(x, weight, residual, dtype, seed=0):
    """Forward and every input's gradient, Triton path vs reference, through both outputs."""
    g = torch.Generator().manual_seed(seed)
    out_t = leaves(x, weight, residual)
    out_r = leaves(x, weight, residual)
    y_t, s_t = rms_norm(out_t[0], out_t[1], EPS, out_t[2])
    y_r, s_r = reference(*out_r)
    torch.testing.assert_close(y_t, y_r, **TOL[dtype])
    torch.testing.assert_close(s_t, s_r, **TOL[dtype])
    dy = torch.randn(y_r.shape, generator=g).to(y_r.device, y_r.dtype)
    ds = torch.randn(s_r.shape, generator=g).to(s_r.device, s_r.dtype)
    wrt_t = [t for t in out_t if t is not None]
    wrt_r = [t for t in out_r if t is not None]
    # Both outputs carry a gradient when the sum is a separate tensor; with no residual it is x itself.
    grads_t = torch.autograd.grad((y_t, s_t), wrt_t, (dy, ds))
    grads_r = torch.autograd.grad((y_r, s_r), wrt_r, (dy, ds))
    for gt, gr in zip(grads_t, grads_r):
        assert gt.dtype == gr.dtype
        torch.testing.assert_close(gt.float(), gr.float(), **GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 32), (37, 48), (3, 5, 16)], ids=["one-token", "ragged", "3d"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["no-res", "res"])
@pytest.mark.parametrize("with_weight", [False, True], ids=["no-w", "w"])
def test_matches_reference(triton_kernels, dtype, shape, with_residual, with_weight):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(dtype) if with_weight else None
    r = torch.randn(shape, generator=g).to(dtype) if with_residual else None
    check(x, w, r, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_only_through_norm(triton_kernels, dtype):
    """The sum output unused: its gradient is None in backward, not zeros."""
    g = torch.Generator().manual_seed(2)
    x, w, r = leaves(torch.randn(9, 24, generator=g).to(dtype), torch.randn(24, generator=g).to(dtype),
                     torch.randn(9, 24, generator=g).to(dtype))
    xr, wr, rr = leaves(x, w, r)
    gt = torch.autograd.grad(rms_norm(x, w, EPS, r)[0].float().square().sum(), (x, w, r))
    gr = torch.autograd.grad(reference(xr, wr, rr)[0].float().square().sum(), (xr, wr, rr))
    for a, b in zip(gt, gr):
        torch.testing.assert_close(a.float(), b.float(), **GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_norm_on_strided_heads(triton_kernels, dtype):
    """Weightless norm of q/k heads viewed out of a fused qkv tensor: token and head strides."""
    T, H, K, d = 7, 4, 2, 16
    qkv = torch.randn(T, (H + 2 * K) * d, generator=torch.Generator().manual_seed(3)).to(dtype)
    q, k = qkv[:, :H * d].view(T, H, d), qkv[:, H * d:(H + K) * d].view(T, K, d)
    assert not q.is_contiguous() and not k.is_contiguous()
    for t in (q, k):
        check(t, None, None, dtype)
    # Transposed heads (last dim still unit-stride) and a fully strided view that needs a copy.
    check(q.transpose(0, 1), None, None, dtype)
    check(qkv.view(T, -1, d).transpose(1, 2), None, None, dtype)
    # Three leading dims that do not merge into two strided ones: the wrapper copies.
    check(torch.randn(2, 3, 4, 16).to(dtype)[:, :2, :3], None, None, dtype)


def test_inference_returns_x_and_dense_sum(triton_kernels):
    x, r, w = torch.randn(5, 32), torch.randn(5, 32), torch.randn(32)
    with torch.no_grad():
        y, s = rms_norm(x, w, EPS, None)
        assert s is x
        y, s = rms_norm(x, w, EPS, r)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, rms_norm_reference(x + r, w, EPS))


def test_fp32_weight_on_bf16_input(triton_kernels):
    """The product promotes as in torch: bf16 norm times an fp32 weight is fp32."""
    g = torch.Generator().manual_seed(4)
    check(torch.randn(6, 40, generator=g).to(torch.bfloat16), torch.randn(40, generator=g), None,
          torch.bfloat16)
    y, _ = rms_norm(torch.randn(6, 40).to(torch.bfloat16), torch.randn(40), EPS)
    assert y.dtype == torch.float32


def test_many_rows_reduce_weight_grad(triton_kernels):
    """Enough rows that the backward splits them over several programs, each with a partial d weight."""
    g = torch.Generator().manual_seed(5)
    check(torch.randn(2000, 8, generator=g), torch.randn(8, generator=g), torch.randn(2000, 8, generator=g),
          torch.float32)


@pytest.mark.parametrize("mode", ["triton", "reference"])
def test_bad_input_names_the_argument(monkeypatch, mode):
    pytest.importorskip("triton")
    monkeypatch.setenv("HERD_KERNELS", mode)
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(7), EPS)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(8, dtype=torch.int32), EPS)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, None, EPS, torch.randn(4, 9))
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, None, EPS, torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="x has dtype"):
        rms_norm(torch.ones(4, 8, dtype=torch.int64), None, EPS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_llama4_width(dtype):
    g = torch.Generator().manual_seed(6)
    T, D = 1000, 5120
    x, w, r = (torch.randn(T, D, generator=g).to(dtype).cuda(), torch.randn(D, generator=g).to(dtype).cuda(),
               torch.randn(T, D, generator=g).to(dtype).cuda())
    check(x, w, r, dtype)
    qkv = torch.randn(T, 48 * 128, generator=g).to(dtype).cuda()
    check(qkv[:, :40 * 128].view(T, 40, 128), None, None, dtype)
