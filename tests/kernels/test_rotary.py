"""apply_rotary's Triton path (in place, and with autograd) against the plain-PyTorch reference."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kernels.rotary import apply_rotary, apply_rotary_reference, rope_inv_freq

TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}
# Llama 4 Scout's rope_scaling (llama3 rule) and theta.
LLAMA3 = SimpleNamespace(factor=16.0, low_freq_factor=1.0, high_freq_factor=4.0,
                         original_max_position_embeddings=8192)
THETA = 500000.0


def inv_freq_for(d: int, scaled: bool = True) -> torch.Tensor:
    return rope_inv_freq(d, THETA, LLAMA3 if scaled else None)


def qk(T, H, K, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, H, d, generator=g).to(dtype), torch.randn(T, K, d, generator=g).to(dtype)


def check_grads(q, k, positions, inv_freq, interleaved, dtype, seed=0):
    """Every differentiable input's gradient (q and k) through the autograd path vs the reference."""
    qt, kt = q.detach().clone().requires_grad_(True), k.detach().clone().requires_grad_(True)
    qr, kr = q.detach().clone().requires_grad_(True), k.detach().clone().requires_grad_(True)
    out_t = apply_rotary(qt, kt, positions, inv_freq, interleaved)
    out_r = apply_rotary_reference(qr, kr, positions, inv_freq, interleaved)
    assert out_t[0] is not qt and out_t[1] is not kt  # autograd path: new tensors, inputs untouched
    torch.testing.assert_close(qt, q)
    g = torch.Generator().manual_seed(seed + 1)
    grads_out = tuple(torch.randn(o.shape, generator=g).to(o.device, dtype) for o in out_r)
    for a, b in zip(out_t, out_r):
        torch.testing.assert_close(a, b, **TOL[dtype])
    for a, b in zip(torch.autograd.grad(out_t, (qt, kt), grads_out),
                    torch.autograd.grad(out_r, (qr, kr), grads_out)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [True, False], ids=["pairs", "halves"])
@pytest.mark.parametrize("T,H,K,d", [(1, 4, 2, 16), (37, 3, 1, 32), (6, 5, 5, 24)],
                         ids=["one-token", "ragged", "d-not-pow2"])
def test_matches_reference(triton_kernels, dtype, interleaved, T, H, K, d):
    q, k = qk(T, H, K, d, dtype)
    positions = torch.randperm(4 * T, generator=torch.Generator().manual_seed(1))[:T]  # unsorted
    inv_freq = inv_freq_for(d)
    ref = apply_rotary_reference(q, k, positions, inv_freq, interleaved)
    q_in, k_in = q.clone(), k.clone()
    out = apply_rotary(q_in, k_in, positions, inv_freq, interleaved)
    assert out[0] is q_in and out[1] is k_in  # no autograd: rotated in place
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, **TOL[dtype])
    check_grads(q, k, positions, inv_freq, interleaved, dtype)


def test_llama3_scaling_changes_frequencies():
    """The scaled frequencies differ from theta's alone, so the tests above exercise them."""
    d = 128
    scaled, plain = inv_freq_for(d), inv_freq_for(d, scaled=False)
    assert torch.equal(scaled[:8], plain[:8])  # high frequencies kept
    assert torch.allclose(scaled[-4:], plain[-4:] / LLAMA3.factor)  # low frequencies divided
    assert not torch.equal(scaled, plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [True, False], ids=["pairs", "halves"])
