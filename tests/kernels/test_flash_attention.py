"""flash_attention's Triton path (forward and backward) against the plain-PyTorch reference.

Under the interpreter the kernels run 16 x 16 blocks, so lengths like 21 and 37 leave ragged last
blocks and several blocks per sequence.
"""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch

from kernels.flash_attention import flash_attention, flash_attention_reference

TOL = {torch.float32: {"atol": 2e-5, "rtol": 2e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}
GRAD_TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.bfloat16: {"atol": 5e-2, "rtol": 5e-2}}


def cu(lens):
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)


def make_inputs(lens_q, lens_k, H, K, d, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), H, d, generator=g).to(device, dtype)
    k = torch.randn(sum(lens_k), K, d, generator=g).to(device, dtype)
    v = torch.randn(sum(lens_k), K, d, generator=g).to(device, dtype)
    return q, k, v


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def check(q, k, v, lens_q, lens_k, dtype, scale=None, seed=0, **masks):
    """Output and dq, dk, dv of the wrapper (Triton when forced) against the reference."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cu_q, cu_k = cu(lens_q).to(q.device), cu(lens_k).to(q.device)
    ins_t, ins_r = leaves(q, k, v), leaves(q, k, v)
    o_t = flash_attention(*ins_t, cu_q, cu_k, scale, **masks)
    o_r = flash_attention_reference(*ins_r, cu_q, cu_k, scale, **masks)
    assert o_t.dtype == dtype and o_t.shape == q.shape
    torch.testing.assert_close(o_t, o_r, **TOL[dtype])
    g = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(o_r.shape, generator=g).to(o_r.device, dtype)
    grads_t = torch.autograd.grad(o_t, ins_t, do)
    grads_r = torch.autograd.grad(o_r, ins_r, do)
    for name, gt, gr in zip("qkv", grads_t, grads_r):
        assert gt.dtype == dtype, name
        torch.testing.assert_close(gt.float(), gr.float(), **GRAD_TOL[dtype],
                                   msg=lambda m, n=name: f"d{n}: {m}")
    return o_t


# (lens_q, lens_k, masks): every case runs in fp32, those in BF16_CASES in bf16 too.
CASES = {
    "single-token": ([1], [1], {}),
    "varlen": ([21, 5, 16, 33], [21, 5, 16, 33], {}),
    "chunk-boundary": ([21, 3], [21, 3], {"chunk_size": 8}),
    "continuation": ([5, 21, 1, 0], [30, 21, 17, 4], {}),
    "continuation-chunked": ([10, 2], [37, 9], {"chunk_size": 8}),
    "window": ([37, 9], [37, 9], {"window": 7}),
    "window-continuation": ([6, 20], [40, 20], {"window": 19}),
    "window-in-chunks": ([35], [35], {"chunk_size": 16, "window": 5}),
    "non-causal": ([20, 7], [26, 7], {"causal": False}),
    "non-causal-chunked": ([19], [33], {"causal": False, "chunk_size": 8}),
}
BF16_CASES = ["varlen", "chunk-boundary", "continuation", "window"]


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(triton_kernels, case):
    lens_q, lens_k, masks = CASES[case]
    check(*make_inputs(lens_q, lens_k, 1, 1, 16, torch.float32), lens_q, lens_k, torch.float32, **masks)


@pytest.mark.parametrize("case", BF16_CASES)
def test_matches_reference_bf16(triton_kernels, case):
    lens_q, lens_k, masks = CASES[case]
    check(*make_inputs(lens_q, lens_k, 1, 1, 16, torch.bfloat16), lens_q, lens_k, torch.bfloat16, **masks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G", [1, 4, 8])
def test_gqa(triton_kernels, G, dtype):
    """dk/dv sum the G query heads that share each kv head."""
    K = 2 if G == 1 else 1
    lens_q, lens_k = [19, 4], [19, 11]
    check(*make_inputs(lens_q, lens_k, K * G, K, 16, dtype, seed=G), lens_q, lens_k, dtype, chunk_size=8)


def test_head_dim_not_power_of_two(triton_kernels):
    """d = 24 runs in 32-wide registers: the padding columns must not leak into the dot products."""
    lens = [18, 7]
    check(*make_inputs(lens, lens, 2, 1, 24, torch.float32), lens, lens, torch.float32, scale=0.3)


def test_strided_qkv_and_expanded_grad(triton_kernels):
    """q, k, v as views of one fused projection (row stride (H + 2K) d), and the all-zero-stride
    gradient that o.sum() hands back."""
    T, H, K, d = 23, 2, 1, 16
    qkv = torch.randn(T, H + 2 * K, d, generator=torch.Generator().manual_seed(3))
    grads = []
    for attend in (flash_attention, flash_attention_reference):
        leaf = qkv.clone().requires_grad_(True)
        q, k, v = leaf[:, :H], leaf[:, H:H + K], leaf[:, H + K:]
        assert q.stride(0) == (H + 2 * K) * d
        grads.append(torch.autograd.grad(attend(q, k, v, cu([T]), cu([T]), 0.25).sum(), leaf)[0])
    torch.testing.assert_close(*grads, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("masks", [{"chunk_size": 16}, {"window": 8}], ids=["chunk", "window"])
def test_skips_invisible_key_blocks(triton_kernels, masks):
    """64 cached keys, 16 new queries (positions 48..63): keys 0..31 are invisible to all of them
    under a 16-chunk or an 8-window, so their blocks must never be read (a NaN there would reach the
    output through p @ v even with p == 0) and their gradients are exactly zero."""
    lens_q, lens_k = [16], [64]
    q, k, v = leaves(*make_inputs(lens_q, lens_k, 2, 1, 16, torch.float32, seed=4))
    with torch.no_grad():
        k[:32] = float("nan")
        v[:32] = float("nan")
    o = flash_attention(q, k, v, cu(lens_q), cu(lens_k), 0.25, **masks)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
    assert torch.isfinite(o).all() and torch.isfinite(dq).all()
    assert (dk[:32] == 0).all() and (dv[:32] == 0).all()
    assert torch.isfinite(dk[32:]).all() and torch.isfinite(dv[32:]).all()


@pytest.mark.parametrize("chunk_size", [None, 8], ids=["global", "chunked"])
def test_equals_dense_attention(monkeypatch, chunk_size):
    """The packed layout the model and training use: DenseAttention (on its SDPA path) over documents
    laid end to end, and a second step continuing each document from a KV cache (Lq < Lk)."""
    pytest.importorskip("triton")
    from models.llama4.attention import DenseAttention, KVCache

    H, K, d, scale = 4, 1, 16, 0.25
    lens, new = [13, 21, 1], [6, 2, 9]
    totals = [n + m for n, m in zip(lens, new)]
    q, k, v = make_inputs(lens, lens, H, K, d, torch.float32, seed=5)
    q2, k2, v2 = make_inputs(new, new, H, K, d, torch.float32, seed=6)
    positions = torch.cat([torch.arange(n) for n in lens])
    positions2 = torch.cat([torch.arange(n, t) for n, t in zip(lens, totals)])

    # DenseAttention itself calls flash_attention where the Triton kernels run: keep it on SDPA here.
    monkeypatch.setenv("HERD_KERNELS", "reference")
    dense = DenseAttention(lens, positions).attend(0, q, k, v, chunk_size, scale)
    caches = [KVCache(1, 40, K, d, torch.float32) for _ in lens]
    DenseAttention(lens, positions, caches).attend(0, q, k, v, chunk_size, scale)
    dense2 = DenseAttention(new, positions2, caches).attend(0, q2, k2, v2, chunk_size, scale)
    k_all = torch.cat([c.k[0, :t] for c, t in zip(caches, totals)])
    v_all = torch.cat([c.v[0, :t] for c, t in zip(caches, totals)])

    monkeypatch.setenv("HERD_KERNELS", "triton")
    out = flash_attention(q, k, v, cu(lens), cu(lens), scale, chunk_size=chunk_size)
    torch.testing.assert_close(out, dense, **TOL[torch.float32])
    out2 = flash_attention(q2, k_all, v_all, cu(new), cu(totals), scale, chunk_size=chunk_size)
    torch.testing.assert_close(out2, dense2, **TOL[torch.float32])


def test_reference_path_needs_no_triton():
    """Importing the wrapper and running it on CPU must not import triton."""
    code = ("import sys, torch; from kernels.flash_attention import flash_attention; "
            "c = torch.tensor([0, 3], dtype=torch.int32); x = torch.randn(3, 2, 8); "
            "flash_attention(x, x, x, c, c, 0.5); assert 'triton' not in sys.modules, 'triton imported'")
    env = {"HERD_KERNELS": "auto", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def _bad_inputs():
    q, k, v = make_inputs([4, 3], [4, 5], 4, 2, 8, torch.float32)
    cq, ck = cu([4, 3]), cu([4, 5])
    good = {"q_THd": q, "k_SKd": k, "v_SKd": v, "cu_seqlens_q": cq, "cu_seqlens_k": ck, "scale": 0.5}
    yield "q_THd", {**good, "q_THd": q[:, 0]}
    yield "q_THd", {**good, "q_THd": q.to(torch.int32)}
    yield "k_SKd", {**good, "k_SKd": k.double()}
    yield "v_SKd", {**good, "v_SKd": v[:, :1]}
    yield "k_SKd", {**good, "k_SKd": k[..., :4], "v_SKd": v[..., :4]}
    yield "q_THd", {**good, "q_THd": q[:, :3]}  # 3 heads over 2 kv heads
    # head dim not unit-stride
    yield "q_THd", {**good, "q_THd": q.transpose(1, 2).contiguous().transpose(1, 2)}
    yield "cu_seqlens_q", {**good, "cu_seqlens_q": cq.long()}
    yield "cu_seqlens_q", {**good, "cu_seqlens_q": cu([4, 2])}  # ends before T
    yield "cu_seqlens_k", {**good, "cu_seqlens_k": ck + 1}  # does not start at 0
    yield "cu_seqlens_k", {**good, "cu_seqlens_k": cu([9])}  # B differs from cu_seqlens_q
    yield "cu_seqlens_k", {**good, "cu_seqlens_k": cu([3, 6])}  # fewer keys than queries
    yield "scale", {**good, "scale": float("nan")}
    yield "chunk_size", {**good, "chunk_size": 0}
    yield "window", {**good, "window": 2.5}


@pytest.mark.parametrize(("name", "kwargs"), list(_bad_inputs()))
def test_bad_input_names_the_argument(triton_kernels, name, kwargs):
    with pytest.raises(ValueError, match=name):
        flash_attention(**kwargs)


def attention_bf16(q, k, v, cu_q, cu_k, scale, causal=True, chunk_size=None, window=None):
    """Plain attention computed in bf16 (products rounded to bf16, softmax in fp32): the error a bf16
    kernel is allowed, measured against the fp32 reference."""
    from kernels.flash_attention import attention_mask

    G = q.shape[1] // k.shape[1]
    outs = []
    for i in range(cu_q.numel() - 1):
        qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        q_HQd = q[qs].transpose(0, 1)
        k_HLd, v_HLd = (t[ks].repeat_interleave(G, dim=1).transpose(0, 1) for t in (k, v))
        Q, L = q_HQd.shape[1], k_HLd.shape[1]
        pos = torch.arange(L, device=q.device)
        s_HQL = (q_HQd @ k_HLd.transpose(1, 2)) * scale
        hidden_QL = ~attention_mask(pos[L - Q:], pos, causal, chunk_size, window)
        s_HQL = s_HQL.masked_fill(hidden_QL, float("-inf"))
        outs.append((s_HQL.softmax(-1, dtype=torch.float32).to(q.dtype) @ v_HLd).transpose(0, 1))
    return torch.cat(outs)


def check_bf16_error(lens_q, lens_k, H, K, d, device, seed=8, **masks):
    """bf16 output and gradients within three times the error of plain bf16 attention, both measured
    against the fp32 reference on the same bf16 inputs (a fixed tolerance does not scale with the shape).
    The kernel's gradients sit near twice plain attention's: delta = rowsum(o * do) reads o rounded to
    bf16, as in FlashAttention."""
    q, k, v = make_inputs(lens_q, lens_k, H, K, d, torch.bfloat16, seed=seed, device=device)
    cu_q, cu_k = cu(lens_q).to(device), cu(lens_k).to(device)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    results = []
    for attend, ins, d_o in ((flash_attention, leaves(q, k, v), do.bfloat16()),
                             (flash_attention_reference, leaves(q.float(), k.float(), v.float()), do),
                             (attention_bf16, leaves(q, k, v), do.bfloat16())):
        o = attend(*ins, cu_q, cu_k, d ** -0.5, **masks)
        results.append([o, *torch.autograd.grad(o, ins, d_o)])
    for name, got, exact, plain in zip(["o", "dq", "dk", "dv"], *results):
        err, allowed = (got.float() - exact).abs().max(), (plain.float() - exact).abs().max()
        assert err <= 3 * allowed + 1e-4, f"{name}: error {err:.3g}, plain bf16 attention's {allowed:.3g}"


def test_bf16_error_within_plain_bf16(triton_kernels):
    check_bf16_error([37, 9], [37, 20], 2, 1, 32, "cpu", chunk_size=16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("masks", [{}, {"chunk_size": 512}, {"window": 300}],
                         ids=["global", "chunked", "window"])
def test_gpu_llama4_shapes(masks):
    """Llama 4 Scout's attention (40 heads over 8 kv heads, d 128) on prompts, a continued prompt and a
    one-token sequence: fp32 against the reference, bf16 against plain bf16 attention's error."""
    lens_q, lens_k = [1500, 700, 1, 333], [1500, 1900, 1, 333]
    check(*make_inputs(lens_q, lens_k, 40, 8, 128, torch.float32, seed=7, device="cuda"), lens_q, lens_k,
          torch.float32, **masks)
    check_bf16_error(lens_q, lens_k, 40, 8, 128, "cuda", **masks)
