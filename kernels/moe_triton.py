"""Triton MoE experts: sort (token, slot) pairs by expert, gather, grouped GEMMs, combine; fwd + bwd.

The T*K (token, slot) pairs are numbered p = t * K + k. Sorting them by expert gives a row
order for the expert-sorted buffers (`sorted_pair_P[r]` = the pair in row r, `pos_P[p]` = the
row of pair p) plus per-expert counts and offsets, which the grouped GEMMs map tiles from; a
pair whose id is outside [0, E) gets no row and adds nothing. The combine step gathers each
token's K rows (no atomics, so it is deterministic) and adds the shared expert's output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.grouped_gemm_triton import gate_up_swiglu, grouped_gemm, weight_grad

_BLOCK_PAIRS = 256


@triton.jit
def _sort_pairs_kernel(ids_ptr, counts_ptr, offsets_ptr, sorted_pair_ptr, pos_ptr, P, BLOCK: tl.constexpr):
    """One program per expert e: its segment starts after every pair routed to a lower expert,
    and its pairs keep their (token, slot) order inside it, as a stable sort would."""
    e = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    before = 0
    mine = 0
    for p0 in range(0, P, BLOCK):
        ids = tl.load(ids_ptr + p0 + offs, mask=p0 + offs < P, other=-1)
        before += tl.sum(((ids >= 0) & (ids < e)).to(tl.int32))
        mine += tl.sum((ids == e).to(tl.int32))
    tl.store(counts_ptr + e, mine)
    tl.store(offsets_ptr + e, before)
    row = before
    for p0 in range(0, P, BLOCK):
        p = p0 + offs
        is_mine = tl.load(ids_ptr + p, mask=p < P, other=-1) == e
        rank = tl.cumsum(is_mine.to(tl.int32), 0) - 1
        tl.store(sorted_pair_ptr + row + rank, p, mask=is_mine)
        tl.store(pos_ptr + p, row + rank, mask=is_mine)
        row += tl.sum(is_mine.to(tl.int32))


@triton.jit
def _gather_rows_kernel(src_ptr, dst_ptr, sorted_pair_ptr, scale_ptr, R, D, TOP_K,
                        stride_st, stride_sd, stride_dr, stride_dd,
                        HAS_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """dst[r] = src[token of pair r] (* the pair's score); rows no pair landed in get zeros."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    r_ok = r < R
    d_ok = d < D
    pair = tl.load(sorted_pair_ptr + r, mask=r_ok, other=-1)
    has_pair = pair >= 0
    token = (pair // TOP_K).to(tl.int64)
    vals = tl.load(src_ptr + token[:, None] * stride_st + d[None, :] * stride_sd,
                   mask=has_pair[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    out_ty = dst_ptr.dtype.element_ty
    if HAS_SCALE:
        # The score is cast to the activation dtype first, as the reference's x * score.to(x.dtype).
        score = tl.load(scale_ptr + pair, mask=has_pair, other=0.0).to(out_ty).to(tl.float32)
        vals = vals * score[:, None]
    tl.store(dst_ptr + r.to(tl.int64)[:, None] * stride_dr + d[None, :] * stride_dd, vals.to(out_ty),
             mask=r_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_rows_kernel(src_ptr, dst_ptr, pos_ptr, scale_ptr, add_ptr, T, D,
                         stride_sr, stride_sd, stride_dt, stride_dd, stride_at, stride_ad,
                         TOP_K: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_ADD: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """dst[t] = sum_k (score[t, k] *) src[row of pair (t, k)] (+ add[t]), summed in fp32."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = t < T
    d_ok = d < D
    acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    for k in tl.static_range(TOP_K):
        pair = t * TOP_K + k
        row = tl.load(pos_ptr + pair, mask=t_ok, other=-1)
        has_row = row >= 0
        vals = tl.load(src_ptr + row.to(tl.int64)[:, None] * stride_sr + d[None, :] * stride_sd,
                       mask=has_row[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        if HAS_SCALE:
            vals = vals * tl.load(scale_ptr + pair, mask=has_row, other=0.0).to(tl.float32)[:, None]
        acc += vals
    mask = t_ok[:, None] & d_ok[None, :]
    t64 = t.to(tl.int64)
    if HAS_ADD:
        acc += tl.load(add_ptr + t64[:, None] * stride_at + d[None, :] * stride_ad, mask=mask,
                       other=0.0).to(tl.float32)
    tl.store(dst_ptr + t64[:, None] * stride_dt + d[None, :] * stride_dd, acc.to(dst_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _score_grad_kernel(d_in_ptr, x_ptr, pos_ptr, out_ptr, P, D, TOP_K,
                       stride_ir, stride_id, stride_xt, stride_xd,
                       BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """d score of pair p = <d expert input of p, x[token of p]>."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    row = tl.load(pos_ptr + p, mask=p < P, other=-1)
    has_row = row >= 0
    row = row.to(tl.int64)
    token = (p // TOP_K).to(tl.int64)
    acc = tl.zeros((BLOCK_P,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = has_row[:, None] & (d < D)[None, :]
        g = tl.load(d_in_ptr + row[:, None] * stride_ir + d[None, :] * stride_id, mask=mask, other=0.0)
        x = tl.load(x_ptr + token[:, None] * stride_xt + d[None, :] * stride_xd, mask=mask, other=0.0)
        acc += tl.sum(g.to(tl.float32) * x.to(tl.float32), axis=1)
    tl.store(out_ptr + p, acc.to(out_ptr.dtype.element_ty), mask=p < P)


def _block_d(D: int) -> int:
    return min(128, triton.next_power_of_2(D))


def _sort_pairs(ids_P: torch.Tensor, E: int):
    """-> counts_E, offsets_E, sorted_pair_P, pos_P (int32; -1 where an id is outside [0, E))."""
    P = ids_P.shape[0]
    dev = ids_P.device
    counts_E = torch.empty(E, dtype=torch.int32, device=dev)
    offsets_E = torch.empty(E, dtype=torch.int32, device=dev)
    sorted_pair_P = torch.full((P,), -1, dtype=torch.int32, device=dev)
    pos_P = torch.full((P,), -1, dtype=torch.int32, device=dev)
    _sort_pairs_kernel[(E,)](ids_P, counts_E, offsets_E, sorted_pair_P, pos_P, P, BLOCK=_BLOCK_PAIRS)
    return counts_E, offsets_E, sorted_pair_P, pos_P


def _gather_rows(src_TD: torch.Tensor, sorted_pair_P: torch.Tensor, scale_P: torch.Tensor | None,
                 top_k: int, dtype: torch.dtype) -> torch.Tensor:
    P = sorted_pair_P.shape[0]
    D = src_TD.shape[1]
    dst_PD = torch.empty(P, D, dtype=dtype, device=src_TD.device)
    block_r, block_d = 16, _block_d(D)
    _gather_rows_kernel[(triton.cdiv(P, block_r), triton.cdiv(D, block_d))](
        src_TD, dst_PD, sorted_pair_P, scale_P if scale_P is not None else sorted_pair_P, P, D, top_k,
        src_TD.stride(0), src_TD.stride(1), dst_PD.stride(0), dst_PD.stride(1),
        HAS_SCALE=scale_P is not None, BLOCK_R=block_r, BLOCK_D=block_d)
    return dst_PD


def _combine_rows(src_PD: torch.Tensor, pos_P: torch.Tensor, scale_P: torch.Tensor | None,
                  add_TD: torch.Tensor | None, T: int, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    D = src_PD.shape[1]
    dst_TD = torch.empty(T, D, dtype=dtype, device=src_PD.device)
    add = add_TD if add_TD is not None else dst_TD
    block_t, block_d = 16, _block_d(D)
    _combine_rows_kernel[(triton.cdiv(T, block_t), triton.cdiv(D, block_d))](
        src_PD, dst_TD, pos_P, scale_P if scale_P is not None else pos_P, add, T, D,
        src_PD.stride(0), src_PD.stride(1), dst_TD.stride(0), dst_TD.stride(1), add.stride(0), add.stride(1),
        TOP_K=top_k, HAS_SCALE=scale_P is not None, HAS_ADD=add_TD is not None,
        BLOCK_T=block_t, BLOCK_D=block_d)
    return dst_TD


def _score_grad(d_in_PD: torch.Tensor, x_TD: torch.Tensor, pos_P: torch.Tensor, top_k: int,
                dtype: torch.dtype) -> torch.Tensor:
    P = pos_P.shape[0]
    D = x_TD.shape[1]
    out_P = torch.empty(P, dtype=dtype, device=x_TD.device)
    block_p = 16
    _score_grad_kernel[(triton.cdiv(P, block_p),)](
        d_in_PD, x_TD, pos_P, out_P, P, D, top_k,
        d_in_PD.stride(0), d_in_PD.stride(1), x_TD.stride(0), x_TD.stride(1),
        BLOCK_P=block_p, BLOCK_D=_block_d(D))
    return out_P


def _forward(x_TD, topk_ids_TK, topk_weights_TK, w_gate_up_EDF, w_down_EID, shared_TD, keep: bool):
    T, K = topk_ids_TK.shape
    E = w_gate_up_EDF.shape[0]
    ids_P = topk_ids_TK.reshape(-1)
    weights_P = topk_weights_TK.reshape(-1)
    counts_E, offsets_E, sorted_pair_P, pos_P = _sort_pairs(ids_P, E)
    # Llama 4 scales the expert's INPUT by the router score (no renormalisation).
    x_in_PD = _gather_rows(x_TD, sorted_pair_P, weights_P, K, x_TD.dtype)
    act_PI, h_PF = gate_up_swiglu(x_in_PD, w_gate_up_EDF, counts_E, offsets_E, store_h=keep)
    y_PD = grouped_gemm(act_PI, w_down_EID, counts_E, offsets_E)
    out_TD = _combine_rows(y_PD, pos_P, None, shared_TD, T, K, x_TD.dtype)
    saved = (counts_E, offsets_E, sorted_pair_P, pos_P, x_in_PD, h_PF, act_PI) if keep else None
    return out_TD, saved


def _backward(d_out_TD, x_TD, topk_weights_TK, w_gate_up_EDF, w_down_EID, K, saved, needs):
    """-> d x, d topk_weights, d w_gate_up, d w_down (None where needs says no)."""
    counts_E, offsets_E, sorted_pair_P, pos_P, x_in_PD, h_PF, act_PI = saved
    need_x, need_w, need_gate_up, need_down = needs
    T = x_TD.shape[0]
    d_x = d_weights = d_gate_up = d_down = None
    if not any(needs):
        return d_x, d_weights, d_gate_up, d_down
    d_y_PD = _gather_rows(d_out_TD, sorted_pair_P, None, K, x_TD.dtype)
    if need_down:
        d_down = weight_grad(act_PI, d_y_PD, counts_E, offsets_E, w_down_EID.dtype)
    if need_x or need_w or need_gate_up:
        # d act = d y @ w_down[e].T; the epilogue turns it into d(gate|up) through SwiGLU.
        d_h_PF = grouped_gemm(d_y_PD, w_down_EID.transpose(1, 2), counts_E, offsets_E, swiglu_h_PF=h_PF)
        if need_gate_up:
            d_gate_up = weight_grad(x_in_PD, d_h_PF, counts_E, offsets_E, w_gate_up_EDF.dtype)
        if need_x or need_w:
            d_in_PD = grouped_gemm(d_h_PF, w_gate_up_EDF.transpose(1, 2), counts_E, offsets_E)
            if need_x:
                weights_P = topk_weights_TK.reshape(-1).to(x_TD.dtype)
                d_x = _combine_rows(d_in_PD, pos_P, weights_P, None, T, K, x_TD.dtype)
            if need_w:
                d_weights = _score_grad(d_in_PD, x_TD, pos_P, K, topk_weights_TK.dtype).view(T, K)
    return d_x, d_weights, d_gate_up, d_down


class MoEExpertsFunction(torch.autograd.Function):
    """Forward and backward both run Triton kernels; the routing ids get no gradient."""

    @staticmethod
    def forward(ctx, x_TD, topk_ids_TK, topk_weights_TK, w_gate_up_EDF, w_down_EID, shared_TD):
        out_TD, saved = _forward(x_TD, topk_ids_TK, topk_weights_TK, w_gate_up_EDF, w_down_EID, shared_TD,
                                 keep=True)
        ctx.top_k = topk_ids_TK.shape[1]
        ctx.save_for_backward(x_TD, topk_weights_TK, w_gate_up_EDF, w_down_EID, *saved)
        return out_TD

    @staticmethod
    def backward(ctx, d_out_TD):
        x_TD, topk_weights_TK, w_gate_up_EDF, w_down_EID, *saved = ctx.saved_tensors
        need_x, _, need_w, need_gate_up, need_down, need_shared = ctx.needs_input_grad
        grads = _backward(d_out_TD, x_TD, topk_weights_TK, w_gate_up_EDF, w_down_EID, ctx.top_k, saved,
                          (need_x, need_w, need_gate_up, need_down))
        d_x, d_weights, d_gate_up, d_down = grads
        return d_x, None, d_weights, d_gate_up, d_down, (d_out_TD if need_shared else None)


def moe_experts_triton(x_TD, topk_ids_TK, topk_weights_TK, w_gate_up_EDF, w_down_EID, shared_TD=None):
    """Checked inputs (see kernels.moe.moe_experts) -> (T, D); autograd-aware."""
    tensors = (x_TD, topk_weights_TK, w_gate_up_EDF, w_down_EID, shared_TD)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return MoEExpertsFunction.apply(x_TD, topk_ids_TK, topk_weights_TK, w_gate_up_EDF, w_down_EID, shared_TD)
    return _forward(x_TD, topk_ids_TK, topk_weights_TK, w_gate_up_EDF, w_down_EID, shared_TD, keep=False)[0]


def moe_experts_triton_grads(d_out_TD, x_TD, topk_ids_TK, topk_weights_TK, w_gate_up_EDF, w_down_EID):
    """Recompute the forward's buffers, then -> d x, d topk_weights, d w_gate_up, d w_down; no autograd."""
    _, saved = _forward(x_TD, topk_ids_TK, topk_weights_TK, w_gate_up_EDF, w_down_EID, None, keep=True)
    return _backward(d_out_TD, x_TD, topk_weights_TK, w_gate_up_EDF, w_down_EID, topk_ids_TK.shape[1], saved,
                     (True, True, True, True))
