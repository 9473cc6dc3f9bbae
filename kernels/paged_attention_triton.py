"""Triton paged decode attention (flash-decoding): partitions of each sequence's keys, then a merge.

One program handles one (sequence, kv head, key partition): the G query heads that share the kv
head are the rows of one padded tl.dot, so each K/V row is read once per program, not G times.
Keys are gathered token by token through the block table, so the block size need not divide the
tile. When the grid of (sequence, kv head) pairs alone would leave SMs idle (batch 1, a long
context), the keys are split into partitions whose partial results are merged by log-sum-exp in
a second kernel; with one partition the first kernel writes the output itself.

The launch configuration is fixed (BLOCK_N keys a tile, NUM_WARPS warps): decode is bound by
reading K/V, and a fixed config keeps the grid a function of shapes only (CUDA-graph friendly)
and runs unchanged under the interpreter.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kernels.dispatch import interpreting

BLOCK_N = 64  # keys per tile
BLOCK_P = 16  # partitions per step of the merge loop
MIN_PARTITION_TILES = 4  # a shorter partition costs more in its merge than its parallelism wins
PROGRAMS_PER_SM = 2
INTERPRETER_SMS = 4  # the interpreter has no SMs; this keeps several partitions testable at small shapes
NUM_WARPS = 4
LOG2E = 1.0 / math.log(2.0)  # the kernels use exp2/log2


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def plan_partitions(max_keys: int, programs: int, device: torch.device) -> tuple[int, int]:
    """(partitions, keys per partition) for `programs` (sequence, kv head) pairs whose longest
    visible span is at most max_keys. Depends on shapes only, so a captured CUDA graph stays valid."""
    tiles = max(1, triton.cdiv(max_keys, BLOCK_N))
    if device.type == "cuda":
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        sms = INTERPRETER_SMS
    wanted = triton.cdiv(PROGRAMS_PER_SM * sms, max(programs, 1))
    parts = max(1, min(wanted, tiles // MIN_PARTITION_TILES))
    tiles_per_part = triton.cdiv(tiles, parts)
    return triton.cdiv(tiles, tiles_per_part), tiles_per_part * BLOCK_N


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # Triton's interpreter multiplies bfloat16 operands as their raw uint16 bits (it does not support
    # bf16 arithmetic), so interpreted bf16 runs take the dot in fp32 on the same rounded values.
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def _paged_decode_partition_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, o_ptr, lse_ptr,
    scale_log2, floor_scale, attn_scale, chunk_size, partition_keys, G, D, M, S,
    stride_qb, stride_qh, stride_qd,
    stride_kn, stride_ks, stride_kk, stride_kd,
    stride_vn, stride_vs, stride_vk, stride_vd,
    stride_btb, stride_btm, stride_ctx,
    stride_ob, stride_oh, stride_op, stride_od,
    stride_lb, stride_lh, stride_lp,
    CHUNKED: tl.constexpr, TEMPERATURE: tl.constexpr, WRITE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kh = tl.program_id(1)
    part = tl.program_id(2)

    ctx = tl.load(ctx_ptr + b * stride_ctx)
    pos = ctx - 1
    lo = 0
    if CHUNKED:
        lo = tl.maximum(pos, 0) // chunk_size * chunk_size
    start = lo + part * partition_keys
    end = tl.minimum(start + partition_keys, ctx)  # start >= end: an empty partition, the loop never runs

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < G
    d_mask = offs_d < D
    heads = kh * G + offs_g
    gd_mask = g_mask[:, None] & d_mask[None, :]

    # Rows past G are zero padding so the dot has >= 16 rows; they are never stored.
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=gd_mask, other=0.0)
    if TEMPERATURE:
        t = tl.log(tl.floor(ctx.to(tl.float32) / floor_scale) + 1.0) * attn_scale + 1.0
        q = (q.to(tl.float32) * t).to(k_ptr.dtype.element_ty)  # the model rounds scaled q to its dtype too

    # A finite floor keeps exp2(m_old - m_new) from being -inf - -inf while every key so far is masked.
    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    bt_row = bt_ptr + b * stride_btb
    for n0 in range(start, end, BLOCK_N):
        tok = n0 + offs_n
        col = tok // S
        valid = (tok < end) & (col < M)
        block = tl.load(bt_row + col * stride_btm, mask=valid, other=-1)
        valid = valid & (block >= 0)  # a hole is never dereferenced
        block = block.to(tl.int64)
        slot = tok % S
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + (block * stride_kn + slot * stride_ks + kh * stride_kk)[:, None]
                    + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * scale_log2
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + (block * stride_vn + slot * stride_vs + kh * stride_vk)[:, None]
                    + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOT)
        m_i = m_new

    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + part * stride_op + offs_d[None, :] * stride_od,
             o.to(o_ptr.dtype.element_ty), mask=gd_mask)
    if WRITE_LSE:
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + part * stride_lp, lse, mask=g_mask)


@triton.jit
def _merge_partitions_kernel(
    o_part_ptr, lse_ptr, out_ptr, P, D,
    stride_pb, stride_ph, stride_pp, stride_pd,
    stride_lb, stride_lh, stride_lp,
    stride_ob, stride_oh, stride_od,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    lse_row = lse_ptr + b * stride_lb + h * stride_lh
    o_row = o_part_ptr + b * stride_pb + h * stride_ph

    m_vec = tl.full([BLOCK_P], float("-inf"), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        lse = tl.load(lse_row + (p0 + offs_p) * stride_lp, mask=p0 + offs_p < P, other=float("-inf"))
        m_vec = tl.maximum(m_vec, lse)
    m = tl.max(m_vec, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no partition saw a key: all weights are 0, output 0

    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    w_vec = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p_mask = p0 + offs_p < P
        lse = tl.load(lse_row + (p0 + offs_p) * stride_lp, mask=p_mask, other=float("-inf"))
        w = tl.exp2(lse - m)
        o = tl.load(o_row + (p0 + offs_p)[:, None] * stride_pp + offs_d[None, :] * stride_pd,
                    mask=p_mask[:, None] & d_mask[None, :], other=0.0)
        acc += tl.sum(w[:, None] * o, 0)
        w_vec += w
    total = tl.sum(w_vec, 0)
    out = acc / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=d_mask)


def paged_decode_attention_triton(q_BHd: torch.Tensor, k_cache_NSKd: torch.Tensor, v_cache_NSKd: torch.Tensor,
                                  block_tables_BM: torch.Tensor, context_lens_B: torch.Tensor, scale: float,
                                  chunk_size: int | None, temperature: tuple[float, float] | None) -> torch.Tensor:
    """Inputs already checked by kernels.paged_attention.paged_decode_attention."""
    B, H, d = q_BHd.shape
    _, S, K, _ = k_cache_NSKd.shape
    M = block_tables_BM.shape[1]
    G = H // K
    if B == 0 or M == 0:  # no table columns: every length is 0 (checked on the host), nothing to read
        return torch.zeros_like(q_BHd)
    out_BHd = torch.empty_like(q_BHd)
    # The table's width bounds the longest context without reading lengths back from the device.
    max_keys = M * S if chunk_size is None else min(M * S, chunk_size)
    P, partition_keys = plan_partitions(max_keys, B * K, q_BHd.device)
    block_g = max(16, triton.next_power_of_2(G))
    block_d = max(16, triton.next_power_of_2(d))
    if P == 1:
        o_part, lse = out_BHd, out_BHd  # lse is not written with one partition
        o_strides = (out_BHd.stride(0), out_BHd.stride(1), 0, out_BHd.stride(2))
        lse_strides = (0, 0, 0)
    else:
        o_part = torch.empty(B, H, P, d, dtype=torch.float32, device=q_BHd.device)
        lse = torch.empty(B, H, P, dtype=torch.float32, device=q_BHd.device)
        o_strides, lse_strides = o_part.stride(), lse.stride()
    floor_scale, attn_scale = temperature if temperature is not None else (1.0, 0.0)
    _paged_decode_partition_kernel[(B, K, P)](
        q_BHd, k_cache_NSKd, v_cache_NSKd, block_tables_BM, context_lens_B, o_part, lse,
        scale * LOG2E, float(floor_scale), float(attn_scale), chunk_size or 1, partition_keys, G, d, M, S,
        *q_BHd.stride(), *k_cache_NSKd.stride(), *v_cache_NSKd.stride(),
        *block_tables_BM.stride(), context_lens_B.stride(0), *o_strides, *lse_strides,
        CHUNKED=chunk_size is not None, TEMPERATURE=temperature is not None, WRITE_LSE=P > 1,
        DOT_PRECISION="ieee" if q_BHd.dtype == torch.float32 else "tf32",
        UPCAST_DOT=interpreting() and q_BHd.dtype == torch.bfloat16,
        BLOCK_G=block_g, BLOCK_N=BLOCK_N, BLOCK_D=block_d, num_warps=NUM_WARPS,
    )
    if P > 1:
        _merge_partitions_kernel[(B, H)](
            o_part, lse, out_BHd, P, d, *o_part.stride(), *lse.stride(), *out_BHd.stride(),
            BLOCK_P=BLOCK_P, BLOCK_D=block_d, num_warps=NUM_WARPS,
        )
    return out_BHd

