"""Triton flash attention over packed variable-length sequences: forward and backward.

A program owns one block of one sequence's query rows (forward, dq) or key rows (dk/dv) for one
head; grids are (head, block, sequence) with the sequence's blocks up to the longest one, and a
program whose block starts past its sequence's end returns at once. Softmax runs in base 2
(`scale * log2(e)` folded into the scores) and the forward saves the base-2 log-sum-exp per query
row, (H, T) fp32, which the backward uses to rebuild probabilities without a second max/sum pass.

Each program walks only the blocks its rows can see (chunked and sliding layers skip everything
before the chunk or window starts, causal ones everything past the diagonal), split into three
runs: edge blocks before and after the interior build the per-element mask, interior blocks that
every row sees whole skip it.

Backward: delta = rowsum(o * do); one kernel per key block of a kv head accumulates dk and dv over
the G query heads sharing it and over every query block that can see it (no atomics); another per
query block accumulates dq over its visible key blocks. Offsets inside one sequence are int32 on
top of an int64 base (so one sequence's span of q or k elements must stay below 2**31).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.dispatch import interpreting

_LOG2E = 1.4426950408889634
# The interpreter keeps bf16 as raw uint16 and its tl.dot multiplies the bit patterns
# (triton-lang/triton#11584), so interpreted kernels hand tl.dot fp32 operands (DOT_T): values already
# rounded to bf16 multiply exactly in fp32, so only the speed changes. On a GPU DOT_T is the input
# dtype and the casts to it vanish.
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _tuning(half: list[tuple[int, int, int, int]], single: list[tuple[int, int, int, int]]) -> dict:
    """triton.autotune arguments: (BLOCK_M, BLOCK_N, warps, stages) candidates for 16-bit inputs and for
    fp32 ones, kept apart by the input dtype. Chosen by compiling for sm_90 at head dim 128 and keeping
    what fits in shared memory and ptxas placed without spilling; fp32 runs 3xTF32 dots and spills some
    in every config (0.1-1 KB), a cost only fp32 training pays."""
    key = ["G", "HEAD_DIM", "CAUSAL", "CHUNKED", "WINDOWED"]
    if interpreting():
        # The interpreter runs each program in Python: one small config keeps the CPU tests fast and
        # still gives several blocks per sequence.
        return {"configs": [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)],
                "key": key}

    def configs(blocks):
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                for m, n, w, s in blocks]

    by_width = {2: configs(half), 4: configs(single)}

    def prune(configs, nargs, **kwargs):
        return by_width[4 if kwargs["IN_T"] == tl.float32 else 2]

    return {"configs": by_width[2] + by_width[4], "key": key,
            "prune_configs_by": {"early_config_prune": prune}}


# BLOCK_M is the query block and BLOCK_N the key block in every kernel.
_FWD_TUNING = _tuning([(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4), (64, 32, 4, 3), (32, 32, 4, 2)],
                      [(128, 32, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2)])
_DKDV_TUNING = _tuning([(32, 128, 8, 3), (32, 64, 4, 3), (16, 64, 4, 2), (32, 32, 4, 2)],
                       [(32, 32, 8, 1), (16, 32, 4, 1), (32, 32, 4, 2)])
_DQ_TUNING = _tuning([(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2)],
                     [(32, 32, 4, 1), (64, 16, 4, 1)])


@triton.jit
def _seq_bounds(CU_Q, CU_K, b):
    q_start = tl.load(CU_Q + b)
    q_len = tl.load(CU_Q + b + 1) - q_start
    k_start = tl.load(CU_K + b)
    k_len = tl.load(CU_K + b + 1) - k_start
    return q_start, q_len, k_start, k_len


@triton.jit
def _key_runs(q_lo, q_hi, k_len, chunk_size, window, CAUSAL: tl.constexpr, CHUNKED: tl.constexpr,
              WINDOWED: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key positions [lo, a) edge, [a, b) interior, [b, hi) edge for queries at positions [q_lo, q_hi]:
    [lo, hi) is every key any of them sees, interior blocks are seen whole by all of them."""
    lo = q_lo * 0
    hi = k_len
    full_lo = lo
    full_end = k_len  # interior blocks end at or before this
    if CAUSAL:
        hi = tl.minimum(hi, q_hi + 1)
        full_end = tl.minimum(full_end, q_lo + 1)
    if CHUNKED:
        lo = tl.maximum(lo, q_lo // chunk_size * chunk_size)
        hi = tl.minimum(hi, (q_hi // chunk_size + 1) * chunk_size)
        full_lo = tl.maximum(full_lo, q_hi // chunk_size * chunk_size)
        full_end = tl.minimum(full_end, (q_lo // chunk_size + 1) * chunk_size)
    if WINDOWED:
        lo = tl.maximum(lo, q_lo - window + 1)
        full_lo = tl.maximum(full_lo, q_hi - window + 1)
    lo = lo // BLOCK_N * BLOCK_N
    # full_end <= hi, so the interior never passes hi; a capped at hi leaves the edge run [lo, hi) whole.
    a = tl.minimum(tl.maximum((full_lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N, lo), hi)
    b = tl.maximum(full_end // BLOCK_N * BLOCK_N, a)
    return lo, a, b, hi


@triton.jit
def _query_runs(k_lo, k_hi, k_ragged, q_offset, q_len, chunk_size, window, CAUSAL: tl.constexpr,
                CHUNKED: tl.constexpr, WINDOWED: tl.constexpr, BLOCK_M: tl.constexpr):
    """Query ROWS [lo, a) edge, [a, b) interior, [b, hi) edge for keys at positions [k_lo, k_hi]; rows
    past q_len inside the last block are harmless (their lse is +inf, so p == 0)."""
    lo = q_offset
    hi = q_offset + q_len
    full_lo = q_offset
    full_end = q_offset + (q_len + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    if CAUSAL:
        lo = tl.maximum(lo, k_lo)
        full_lo = tl.maximum(full_lo, k_hi)
    if CHUNKED:
        lo = tl.maximum(lo, k_lo // chunk_size * chunk_size)
        hi = tl.minimum(hi, (k_hi // chunk_size + 1) * chunk_size)
        full_lo = tl.maximum(full_lo, k_hi // chunk_size * chunk_size)
        full_end = tl.minimum(full_end, (k_lo // chunk_size + 1) * chunk_size)
    if WINDOWED:
        hi = tl.minimum(hi, k_hi + window)
        full_end = tl.minimum(full_end, k_lo + window)
    full_end = tl.where(k_ragged, full_lo, full_end)  # padding keys need the mask
    lo = (lo - q_offset) // BLOCK_M * BLOCK_M
    hi = hi - q_offset
    # The interior may reach into the last block's padding, so clamp to hi's block, not to hi; for
    # hi < 0 (no query sees these keys) the truncating division gives 0 and every run is empty.
    hi_block = tl.maximum((hi + BLOCK_M - 1) // BLOCK_M * BLOCK_M, lo)
    a = tl.minimum(tl.maximum((full_lo - q_offset + BLOCK_M - 1) // BLOCK_M * BLOCK_M, lo), hi_block)
    b = tl.minimum(tl.maximum((full_end - q_offset) // BLOCK_M * BLOCK_M, a), hi_block)
    return lo, a, b, hi


@triton.jit
def _visible(q_pos, k_pos, k_len, chunk_size, window, CAUSAL: tl.constexpr, CHUNKED: tl.constexpr,
             WINDOWED: tl.constexpr):
    """Keys that exist and are visible; q_pos and k_pos broadcast against each other (either order)."""
    vis = k_pos < k_len
    if CAUSAL:
        vis &= k_pos <= q_pos
    if CHUNKED:
        vis &= (k_pos // chunk_size) == (q_pos // chunk_size)
    if WINDOWED:
        vis &= (q_pos - k_pos) < window
    return vis


@triton.jit
def _fwd_run(acc_MD, m_M, l_M, q_MD, q_pos_M, k_base, v_base, stride_kt, stride_vt, offs_d, k_len, start, end,
             qk_scale, chunk_size, window, MASKED: tl.constexpr, CAUSAL: tl.constexpr, CHUNKED: tl.constexpr,
             WINDOWED: tl.constexpr, PRECISION: tl.constexpr, IN_T: tl.constexpr, DOT_T: tl.constexpr,
             HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    for n0 in range(start, end, BLOCK_N):
        k_pos_N = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            kv_mask = (k_pos_N < k_len)[:, None] & d_ok[None, :]
        else:
            kv_mask = d_ok[None, :]
        # Addresses are rebuilt from scalar bases each step rather than carried through the loop as
        # (BLOCK_N, BLOCK_D) pointer tensors, which would hold two registers per element.
        k_ND = tl.load(k_base + k_pos_N[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v_ND = tl.load(v_base + k_pos_N[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        k_ND, v_ND = k_ND.to(DOT_T), v_ND.to(DOT_T)
        s_MN = tl.dot(q_MD, tl.trans(k_ND), input_precision=PRECISION) * qk_scale
        if MASKED:
            vis = _visible(q_pos_M[:, None], k_pos_N[None, :], k_len, chunk_size, window, CAUSAL, CHUNKED,
                           WINDOWED)
            s_MN = tl.where(vis, s_MN, float("-inf"))
        m_new = tl.maximum(m_M, tl.max(s_MN, 1))
        # A row that has seen no visible key yet keeps max -inf; subtracting 0 instead avoids inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p_MN = tl.exp2(s_MN - m_safe[:, None])
        alpha = tl.exp2(m_M - m_safe)
        l_M = l_M * alpha + tl.sum(p_MN, 1)
        acc_MD = acc_MD * alpha[:, None] + tl.dot(p_MN.to(IN_T).to(DOT_T), v_ND, input_precision=PRECISION)
        m_M = m_new
    return acc_MD, m_M, l_M


@triton.autotune(**_FWD_TUNING)
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                stride_lh, qk_scale, chunk_size, window,
                G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                CHUNKED: tl.constexpr, WINDOWED: tl.constexpr, PRECISION: tl.constexpr, IN_T: tl.constexpr,
                DOT_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    h = tl.program_id(0)
    # Last blocks first: under a causal mask they have the most keys, so the long programs start early.
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    seq = tl.program_id(2)
    q_start, q_len, k_start, k_len = _seq_bounds(CU_Q, CU_K, seq)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    q_offset = k_len - q_len  # queries are the last q_len positions
    kv_h = h // G

    rows_M = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_mask = (rows_M < q_len)[:, None] & d_ok[None, :]
    q_ptrs = Q + q_start.to(tl.int64) * stride_qt + h * stride_qh + rows_M[:, None] * stride_qt
    q_MD = tl.load(q_ptrs + offs_d[None, :], mask=row_mask, other=0.0).to(DOT_T)
    k_base = K + k_start.to(tl.int64) * stride_kt + kv_h * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kv_h * stride_vh

    q_lo = q_offset + m0
    q_hi = q_offset + tl.minimum(m0 + BLOCK_M, q_len) - 1
    lo, a, b, hi = _key_runs(q_lo, q_hi, k_len, chunk_size, window, CAUSAL, CHUNKED, WINDOWED, BLOCK_N)
    q_pos_M = q_offset + rows_M
    m_M = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_M = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_MD = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_MD, m_M, l_M = _fwd_run(acc_MD, m_M, l_M, q_MD, q_pos_M, k_base, v_base, stride_kt, stride_vt,
                                offs_d, k_len, lo, a, qk_scale, chunk_size, window, True, CAUSAL, CHUNKED,
                                WINDOWED, PRECISION, IN_T, DOT_T, HEAD_DIM, BLOCK_N)
    acc_MD, m_M, l_M = _fwd_run(acc_MD, m_M, l_M, q_MD, q_pos_M, k_base, v_base, stride_kt, stride_vt,
                                offs_d, k_len, a, b, qk_scale, chunk_size, window, False, CAUSAL, CHUNKED,
                                WINDOWED, PRECISION, IN_T, DOT_T, HEAD_DIM, BLOCK_N)
    acc_MD, m_M, l_M = _fwd_run(acc_MD, m_M, l_M, q_MD, q_pos_M, k_base, v_base, stride_kt, stride_vt,
                                offs_d, k_len, b, hi, qk_scale, chunk_size, window, True, CAUSAL, CHUNKED,
                                WINDOWED, PRECISION, IN_T, DOT_T, HEAD_DIM, BLOCK_N)

    # Only padding rows past q_len end with l == 0 (every real query sees at least itself).
    l_safe = tl.where(l_M == 0.0, 1.0, l_M)
    o_MD = acc_MD / l_safe[:, None]
    o_ptrs = O + q_start.to(tl.int64) * stride_ot + h * stride_oh + rows_M[:, None] * stride_ot
    tl.store(o_ptrs + offs_d[None, :], o_MD.to(O.dtype.element_ty), mask=row_mask)
    tl.store(LSE + h * stride_lh + q_start + rows_M, m_M + tl.log2(l_safe), mask=rows_M < q_len)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, T, stride_ot, stride_oh, stride_dot, stride_doh, stride_dh,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    t_T = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (t_T < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    t64 = t_T.to(tl.int64)[:, None]
    o = tl.load(O + t64 * stride_ot + h * stride_oh + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + t64 * stride_dot + h * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    do = do.to(tl.float32)
    tl.store(DELTA + h * stride_dh + t_T, tl.sum(o * do, 1), mask=t_T < T)


@triton.jit
def _dkdv_run(dk_ND, dv_ND, k_ND, v_ND, k_pos_N, Q, DO, LSE, DELTA, q_start, h0, stride_qt, stride_qh,
              stride_dot, stride_doh, stride_lh, offs_d, q_offset, q_len, k_len, start, end, qk_scale,
              chunk_size, window, MASKED: tl.constexpr, CAUSAL: tl.constexpr, CHUNKED: tl.constexpr,
              WINDOWED: tl.constexpr, PRECISION: tl.constexpr, IN_T: tl.constexpr, DOT_T: tl.constexpr,
              G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    n_blocks = tl.cdiv(tl.maximum(end - start, 0), BLOCK_M)
    q_off = q_start.to(tl.int64)
    # One flat loop over (query head of the group, query block): nesting a head loop around the block
    # loops made every config spill, and one loop lets the pipeliner prefetch across heads.
    for i in range(G * n_blocks):
        g = i // n_blocks
        m0 = start + (i - g * n_blocks) * BLOCK_M
        h = h0 + g
        rows_M = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows_M < q_len
        row_mask = row_ok[:, None] & d_ok[None, :]
        q_ptrs = Q + q_off * stride_qt + h * stride_qh + rows_M[:, None] * stride_qt + offs_d[None, :]
        do_ptrs = DO + q_off * stride_dot + h * stride_doh + rows_M[:, None] * stride_dot + offs_d[None, :]
        q_MD = tl.load(q_ptrs, mask=row_mask, other=0.0).to(DOT_T)
        do_MD = tl.load(do_ptrs, mask=row_mask, other=0.0).to(DOT_T)
        # Padding rows get lse = +inf, so p == 0 and they add nothing.
        lse_M = tl.load(LSE + h * stride_lh + q_start + rows_M, mask=row_ok, other=float("inf"))
        delta_M = tl.load(DELTA + h * stride_lh + q_start + rows_M, mask=row_ok, other=0.0)
        s_NM = tl.dot(k_ND, tl.trans(q_MD), input_precision=PRECISION) * qk_scale
        p_NM = tl.exp2(s_NM - lse_M[None, :])
        if MASKED:
            vis = _visible((q_offset + rows_M)[None, :], k_pos_N[:, None], k_len, chunk_size, window, CAUSAL,
                           CHUNKED, WINDOWED)
            p_NM = tl.where(vis, p_NM, 0.0)
        dv_ND += tl.dot(p_NM.to(IN_T).to(DOT_T), do_MD, input_precision=PRECISION)
        dp_NM = tl.dot(v_ND, tl.trans(do_MD), input_precision=PRECISION)
        ds_NM = p_NM * (dp_NM - delta_M[None, :])
        dk_ND += tl.dot(ds_NM.to(IN_T).to(DOT_T), q_MD, input_precision=PRECISION)
    return dk_ND, dv_ND


@triton.autotune(**_DKDV_TUNING)
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                     stride_lh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                     qk_scale, scale, chunk_size, window,
                     G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                     CHUNKED: tl.constexpr, WINDOWED: tl.constexpr, PRECISION: tl.constexpr,
                     IN_T: tl.constexpr, DOT_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    kv_h = tl.program_id(0)
    pid_n = tl.program_id(1)
    seq = tl.program_id(2)
    q_start, q_len, k_start, k_len = _seq_bounds(CU_Q, CU_K, seq)
    n0 = pid_n * BLOCK_N
    if n0 >= k_len:
        return
    q_offset = k_len - q_len

    k_pos_N = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (k_pos_N < k_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k_off = k_start.to(tl.int64)
    k_ND = tl.load(K + k_off * stride_kt + kv_h * stride_kh + k_pos_N[:, None] * stride_kt + offs_d[None, :],
                   mask=kv_mask, other=0.0).to(DOT_T)
    v_ND = tl.load(V + k_off * stride_vt + kv_h * stride_vh + k_pos_N[:, None] * stride_vt + offs_d[None, :],
                   mask=kv_mask, other=0.0).to(DOT_T)

    k_hi = tl.minimum(n0 + BLOCK_N, k_len) - 1
    lo, a, b, hi = _query_runs(n0, k_hi, n0 + BLOCK_N > k_len, q_offset, q_len, chunk_size, window, CAUSAL,
                               CHUNKED, WINDOWED, BLOCK_M)
    dk_ND = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv_ND = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    h0 = kv_h * G
    dk_ND, dv_ND = _dkdv_run(dk_ND, dv_ND, k_ND, v_ND, k_pos_N, Q, DO, LSE, DELTA, q_start, h0, stride_qt,
                             stride_qh, stride_dot, stride_doh, stride_lh, offs_d, q_offset, q_len, k_len,
                             lo, a, qk_scale, chunk_size, window, True, CAUSAL, CHUNKED, WINDOWED, PRECISION,
                             IN_T, DOT_T, G, HEAD_DIM, BLOCK_M)
    dk_ND, dv_ND = _dkdv_run(dk_ND, dv_ND, k_ND, v_ND, k_pos_N, Q, DO, LSE, DELTA, q_start, h0, stride_qt,
                             stride_qh, stride_dot, stride_doh, stride_lh, offs_d, q_offset, q_len, k_len,
                             a, b, qk_scale, chunk_size, window, False, CAUSAL, CHUNKED, WINDOWED, PRECISION,
                             IN_T, DOT_T, G, HEAD_DIM, BLOCK_M)
    dk_ND, dv_ND = _dkdv_run(dk_ND, dv_ND, k_ND, v_ND, k_pos_N, Q, DO, LSE, DELTA, q_start, h0, stride_qt,
                             stride_qh, stride_dot, stride_doh, stride_lh, offs_d, q_offset, q_len, k_len,
                             b, hi, qk_scale, chunk_size, window, True, CAUSAL, CHUNKED, WINDOWED, PRECISION,
                             IN_T, DOT_T, G, HEAD_DIM, BLOCK_M)

    dk_ptrs = DK + k_off * stride_dkt + kv_h * stride_dkh + k_pos_N[:, None] * stride_dkt + offs_d[None, :]
    dv_ptrs = DV + k_off * stride_dvt + kv_h * stride_dvh + k_pos_N[:, None] * stride_dvt + offs_d[None, :]
    tl.store(dk_ptrs, (dk_ND * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, dv_ND.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_run(dq_MD, q_MD, do_MD, lse_M, delta_M, q_pos_M, k_base, v_base, stride_kt, stride_vt, offs_d, k_len,
            start, end, qk_scale, chunk_size, window, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
            CHUNKED: tl.constexpr, WINDOWED: tl.constexpr, PRECISION: tl.constexpr, IN_T: tl.constexpr,
            DOT_T: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    for n0 in range(start, end, BLOCK_N):
        k_pos_N = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            kv_mask = (k_pos_N < k_len)[:, None] & d_ok[None, :]
        else:
            kv_mask = d_ok[None, :]
        # Addresses are rebuilt from scalar bases each step rather than carried through the loop as
        # (BLOCK_N, BLOCK_D) pointer tensors, which would hold two registers per element.
        k_ND = tl.load(k_base + k_pos_N[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v_ND = tl.load(v_base + k_pos_N[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        k_ND, v_ND = k_ND.to(DOT_T), v_ND.to(DOT_T)
        s_MN = tl.dot(q_MD, tl.trans(k_ND), input_precision=PRECISION) * qk_scale
        p_MN = tl.exp2(s_MN - lse_M[:, None])
        if MASKED:
            vis = _visible(q_pos_M[:, None], k_pos_N[None, :], k_len, chunk_size, window, CAUSAL, CHUNKED,
                           WINDOWED)
            p_MN = tl.where(vis, p_MN, 0.0)
        dp_MN = tl.dot(do_MD, tl.trans(v_ND), input_precision=PRECISION)
        ds_MN = p_MN * (dp_MN - delta_M[:, None])
        dq_MD += tl.dot(ds_MN.to(IN_T).to(DOT_T), k_ND, input_precision=PRECISION)
    return dq_MD


@triton.autotune(**_DQ_TUNING)
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                   stride_lh, stride_dqt, stride_dqh,
                   qk_scale, scale, chunk_size, window,
                   G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                   CHUNKED: tl.constexpr, WINDOWED: tl.constexpr, PRECISION: tl.constexpr,
                   IN_T: tl.constexpr, DOT_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    h = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    seq = tl.program_id(2)
    q_start, q_len, k_start, k_len = _seq_bounds(CU_Q, CU_K, seq)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    q_offset = k_len - q_len
    kv_h = h // G

    rows_M = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows_M < q_len
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_mask = row_ok[:, None] & d_ok[None, :]
    q_off = q_start.to(tl.int64)
    q_ptrs = Q + q_off * stride_qt + h * stride_qh + rows_M[:, None] * stride_qt + offs_d[None, :]
    do_ptrs = DO + q_off * stride_dot + h * stride_doh + rows_M[:, None] * stride_dot + offs_d[None, :]
    q_MD = tl.load(q_ptrs, mask=row_mask, other=0.0).to(DOT_T)
    do_MD = tl.load(do_ptrs, mask=row_mask, other=0.0).to(DOT_T)
    # Padding rows get lse = +inf, so p == 0 and they add nothing.
    lse_M = tl.load(LSE + h * stride_lh + q_start + rows_M, mask=row_ok, other=float("inf"))
    delta_M = tl.load(DELTA + h * stride_lh + q_start + rows_M, mask=row_ok, other=0.0)
    k_base = K + k_start.to(tl.int64) * stride_kt + kv_h * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kv_h * stride_vh

    q_lo = q_offset + m0
    q_hi = q_offset + tl.minimum(m0 + BLOCK_M, q_len) - 1
    lo, a, b, hi = _key_runs(q_lo, q_hi, k_len, chunk_size, window, CAUSAL, CHUNKED, WINDOWED, BLOCK_N)
    q_pos_M = q_offset + rows_M
    dq_MD = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq_MD = _dq_run(dq_MD, q_MD, do_MD, lse_M, delta_M, q_pos_M, k_base, v_base, stride_kt, stride_vt, offs_d,
                    k_len, lo, a, qk_scale, chunk_size, window, True, CAUSAL, CHUNKED, WINDOWED,
                    PRECISION, IN_T, DOT_T, HEAD_DIM, BLOCK_N)
    dq_MD = _dq_run(dq_MD, q_MD, do_MD, lse_M, delta_M, q_pos_M, k_base, v_base, stride_kt, stride_vt, offs_d,
                    k_len, a, b, qk_scale, chunk_size, window, False, CAUSAL, CHUNKED, WINDOWED,
                    PRECISION, IN_T, DOT_T, HEAD_DIM, BLOCK_N)
    dq_MD = _dq_run(dq_MD, q_MD, do_MD, lse_M, delta_M, q_pos_M, k_base, v_base, stride_kt, stride_vt, offs_d,
                    k_len, b, hi, qk_scale, chunk_size, window, True, CAUSAL, CHUNKED, WINDOWED,
                    PRECISION, IN_T, DOT_T, HEAD_DIM, BLOCK_N)

    dq_ptrs = DQ + q_off * stride_dqt + h * stride_dqh + rows_M[:, None] * stride_dqt + offs_d[None, :]
    tl.store(dq_ptrs, (dq_MD * scale).to(DQ.dtype.element_ty), mask=row_mask)


def _static_args(q_THd, k_SKd, causal, chunk_size, window):
    d = q_THd.shape[2]
    in_t = _TL_DTYPES[q_THd.dtype]
    return {
        "G": q_THd.shape[1] // k_SKd.shape[1], "HEAD_DIM": d, "BLOCK_D": max(16, triton.next_power_of_2(d)),
        "CAUSAL": causal, "CHUNKED": chunk_size is not None, "WINDOWED": window is not None,
        # fp32 inputs get 3xTF32 products, within fp32 rounding of exact (one TF32 pass would cost ~1e-3
        # relative; "ieee" takes the FMA path, which spilled kilobytes at head dim 128).
        "PRECISION": "tf32x3" if q_THd.dtype == torch.float32 else "tf32",
        "IN_T": in_t, "DOT_T": tl.float32 if interpreting() else in_t}


def _forward(q_THd, k_SKd, v_SKd, cu_q, cu_k, max_q, scale, causal, chunk_size, window):
    T, H, _ = q_THd.shape
    B = cu_q.numel() - 1
    o_THd = torch.empty_like(q_THd)
    lse_HT = torch.empty((H, T), dtype=torch.float32, device=q_THd.device)
    grid = lambda meta: (H, triton.cdiv(max_q, meta["BLOCK_M"]), B)
    _fwd_kernel[grid](
        q_THd, k_SKd, v_SKd, o_THd, lse_HT, cu_q, cu_k,
        q_THd.stride(0), q_THd.stride(1), k_SKd.stride(0), k_SKd.stride(1), v_SKd.stride(0), v_SKd.stride(1),
        o_THd.stride(0), o_THd.stride(1), lse_HT.stride(0),
        scale * _LOG2E, chunk_size or 1, window or 1,
        **_static_args(q_THd, k_SKd, causal, chunk_size, window))
    return o_THd, lse_HT


def _backward(do_THd, q_THd, k_SKd, v_SKd, o_THd, lse_HT, cu_q, cu_k, max_q, max_k, scale, causal, chunk_size,
              window, need_dq):
    T, H, d = q_THd.shape
    K = k_SKd.shape[1]
    B = cu_q.numel() - 1
    if do_THd.stride(-1) != 1:  # e.g. the expanded gradient of a sum()
        do_THd = do_THd.contiguous()
    static = _static_args(q_THd, k_SKd, causal, chunk_size, window)
    delta_HT = torch.empty_like(lse_HT)
    block_t = 16 if interpreting() else 64
    _bwd_delta_kernel[(triton.cdiv(T, block_t), H)](
        o_THd, do_THd, delta_HT, T, o_THd.stride(0), o_THd.stride(1), do_THd.stride(0), do_THd.stride(1),
        delta_HT.stride(0), HEAD_DIM=d, BLOCK_D=static["BLOCK_D"], BLOCK_T=block_t)

    dk_SKd = torch.empty_like(k_SKd)
    dv_SKd = torch.empty_like(v_SKd)
    tail = (scale * _LOG2E, scale, chunk_size or 1, window or 1)
    grid_kv = lambda meta: (K, triton.cdiv(max_k, meta["BLOCK_N"]), B)
    _bwd_dkdv_kernel[grid_kv](
        q_THd, k_SKd, v_SKd, do_THd, lse_HT, delta_HT, dk_SKd, dv_SKd, cu_q, cu_k,
        q_THd.stride(0), q_THd.stride(1), k_SKd.stride(0), k_SKd.stride(1), v_SKd.stride(0), v_SKd.stride(1),
        do_THd.stride(0), do_THd.stride(1), lse_HT.stride(0),
        dk_SKd.stride(0), dk_SKd.stride(1), dv_SKd.stride(0), dv_SKd.stride(1), *tail, **static)
    dq_THd = None
    if need_dq:
        dq_THd = torch.empty_like(q_THd)
        grid_q = lambda meta: (H, triton.cdiv(max_q, meta["BLOCK_M"]), B)
        _bwd_dq_kernel[grid_q](
            q_THd, k_SKd, v_SKd, do_THd, lse_HT, delta_HT, dq_THd, cu_q, cu_k,
            q_THd.stride(0), q_THd.stride(1), k_SKd.stride(0), k_SKd.stride(1), v_SKd.stride(0),
            v_SKd.stride(1), do_THd.stride(0), do_THd.stride(1), lse_HT.stride(0), dq_THd.stride(0),
            dq_THd.stride(1),
            *tail, **static)
    return dq_THd, dk_SKd, dv_SKd


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_THd, k_SKd, v_SKd, cu_q, cu_k, max_q, max_k, scale, causal, chunk_size, window):
        o_THd, lse_HT = _forward(q_THd, k_SKd, v_SKd, cu_q, cu_k, max_q, scale, causal, chunk_size, window)
        ctx.save_for_backward(q_THd, k_SKd, v_SKd, o_THd, lse_HT, cu_q, cu_k)
        ctx.args = (max_q, max_k, scale, causal, chunk_size, window)
        return o_THd

    @staticmethod
    def backward(ctx, do_THd):
        q_THd, k_SKd, v_SKd, o_THd, lse_HT, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = _backward(do_THd, q_THd, k_SKd, v_SKd, o_THd, lse_HT, cu_q, cu_k, *ctx.args,
                               need_dq=ctx.needs_input_grad[0])
        return dq, dk, dv, None, None, None, None, None, None, None, None


def flash_attention_triton(q_THd, k_SKd, v_SKd, cu_q, cu_k, max_q: int, max_k: int, scale: float,
                           causal: bool, chunk_size: int | None, window: int | None) -> torch.Tensor:
    """The Triton path of kernels.flash_attention.flash_attention (inputs already checked there)."""
    if max_q == 0:
        return q_THd * 0
    return _FlashAttention.apply(q_THd, k_SKd, v_SKd, cu_q, cu_k, max_q, max_k, scale, causal, chunk_size,
                                 window)
