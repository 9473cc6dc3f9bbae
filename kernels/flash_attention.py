"""Attention over packed variable-length sequences (prefill, training), causal/chunked/sliding, GQA.

Sequence i owns queries q[cu_seqlens_q[i]:cu_seqlens_q[i+1]] and keys/values
k[cu_seqlens_k[i]:cu_seqlens_k[i+1]], with Lk >= Lq: the queries are the LAST Lq positions
(query j sits at absolute position Lk - Lq + j, key t at t), so Lq == Lk is a fresh prompt or a
training document and Lq < Lk is a prompt chunk continuing cached context. A key is visible to a
query when every mask that is on allows it: causal (key_pos <= q_pos), chunked-local
(same `chunk_size` block, Llama 4's RoPE layers) and sliding window (q_pos - key_pos < window).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from kernels.dispatch import use_triton

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The Triton kernels hold one head row in registers, padded to a power of two.
_MAX_TRITON_HEAD_DIM = 256


def attention_mask(q_pos_Q: torch.Tensor, k_pos_L: torch.Tensor, causal: bool, chunk_size: int | None,
                   window: int | None) -> torch.Tensor:
    """Boolean (Q, L): True where the key at k_pos is visible to the query at q_pos."""
    diff_QL = q_pos_Q[:, None] - k_pos_L[None, :]
    mask_QL = torch.ones_like(diff_QL, dtype=torch.bool)
    if causal:
        mask_QL &= diff_QL >= 0
    if chunk_size is not None:
        mask_QL &= (q_pos_Q[:, None] // chunk_size) == (k_pos_L[None, :] // chunk_size)
    if window is not None:
        mask_QL &= diff_QL < window
    return mask_QL


def flash_attention_reference(q_THd: torch.Tensor, k_SKd: torch.Tensor, v_SKd: torch.Tensor,
                              cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, scale: float,
                              causal: bool = True, chunk_size: int | None = None,
                              window: int | None = None) -> torch.Tensor:
    """Per sequence: a mask from positions and SDPA in fp32; gradients by plain autograd."""
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    gqa = q_THd.shape[1] != k_SKd.shape[1]
    outs = []
    for i in range(len(cu_q) - 1):
        q_QHd = q_THd[cu_q[i]:cu_q[i + 1]]
        if q_QHd.shape[0] == 0:
            continue
        k_LKd, v_LKd = k_SKd[cu_k[i]:cu_k[i + 1]], v_SKd[cu_k[i]:cu_k[i + 1]]
        Q, L = q_QHd.shape[0], k_LKd.shape[0]
        k_pos_L = torch.arange(L, device=q_THd.device)
        mask_QL = attention_mask(k_pos_L[L - Q:], k_pos_L, causal, chunk_size, window)
        o_HQd = F.scaled_dot_product_attention(
            q_QHd.float().transpose(0, 1), k_LKd.float().transpose(0, 1), v_LKd.float().transpose(0, 1),
            attn_mask=mask_QL, scale=scale, enable_gqa=gqa)
        outs.append(o_HQd.transpose(0, 1).to(q_THd.dtype))
    if not outs:
        return q_THd * 0  # keeps an empty batch connected to q for autograd
    return torch.cat(outs)


def _check_cu_seqlens(name: str, cu: torch.Tensor, device: torch.device) -> None:
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"flash_attention: {name} must be 1-D with B+1 >= 2 entries, "
                         f"got shape {tuple(cu.shape)}")
    if cu.dtype != torch.int32:
        raise ValueError(f"flash_attention: {name} must be int32, got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"flash_attention: {name} is on {cu.device}, q_THd on {device}")
    if not cu.is_contiguous():
        raise ValueError(f"flash_attention: {name} must be contiguous")


def _seq_lens(name: str, cu: torch.Tensor, total: int) -> list[int]:
    """Reads cu on the host (a GPU sync) and checks it."""
    vals = cu.tolist()
    if vals[0] != 0 or vals[-1] != total or any(b < a for a, b in itertools.pairwise(vals)):
        raise ValueError(f"flash_attention: {name} must rise from 0 to {total} without decreasing, "
                         f"got {vals}")
    return [b - a for a, b in itertools.pairwise(vals)]


def flash_attention(q_THd: torch.Tensor, k_SKd: torch.Tensor, v_SKd: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, scale: float,
                    causal: bool = True, chunk_size: int | None = None, window: int | None = None, *,
                    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None) -> torch.Tensor:
    """softmax(scale * q k^T + mask) v over packed sequences -> o (T, H, d), differentiable.

    q (T, H, d), k and v (S, K, d) with H a multiple of K (head h reads kv head h // (H // K));
    cu_seqlens_* int32 (B + 1,). Passing both max_seqlen_q and max_seqlen_k (the longest query
    and key run) trusts cu_seqlens as given and skips the checks that read them on the host,
    which would otherwise synchronise with the GPU on every call.
    """
    for name, t in (("q_THd", q_THd), ("k_SKd", k_SKd), ("v_SKd", v_SKd)):
        if t.dim() != 3:
            raise ValueError(f"flash_attention: {name} must be 3-D, got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"flash_attention: {name} dtype {t.dtype} is not fp16, bf16 or fp32")
        if t.dtype != q_THd.dtype:
            raise ValueError(f"flash_attention: {name} dtype {t.dtype} != q_THd dtype {q_THd.dtype}")
        if t.device != q_THd.device:
            raise ValueError(f"flash_attention: {name} is on {t.device}, q_THd on {q_THd.device}")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"flash_attention: {name} must have stride 1 in its last (head) dim, "
                             f"got strides {t.stride()}")
    T, H, d = q_THd.shape
    S, K, _ = k_SKd.shape
    if v_SKd.shape != k_SKd.shape:
        raise ValueError(f"flash_attention: v_SKd shape {tuple(v_SKd.shape)} != k_SKd shape "
                         f"{tuple(k_SKd.shape)}")
    if k_SKd.shape[2] != d:
        raise ValueError(f"flash_attention: k_SKd head dim {k_SKd.shape[2]} != q_THd head dim {d}")
    if K == 0 or H % K != 0:
        raise ValueError(f"flash_attention: q_THd has {H} heads, not a multiple of k_SKd's {K} kv heads")
    trusted = max_seqlen_q is not None and max_seqlen_k is not None
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q_THd.device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q_THd.device)
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(f"flash_attention: cu_seqlens_k has {cu_seqlens_k.numel()} entries, "
                         f"cu_seqlens_q {cu_seqlens_q.numel()}")
    if not trusted:
        lens_q = _seq_lens("cu_seqlens_q", cu_seqlens_q, T)
        lens_k = _seq_lens("cu_seqlens_k", cu_seqlens_k, S)
        short = [i for i, (lq, lk) in enumerate(zip(lens_q, lens_k)) if lk < lq]
        if short:
            i = short[0]
            raise ValueError(f"flash_attention: cu_seqlens_k gives sequence {i} {lens_k[i]} keys for "
                             f"{lens_q[i]} queries (keys must be >= queries)")
        max_seqlen_q, max_seqlen_k = max(lens_q), max(lens_k)
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"flash_attention: scale must be a finite number, got {scale!r}")
    for name, val in (("chunk_size", chunk_size), ("window", window)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
            raise ValueError(f"flash_attention: {name} must be None or an int >= 1, got {val!r}")

    causal = bool(causal)
    if T == 0 or not use_triton(q_THd, k_SKd, v_SKd, cu_seqlens_q, cu_seqlens_k):
        return flash_attention_reference(q_THd, k_SKd, v_SKd, cu_seqlens_q, cu_seqlens_k, scale, causal,
                                         chunk_size, window)
    if d > _MAX_TRITON_HEAD_DIM:
        raise ValueError(f"flash_attention: q_THd head dim {d} > {_MAX_TRITON_HEAD_DIM}, "
                         "the Triton kernel's limit")
    from kernels.flash_attention_triton import flash_attention_triton

    return flash_attention_triton(q_THd, k_SKd, v_SKd, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                  int(max_seqlen_k), float(scale), causal, chunk_size, window)
