"""Grouped GEMMs over MoE experts: rows sorted by expert, one launch covers every expert.

Rows of the activation buffers are grouped by expert: expert e owns rows
[offsets[e], offsets[e] + counts[e]). A row-tile program finds its expert from the counts alone
(a cumulative sum of tiles per expert), so the grid is an upper bound known on the host without
a device sync, and experts with no rows own no tiles. The weight-gradient GEMM instead reduces
over each expert's rows: one program per (expert, output tile).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.dispatch import interpreting

# The interpreter stores bfloat16 as raw uint16 and its tl.dot multiplies the bit patterns
# (triton-lang/triton#11584), so interpreted kernels upcast dot operands; bf16 products are exact
# in fp32, so this changes nothing but the speed.
_UPCAST_DOT = interpreting()
_MIN_BLOCK = 16  # tl.dot needs every dimension >= 16


def _configs(gpu: list[triton.Config], interpreted: dict) -> list[triton.Config]:
    # One config while interpreting: the autotuner then runs it without benchmarking.
    return [triton.Config(interpreted)] if interpreting() else gpu


_ROW_TILE_CONFIGS = _configs(
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64}, num_warps=w, num_stages=s)
     for bm, bn, w, s in ((16, 64, 4, 4), (32, 64, 4, 4), (64, 64, 4, 4), (64, 128, 4, 3),
                          (128, 64, 4, 3), (128, 128, 8, 3))],
    {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32})

_WEIGHT_GRAD_CONFIGS = _configs(
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
     for bm, bn, bk, w, s in ((64, 64, 32, 4, 4), (64, 128, 32, 4, 3), (128, 64, 32, 4, 3),
                              (128, 128, 32, 8, 3), (128, 128, 64, 8, 3))],
    {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32})


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _row_tile(counts_ptr, offsets_ptr, E, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's (expert, first row, rows of the expert left from there); expert >= E: no tile."""
    tile = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    counts = tl.load(counts_ptr + experts, mask=experts < E, other=0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(tiles, 0)
    # Experts whose tiles all end at or before this one precede it; empty experts end where
    # their predecessor does, so they are skipped and never own a tile.
    e = tl.sum((ends <= tile).to(tl.int32))
    first_tile = tl.sum(tl.where(experts < e, tiles, 0))
    e_safe = tl.minimum(e, E - 1)
    start = tl.load(offsets_ptr + e_safe)
    count = tl.load(counts_ptr + e_safe)
    local = (tile - first_tile) * BLOCK_M
    return e, start + local, count - local


@triton.autotune(configs=_ROW_TILE_CONFIGS, key=["N", "K", "ROWS_BUCKET"])
@triton.jit
def _gate_up_swiglu_kernel(
    x_ptr, w_ptr, act_ptr, h_ptr, counts_ptr, offsets_ptr,
    E, N, K, ROWS_BUCKET,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_am, stride_an, stride_hm, stride_hn,
    E_PAD: tl.constexpr, STORE_H: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """act[rows] = silu(x W_gate) * (x W_up) with W = w[e] (K, 2N), gate in the first N columns;
    h keeps the pre-activation gate|up for the backward pass."""
    e, row0, rows_left = _row_tile(counts_ptr, offsets_ptr, E, E_PAD, BLOCK_M)
    if e >= E:
        return
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < rows_left
    col_ok = offs_n < N
    rows = (row0 + offs_m).to(tl.int64)
    w_base = w_ptr + e.to(tl.int64) * stride_we
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        w_gate = tl.load(w_base + k[:, None] * stride_wk + offs_n[None, :] * stride_wn, mask=w_mask, other=0.0)
        w_up = tl.load(w_base + k[:, None] * stride_wk + (offs_n + N)[None, :] * stride_wn, mask=w_mask,
                       other=0.0)
        acc_gate = _dot(x, w_gate, acc_gate, UPCAST, PRECISION)
        acc_up = _dot(x, w_up, acc_up, UPCAST, PRECISION)
    out_ty = act_ptr.dtype.element_ty
    # Round to the activation dtype first, as an unfused gate_up matmul would, so the saved h
    # and the activation computed from it agree.
    gate = acc_gate.to(out_ty).to(tl.float32)
    up = acc_up.to(out_ty).to(tl.float32)
    act = gate * tl.sigmoid(gate) * up
    mask = row_ok[:, None] & col_ok[None, :]
    tl.store(act_ptr + rows[:, None] * stride_am + offs_n[None, :] * stride_an, act.to(out_ty), mask=mask)
    if STORE_H:
        h_rows = h_ptr + rows[:, None] * stride_hm
        tl.store(h_rows + offs_n[None, :] * stride_hn, gate.to(out_ty), mask=mask)
        tl.store(h_rows + (offs_n + N)[None, :] * stride_hn, up.to(out_ty), mask=mask)


@triton.autotune(configs=_ROW_TILE_CONFIGS, key=["N", "K", "ROWS_BUCKET", "SWIGLU_BWD"])
@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, h_ptr, counts_ptr, offsets_ptr,
    E, N, K, ROWS_BUCKET,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn, stride_hm, stride_hn,
    E_PAD: tl.constexpr, SWIGLU_BWD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """c[rows] = a[rows] @ b[e] (b[e] is (K, N) through its strides). With SWIGLU_BWD the product is
    d act and the epilogue writes d(gate|up) (rows, 2N) from the saved pre-activation h."""
    e, row0, rows_left = _row_tile(counts_ptr, offsets_ptr, E, E_PAD, BLOCK_M)
    if e >= E:
        return
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < rows_left
    col_ok = offs_n < N
    rows = (row0 + offs_m).to(tl.int64)
    b_base = b_ptr + e.to(tl.int64) * stride_be
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < K
        a = tl.load(a_ptr + rows[:, None] * stride_am + k[None, :] * stride_ak,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_base + k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, UPCAST, PRECISION)
    out_ty = c_ptr.dtype.element_ty
    mask = row_ok[:, None] & col_ok[None, :]
    c_rows = c_ptr + rows[:, None] * stride_cm
    if SWIGLU_BWD:
        h_rows = h_ptr + rows[:, None] * stride_hm
        gate = tl.load(h_rows + offs_n[None, :] * stride_hn, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_rows + (offs_n + N)[None, :] * stride_hn, mask=mask, other=0.0).to(tl.float32)
        d_act = acc.to(out_ty).to(tl.float32)
        sig = tl.sigmoid(gate)
        d_gate = d_act * up * sig * (1.0 + gate * (1.0 - sig))
        d_up = d_act * gate * sig
        tl.store(c_rows + offs_n[None, :] * stride_cn, d_gate.to(out_ty), mask=mask)
        tl.store(c_rows + (offs_n + N)[None, :] * stride_cn, d_up.to(out_ty), mask=mask)
    else:
        tl.store(c_rows + offs_n[None, :] * stride_cn, acc.to(out_ty), mask=mask)


@triton.autotune(configs=_WEIGHT_GRAD_CONFIGS, key=["M", "N", "ROWS_BUCKET"])
@triton.jit
def _weight_grad_kernel(
    a_ptr, b_ptr, c_ptr, counts_ptr, offsets_ptr,
    M, N, ROWS_BUCKET,
    stride_ar, stride_am, stride_br, stride_bn, stride_ce, stride_cm, stride_cn,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """c[e] = a[rows of e].T @ b[rows of e]: (M, N), zero for an expert with no rows."""
    e = tl.program_id(1)
    n_blocks = tl.cdiv(N, BLOCK_N)
    offs_m = (tl.program_id(0) // n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tl.program_id(0) % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    start = tl.load(offsets_ptr + e)
    count = tl.load(counts_ptr + e)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for r0 in range(0, count, BLOCK_K):
        r_ok = r0 + offs_r < count
        rows = (start + r0 + offs_r).to(tl.int64)
        # a is read transposed, (BLOCK_M, BLOCK_K), straight from its row-major rows.
        a_t = tl.load(a_ptr + rows[None, :] * stride_ar + offs_m[:, None] * stride_am,
                      mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        b = tl.load(b_ptr + rows[:, None] * stride_br + offs_n[None, :] * stride_bn,
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(a_t, b, acc, UPCAST, PRECISION)
    c = c_ptr + e.to(tl.int64) * stride_ce + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _precision(dtype: torch.dtype) -> str:
    # fp32 GEMMs follow torch's own switch; other dtypes ignore it.
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _rows_bucket(rows: int, experts: int) -> int:
    # Autotune per rough rows-per-expert (5 buckets), not per batch size, so tuning happens a bounded
    # number of times (a warm-up that runs each bucket leaves none for later steps).
    return min(triton.next_power_of_2(max(1, rows // max(1, experts))), 256)


def _row_tile_grid(rows: int, experts: int, n: int):
    # Each expert with rows adds at most one partial tile, and at most `rows` experts have rows, so
    # this bound needs no device sync; programs past the last tile exit at once.
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) + min(experts, rows), triton.cdiv(n, meta["BLOCK_N"]))


def gate_up_swiglu(x_PD: torch.Tensor, w_EDF: torch.Tensor, counts_E: torch.Tensor, offsets_E: torch.Tensor,
                   store_h: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per expert segment: silu(x w_gate) * (x w_up) -> (P, F/2), and the (P, F) pre-activation if asked."""
    P, D = x_PD.shape
    E, _, F = w_EDF.shape
    I = F // 2
    act_PI = torch.empty(P, I, dtype=x_PD.dtype, device=x_PD.device)
    h_PF = torch.empty(P, F, dtype=x_PD.dtype, device=x_PD.device) if store_h else act_PI
    _gate_up_swiglu_kernel[_row_tile_grid(P, E, I)](
        x_PD, w_EDF, act_PI, h_PF, counts_E, offsets_E,
        E, I, D, _rows_bucket(P, E),
        x_PD.stride(0), x_PD.stride(1), w_EDF.stride(0), w_EDF.stride(1), w_EDF.stride(2),
        act_PI.stride(0), act_PI.stride(1), h_PF.stride(0), h_PF.stride(1),
        E_PAD=max(_MIN_BLOCK, triton.next_power_of_2(E)), STORE_H=store_h, UPCAST=_UPCAST_DOT,
        PRECISION=_precision(x_PD.dtype),
    )
    return act_PI, (h_PF if store_h else None)


def grouped_gemm(a_PK: torch.Tensor, b_EKN: torch.Tensor, counts_E: torch.Tensor, offsets_E: torch.Tensor,
                 swiglu_h_PF: torch.Tensor | None = None) -> torch.Tensor:
    """Per expert segment: a @ b[e] -> (P, N); b may be a transposed view (strides are passed).

    With swiglu_h_PF (the saved gate|up pre-activation, F = 2N) the product is d act and the
    result is d(gate|up), (P, 2N).
    """
    P, K = a_PK.shape
    E, _, N = b_EKN.shape
    bwd = swiglu_h_PF is not None
    c = torch.empty(P, 2 * N if bwd else N, dtype=a_PK.dtype, device=a_PK.device)
    h = swiglu_h_PF if bwd else c
    _grouped_gemm_kernel[_row_tile_grid(P, E, N)](
        a_PK, b_EKN, c, h, counts_E, offsets_E,
        E, N, K, _rows_bucket(P, E),
        a_PK.stride(0), a_PK.stride(1), b_EKN.stride(0), b_EKN.stride(1), b_EKN.stride(2),
        c.stride(0), c.stride(1), h.stride(0), h.stride(1),
        E_PAD=max(_MIN_BLOCK, triton.next_power_of_2(E)), SWIGLU_BWD=bwd, UPCAST=_UPCAST_DOT,
        PRECISION=_precision(a_PK.dtype),
    )
    return c


def weight_grad(a_PM: torch.Tensor, b_PN: torch.Tensor, counts_E: torch.Tensor, offsets_E: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """Per expert segment: a[seg].T @ b[seg] -> (E, M, N) in dtype; zero for an expert with no rows."""
    P, M = a_PM.shape
    N = b_PN.shape[1]
    E = counts_E.shape[0]
    c_EMN = torch.empty(E, M, N, dtype=dtype, device=a_PM.device)

    def grid(meta):
        return triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), E

    _weight_grad_kernel[grid](
        a_PM, b_PN, c_EMN, counts_E, offsets_E,
        M, N, _rows_bucket(P, E),
        a_PM.stride(0), a_PM.stride(1), b_PN.stride(0), b_PN.stride(1),
        c_EMN.stride(0), c_EMN.stride(1), c_EMN.stride(2),
        UPCAST=_UPCAST_DOT, PRECISION=_precision(a_PM.dtype),
    )
    return c_EMN