def test_fused_qkv_views_in_place(triton_kernels, dtype, interleaved):
    """q and k sliced out of a fused qkv projection: rotated where they lie, v untouched."""
    T, H, K, d = 5, 4, 2, 16
    qkv = torch.randn(T, (H + 2 * K) * d, generator=torch.Generator().manual_seed(2)).to(dtype)
    before = qkv.clone()
    q, k, v = qkv.split((H * d, K * d, K * d), dim=-1)
    q_THd, k_TKd = q.view(T, H, d), k.view(T, K, d)
    assert not q_THd.is_contiguous()
    positions = torch.tensor([5, 0, 17, 3, 9])
    inv_freq = inv_freq_for(d)
    ref = apply_rotary_reference(q_THd.clone(), k_TKd.clone(), positions, inv_freq, interleaved)
    with torch.no_grad():
        out = apply_rotary(q_THd, k_TKd, positions, inv_freq, interleaved)
    assert out[0] is q_THd and out[1] is k_TKd
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, **TOL[dtype])
    torch.testing.assert_close(qkv[:, :H * d].view(T, H, d), ref[0], **TOL[dtype])
    assert torch.equal(v, before[:, (H + K) * d:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_qkv_views_with_autograd(triton_kernels, dtype):
    """Training: split views autograd forbids writing, so the rotation goes to new tensors."""
    T, H, K, d, D = 7, 4, 2, 16, 24
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, D, generator=g).to(dtype)
    w = (torch.randn((H + 2 * K) * d, D, generator=g) / D ** 0.5).to(dtype)
    positions = torch.tensor([5, 0, 17, 3, 30, 2, 11])
    inv_freq = inv_freq_for(d)

    def run(fn):
        wl = w.clone().requires_grad_(True)
        q, k, v = (x @ wl.T).split((H * d, K * d, K * d), dim=-1)
        q, k = fn(q.view(T, H, d), k.view(T, K, d), positions, inv_freq, False)
        loss = (q.float().square().sum() + (k.float() * v.float().view(T, K, d)).sum())
        return loss, torch.autograd.grad(loss, wl)[0]

    loss_t, grad_t = run(apply_rotary)
    loss_r, grad_r = run(apply_rotary_reference)
    torch.testing.assert_close(loss_t, loss_r, **TOL[dtype])
    torch.testing.assert_close(grad_t.float(), grad_r.float(), **{k: 4 * v for k, v in TOL[dtype].items()})


def test_positions_dtypes_and_strides(triton_kernels):
    q, k = qk(4, 2, 1, 16, torch.float32)
    inv_freq = inv_freq_for(16)
    positions = torch.tensor([5, 99, 0, 17, 3, 8, 1000, 0])[::2]  # strided view: 5, 0, 3, 1000
    ref = apply_rotary_reference(q, k, positions, inv_freq, True)
    for pos in (positions, positions.to(torch.int32)):
        out = apply_rotary(q.clone(), k.clone(), pos, inv_freq, True)
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_long_context_angles(triton_kernels):
    """Positions far past the original context: precise cos/sin of angles of ~1e6 radians."""
    q, k = qk(8, 2, 1, 32, torch.float32)
    positions = torch.tensor([1_000_000, 0, 262_143, 7, 999_983, 65_536, 3, 500_001])
    inv_freq = inv_freq_for(32)
    out = apply_rotary(q.clone(), k.clone(), positions, inv_freq, False)
    for a, b in zip(out, apply_rotary_reference(q, k, positions, inv_freq, False)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_only_q_requires_grad(triton_kernels):
    q, k = qk(3, 2, 1, 16, torch.float32)
    q.requires_grad_(True)
    positions, inv_freq = torch.tensor([2, 0, 1]), inv_freq_for(16)
    qo, ko = apply_rotary(q, k, positions, inv_freq, True)
    (g,) = torch.autograd.grad(qo.sum(), q)
    qr = q.detach().clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(apply_rotary_reference(qr, k, positions, inv_freq, True)[0].sum(), qr)
    torch.testing.assert_close(g, gr)
    torch.testing.assert_close(ko, apply_rotary_reference(q.detach(), k, positions, inv_freq, True)[1])


@pytest.mark.parametrize("mode", ["triton", "reference"])
def test_bad_input_names_the_argument(monkeypatch, mode):
    pytest.importorskip("triton")
    monkeypatch.setenv("HERD_KERNELS", mode)
    q, k = qk(3, 2, 1, 16, torch.float32)
    pos, inv = torch.arange(3), inv_freq_for(16)
    cases = [
        ((q[0], k, pos, inv), "q_THd has shape"),
        ((q, k[0], pos, inv), "k_TKd has shape"),
        ((q, k.double(), pos, inv), "k_TKd has dtype"),
        ((q, k[..., :8], pos, inv), "k_TKd head_dim"),
        ((q.transpose(1, 2), k, pos, inv), "q_THd has strides"),
        ((q, k, pos.float(), inv), "positions_T must be"),
        ((q, k, torch.arange(4), inv), "4 positions_T"),
        ((q, k, pos, inv.double()), "inv_freq must be"),
        ((q, k, pos, inv[:4]), "inv_freq 4 for head_dim 16"),
        ((q[..., :15], k[..., :15], pos, inv), "q_THd head_dim 15 is odd"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            apply_rotary(*args, True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [True, False], ids=["pairs", "halves"])
def test_gpu_scout_shapes(dtype, interleaved):
    T, H, K, d = 1000, 40, 8, 128
    qkv = torch.randn(T, (H + 2 * K) * d, generator=torch.Generator().manual_seed(4)).to(dtype).cuda()
    q, k = qkv[:, :H * d].view(T, H, d), qkv[:, H * d:(H + K) * d].view(T, K, d)
    positions = torch.randint(0, 1_000_000, (T,), generator=torch.Generator().manual_seed(5)).cuda()
    inv_freq = inv_freq_for(d).cuda()
    ref = apply_rotary_reference(q.clone(), k.clone(), positions, inv_freq, interleaved)
    out = apply_rotary(q, k, positions, inv_freq, interleaved)
    tol = TOL[dtype] if dtype == torch.bfloat16 else {"atol": 1e-4, "rtol": 1e-4}
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, **tol)
    check_grads(q.clone(), k.clone(), positions, inv_freq, interleaved, dtype)
