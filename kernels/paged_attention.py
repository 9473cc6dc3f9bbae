"""Decode attention over the paged KV cache: one query per sequence against its cached keys.

The cache of one layer is (num_blocks, block_size S, K kv heads, d); token p of sequence b lives in
block block_tables[b, p // S] at offset p % S (serving/engine/paged_attention.py writes it so).
context_lens counts the cached tokens including the query's own, so the query sits at position
context_len - 1 and sees keys 0..pos, or on a chunked-local layer only those in its own chunk.
Table entries the query never sees may be -1 and are never read. A context_len of 0 (a padding
row of a fixed-size batch) sees nothing and gets zeros.
"""

from __future__ import annotations

import math

import torch

from kernels.dispatch import use_triton

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def temperature_scale(positions: torch.Tensor, temperature: tuple[float, float]) -> torch.Tensor:
    """Llama 4's NoPE query scale at each absolute position, in fp32 (see Attention.forward)."""
    floor_scale, attn_scale = temperature
    return torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0


def paged_decode_attention_reference(q_BHd: torch.Tensor, k_cache_NSKd: torch.Tensor, v_cache_NSKd: torch.Tensor,
                                     block_tables_BM: torch.Tensor, context_lens_B: torch.Tensor, scale: float,
                                     chunk_size: int | None = None,
                                     temperature: tuple[float, float] | None = None) -> torch.Tensor:
    # One sequence at a time: gather exactly the visible keys, so no table entry outside them is touched.
    H, d = q_BHd.shape[1:]
    S, K = k_cache_NSKd.shape[1], k_cache_NSKd.shape[2]
    o_BHd = torch.zeros_like(q_BHd)
    for b, ctx in enumerate(context_lens_B.tolist()):
        if ctx == 0:
            continue
        pos = ctx - 1
        lo = pos // chunk_size * chunk_size if chunk_size is not None else 0
        key_pos_L = torch.arange(lo, ctx, device=q_BHd.device)
        blocks_L = block_tables_BM[b].long()[key_pos_L // S]
        k_LKd = k_cache_NSKd[blocks_L, key_pos_L % S].float()
        v_LKd = v_cache_NSKd[blocks_L, key_pos_L % S].float()
        q_KGd = q_BHd[b].float().view(K, H // K, d)
        if temperature is not None:
            q_KGd = q_KGd * temperature_scale(torch.tensor(pos, device=q_BHd.device), temperature)
        s_KGL = torch.einsum("kgd,lkd->kgl", q_KGd, k_LKd) * scale
        o_KGd = torch.einsum("kgl,lkd->kgd", s_KGL.softmax(-1), v_LKd)
        o_BHd[b] = o_KGd.reshape(H, d).to(q_BHd.dtype)
    return o_BHd


def _check(q_BHd, k_cache_NSKd, v_cache_NSKd, block_tables_BM, context_lens_B, scale, chunk_size,
           temperature) -> None:
    def bad(arg: str, why: str) -> ValueError:
        return ValueError(f"paged_decode_attention: {arg} {why}")

    if q_BHd.dim() != 3:
        raise bad("q_BHd", f"must be (B, H, d), got shape {tuple(q_BHd.shape)}")
    if q_BHd.dtype not in DTYPES:
        raise bad("q_BHd", f"dtype {q_BHd.dtype} is not one of {DTYPES}")
    B, H, d = q_BHd.shape
    if k_cache_NSKd.dim() != 4:
        raise bad("k_cache_NSKd", f"must be (num_blocks, block_size, K, d), got shape {tuple(k_cache_NSKd.shape)}")
    N, S, K, dk = k_cache_NSKd.shape
    if dk != d:
        raise bad("k_cache_NSKd", f"head_dim {dk} != q_BHd's {d}")
    if K == 0 or H % K:
        raise bad("k_cache_NSKd", f"has {K} kv heads, which do not divide q_BHd's {H} heads")
    if k_cache_NSKd.dtype != q_BHd.dtype:
        raise bad("k_cache_NSKd", f"dtype {k_cache_NSKd.dtype} != q_BHd's {q_BHd.dtype}")
    if v_cache_NSKd.shape != k_cache_NSKd.shape:
        raise bad("v_cache_NSKd", f"shape {tuple(v_cache_NSKd.shape)} != k_cache_NSKd's {tuple(k_cache_NSKd.shape)}")
    if v_cache_NSKd.dtype != q_BHd.dtype:
        raise bad("v_cache_NSKd", f"dtype {v_cache_NSKd.dtype} != q_BHd's {q_BHd.dtype}")
    # Rows of head_dim are read as contiguous vectors; every other stride is passed to the kernel.
    for name, t in (("q_BHd", q_BHd), ("k_cache_NSKd", k_cache_NSKd), ("v_cache_NSKd", v_cache_NSKd)):
        if t.stride(-1) != 1:
            raise bad(name, f"must be contiguous in head_dim, got strides {t.stride()}")
    if block_tables_BM.dim() != 2 or block_tables_BM.shape[0] != B:
        raise bad("block_tables_BM", f"must be ({B}, max_blocks), got shape {tuple(block_tables_BM.shape)}")
    if block_tables_BM.dtype != torch.int32:
        raise bad("block_tables_BM", f"dtype {block_tables_BM.dtype} is not torch.int32")
    if context_lens_B.shape != (B,):
        raise bad("context_lens_B", f"must be ({B},), got shape {tuple(context_lens_B.shape)}")
    if context_lens_B.dtype != torch.int32:
        raise bad("context_lens_B", f"dtype {context_lens_B.dtype} is not torch.int32")
    for name, t in (("k_cache_NSKd", k_cache_NSKd), ("v_cache_NSKd", v_cache_NSKd),
                    ("block_tables_BM", block_tables_BM), ("context_lens_B", context_lens_B)):
        if t.device != q_BHd.device:
            raise bad(name, f"is on {t.device}, q_BHd on {q_BHd.device}")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise bad("scale", f"must be a finite number, got {scale!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise bad("chunk_size", f"must be None or a positive int, got {chunk_size!r}")
    if temperature is not None:
        if (not isinstance(temperature, (tuple, list)) or len(temperature) != 2
                or not all(isinstance(x, (int, float)) for x in temperature)):
            raise bad("temperature", f"must be (floor_scale, attn_scale), got {temperature!r}")
        if not temperature[0] > 0:
            raise bad("temperature", f"floor_scale must be > 0, got {temperature[0]!r}")
    if not q_BHd.is_cuda:
        _check_values(block_tables_BM, context_lens_B, N, S, chunk_size)


def _check_values(block_tables_BM, context_lens_B, N, S, chunk_size) -> None:
    """Lengths in range and every block the queries see inside the cache. Reading values back from
    a GPU would stall the stream once per layer, so this runs for host tensors only; on the GPU the
    kernel still never reads a table column past max_blocks nor a -1 entry."""
    M = block_tables_BM.shape[1]
    ctx_B = context_lens_B.long()
    if bool(((ctx_B < 0) | (ctx_B > M * S)).any()):
        raise ValueError(f"paged_decode_attention: context_lens_B {ctx_B.tolist()} must lie in "
                         f"0..{M * S} (max_blocks {M} x block_size {S})")
    pos_B = ctx_B - 1
    lo_B = torch.div(pos_B, chunk_size, rounding_mode="floor") * chunk_size if chunk_size else torch.zeros_like(pos_B)
    col_M = torch.arange(M)
    seen_BM = (col_M >= lo_B[:, None] // S) & (col_M <= pos_B[:, None] // S) & (ctx_B[:, None] > 0)
    ids = block_tables_BM[seen_BM]
    if bool(((ids < 0) | (ids >= N)).any()):
        raise ValueError(f"paged_decode_attention: block_tables_BM has ids outside 0..{N - 1} in blocks "
                         f"the queries attend to")


def paged_decode_attention(q_BHd: torch.Tensor, k_cache_NSKd: torch.Tensor, v_cache_NSKd: torch.Tensor,
                           block_tables_BM: torch.Tensor, context_lens_B: torch.Tensor, scale: float,
                           chunk_size: int | None = None,
                           temperature: tuple[float, float] | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for each sequence's one query over its visible cached keys.

    q_BHd: (B, H, d), head h reads kv head h // (H // K). block_tables_BM: int32 (B, max_blocks).
    context_lens_B: int32 (B,), cached tokens including the query's. chunk_size: the layer's local
    attention chunk (keys in the query's chunk only) or None. temperature: (floor_scale, attn_scale)
    on NoPE layers, the query is scaled by log(floor((pos + 1) / floor_scale) + 1) * attn_scale + 1.
    Returns (B, H, d) in q's dtype.
    """
    _check(q_BHd, k_cache_NSKd, v_cache_NSKd, block_tables_BM, context_lens_B, scale, chunk_size, temperature)
    if use_triton(q_BHd, k_cache_NSKd, v_cache_NSKd, block_tables_BM, context_lens_B):
        from kernels.paged_attention_triton import paged_decode_attention_triton

        return paged_decode_attention_triton(q_BHd, k_cache_NSKd, v_cache_NSKd, block_tables_BM, context_lens_B,
                                             float(scale), chunk_size, temperature)
    return paged_decode_attention_reference(q_BHd, k_cache_NSKd, v_cache_NSKd, block_tables_BM, context_lens_B,
                                            scale, chunk_size, temperature)
