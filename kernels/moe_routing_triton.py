"""Triton top-k + sigmoid router for Llama 4 MoE, forward and backward."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _topk_sigmoid_kernel(logits_ptr, scores_ptr, ids_ptr, T, E,
                         stride_lt, stride_le, stride_st, stride_sk, stride_it, stride_ik,
                         TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """K rounds of arg-max over each row, best first, lowest id among equals."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    t_ok = t < T
    t64 = t.to(tl.int64)
    valid = t_ok[:, None] & (e < E)[None, :]
    # Compared in fp32: bf16 comparisons are not value comparisons in the interpreter.
    logits = tl.load(logits_ptr + t64[:, None] * stride_lt + e[None, :] * stride_le, mask=valid,
                     other=0.0).to(tl.float32)
    # NaN ranks above everything, as in torch.topk, so a NaN logit is chosen and its score is NaN.
    key = tl.where(logits != logits, float("inf"), logits)  # noqa: PLR0124 (the NaN test)
    taken = ~valid  # padding columns can never be chosen
    for k in tl.static_range(TOP_K):
        cand = tl.where(taken, float("-inf"), key)
        best = tl.max(cand, axis=1)
        # A separate `taken` mask, not -inf alone, keeps an all -inf row from choosing an id twice.
        idx = tl.min(tl.where((cand == best[:, None]) & ~taken, e[None, :], BLOCK_E), axis=1)
        chosen = e[None, :] == idx[:, None]
        taken = taken | chosen
        score = tl.sigmoid(tl.sum(tl.where(chosen, logits, 0.0), axis=1))
        tl.store(scores_ptr + t64 * stride_st + k * stride_sk, score.to(scores_ptr.dtype.element_ty), mask=t_ok)
        tl.store(ids_ptr + t64 * stride_it + k * stride_ik, idx.to(tl.int64), mask=t_ok)


@triton.jit
def _topk_sigmoid_bwd_kernel(d_scores_ptr, ids_ptr, logits_ptr, d_logits_ptr, T, E,
                             stride_gt, stride_gk, stride_it, stride_ik, stride_lt, stride_le,
                             stride_dt, stride_de,
                             TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """d logits = d score * s * (1 - s) at the chosen experts, zero elsewhere; whole rows written."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    t_ok = t < T
    t64 = t.to(tl.int64)
    valid = t_ok[:, None] & (e < E)[None, :]
    d_score = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
    for k in tl.static_range(TOP_K):
        idx = tl.load(ids_ptr + t64 * stride_it + k * stride_ik, mask=t_ok, other=-1)
        g = tl.load(d_scores_ptr + t64 * stride_gt + k * stride_gk, mask=t_ok, other=0.0).to(tl.float32)
        d_score += tl.where(e[None, :] == idx[:, None], g[:, None], 0.0)
    # The sigmoid is recomputed from the fp32 logit, not from the score rounded to its dtype.
    logits = tl.load(logits_ptr + t64[:, None] * stride_lt + e[None, :] * stride_le, mask=valid,
                     other=0.0).to(tl.float32)
    s = tl.sigmoid(logits)
    d_logits = d_score * s * (1.0 - s)
    tl.store(d_logits_ptr + t64[:, None] * stride_dt + e[None, :] * stride_de,
             d_logits.to(d_logits_ptr.dtype.element_ty), mask=valid)


def _blocks(E: int) -> tuple[int, int]:
    block_e = triton.next_power_of_2(E)
    return max(1, min(64, 4096 // block_e)), block_e


def _route(logits_TE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    T, E = logits_TE.shape
    scores_TK = torch.empty(T, top_k, dtype=logits_TE.dtype, device=logits_TE.device)
    ids_TK = torch.empty(T, top_k, dtype=torch.int64, device=logits_TE.device)
    block_t, block_e = _blocks(E)
    _topk_sigmoid_kernel[(triton.cdiv(T, block_t),)](
        logits_TE, scores_TK, ids_TK, T, E,
        logits_TE.stride(0), logits_TE.stride(1), scores_TK.stride(0), scores_TK.stride(1),
        ids_TK.stride(0), ids_TK.stride(1),
        TOP_K=top_k, BLOCK_T=block_t, BLOCK_E=block_e)
    return scores_TK, ids_TK


class MoERouteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, top_k):
        scores_TK, ids_TK = _route(logits_TE, top_k)
        ctx.mark_non_differentiable(ids_TK)
        ctx.save_for_backward(logits_TE, ids_TK)
        return scores_TK, ids_TK

    @staticmethod
    def backward(ctx, d_scores_TK, _d_ids):
        logits_TE, ids_TK = ctx.saved_tensors
        T, E = logits_TE.shape
        d_logits_TE = torch.empty_like(logits_TE, memory_format=torch.contiguous_format)
        if d_scores_TK is None:
            return d_logits_TE.zero_(), None
        block_t, block_e = _blocks(E)
        _topk_sigmoid_bwd_kernel[(triton.cdiv(T, block_t),)](
            d_scores_TK, ids_TK, logits_TE, d_logits_TE, T, E,
            d_scores_TK.stride(0), d_scores_TK.stride(1), ids_TK.stride(0), ids_TK.stride(1),
            logits_TE.stride(0), logits_TE.stride(1), d_logits_TE.stride(0), d_logits_TE.stride(1),
            TOP_K=ids_TK.shape[1], BLOCK_T=block_t, BLOCK_E=block_e)
        return d_logits_TE, None


def moe_route_triton(logits_TE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked inputs (see kernels.moe_routing.moe_route) -> (scores_TK, ids_TK); autograd-aware."""
    if torch.is_grad_enabled() and logits_TE.requires_grad:
        return MoERouteFunction.apply(logits_TE, top_k)
    return _route(logits_TE, top_k)
