"""The attention interface the model calls, and its dense (non-paged) implementation.

The model never sees how K/V are stored: each attention layer hands its new q, k, v (one row
per token of the flat batch) to an `AttentionContext`, which stores k/v where it keeps them
and returns the attention output. Visibility is decided by absolute positions: a key at
position j is visible to a query at position i iff j <= i and, on chunked-local layers,
j // chunk == i // chunk. The engine's paged KV cache is another AttentionContext.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from kernels.dispatch import use_triton


class AttentionContext(ABC):
    """How the tokens of one forward pass attend: their sequences and their past K/V."""

    @abstractmethod
    def attend(self, layer: int, q_THd: torch.Tensor, k_TKd: torch.Tensor, v_TKd: torch.Tensor,
               chunk_size: int | None, scale: float) -> torch.Tensor:
        """q (T, H, d), k and v (T, K, d) for this step's tokens -> output (T, H, d)."""


def visibility_mask(q_pos_Q: torch.Tensor, k_pos_L: torch.Tensor, chunk_size: int | None):
    """Boolean (Q, L): True where the key is visible to the query."""
    mask = k_pos_L[None, :] <= q_pos_Q[:, None]
    if chunk_size is not None:
        mask &= (k_pos_L[None, :] // chunk_size) == (q_pos_Q[:, None] // chunk_size)
    return mask


def _sdpa(q_QHd, k_LKd, v_LKd, scale, mask=None, causal=False):
    out_HQd = F.scaled_dot_product_attention(
        q_QHd.transpose(-3, -2), k_LKd.transpose(-3, -2), v_LKd.transpose(-3, -2), attn_mask=mask,
        is_causal=causal, scale=scale, enable_gqa=q_QHd.shape[-2] != k_LKd.shape[-2])
    return out_HQd.transpose(-3, -2)


def _attend_from_zero(q_QHd, k_QKd, v_QKd, chunk_size, scale):
    """A whole prompt from position 0: causal, and for chunked layers causal inside each chunk,
    without building a mask (the fused causal kernels are much faster than a masked one)."""
    Q = q_QHd.shape[0]
    if chunk_size is None or chunk_size >= Q:
        return _sdpa(q_QHd, k_QKd, v_QKd, scale, causal=True)
    full = Q // chunk_size * chunk_size
    out = torch.empty_like(q_QHd)

    def per_chunk(t):
        return t[:full].unflatten(0, (-1, chunk_size))

    out[:full] = _sdpa(per_chunk(q_QHd), per_chunk(k_QKd), per_chunk(v_QKd), scale, causal=True).flatten(0, 1)
    if full < Q:
        out[full:] = _sdpa(q_QHd[full:], k_QKd[full:], v_QKd[full:], scale, causal=True)
    return out


def attend_dense(q_QHd, k_LKd, v_LKd, q_pos_Q, k_pos_L, chunk_size, scale):
    """Attention of Q queries over L keys of one sequence, masked by positions."""
    Q, L = q_QHd.shape[0], k_LKd.shape[0]
    # Positions inside one sequence's chunk are consecutive, so these three facts mean 0..Q-1.
    if Q == L and int(q_pos_Q[0]) == 0 and int(k_pos_L[0]) == 0 and int(q_pos_Q[-1]) == Q - 1:
        return _attend_from_zero(q_QHd, k_LKd, v_LKd, chunk_size, scale)
    mask = visibility_mask(q_pos_Q, k_pos_L, chunk_size)
    if bool(mask.all()):  # e.g. one decode token over a global layer: skip the mask
        mask = None
    return _sdpa(q_QHd, k_LKd, v_LKd, scale, mask)


class KVCache:
    """Contiguous K/V of one sequence for every layer; slot = absolute position."""

    def __init__(self, num_layers: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        shape = (num_layers, max_len, num_kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def write(self, layer: int, positions_T: torch.Tensor, k_TKd, v_TKd) -> int:
        """Stores this step's k/v; returns the cache length that is now valid."""
        end = int(positions_T.max()) + 1
        if end > self.max_len:
            raise ValueError(f"position {end - 1} is past the KV cache length {self.max_len}")
        self.k[layer, positions_T] = k_TKd
        self.v[layer, positions_T] = v_TKd
        return end


class DenseAttention(AttentionContext):
    """A flat batch of whole sequences laid end to end, each with an optional KVCache.

    Without caches this is plain (packed) causal attention, e.g. a prefill or a training
    step whose documents are the sequences (each at positions 0..n-1); where the Triton kernels
    run, that is one varlen flash-attention launch for the whole batch. With caches, each
    sequence's new tokens attend to everything stored for it so far.
    """

    def __init__(self, seq_lens: list[int], positions_T: torch.Tensor,
                 caches: list[KVCache] | None = None) -> None:
        if sum(seq_lens) != positions_T.shape[0]:
            raise ValueError(f"seq_lens sum to {sum(seq_lens)} but there are "
                             f"{positions_T.shape[0]} positions")
        if caches is not None and len(caches) != len(seq_lens):
            raise ValueError(f"{len(caches)} caches for {len(seq_lens)} sequences")
        self.seq_lens = seq_lens
        self.positions = positions_T
        self.caches = caches

    def attend(self, layer, q_THd, k_TKd, v_TKd, chunk_size, scale):
        if self.caches is None and use_triton(q_THd):
            from kernels.flash_attention import flash_attention

            cu = torch.tensor([0, *torch.tensor(self.seq_lens).cumsum(0).tolist()], dtype=torch.int32,
                              device=q_THd.device)
            longest = max(self.seq_lens)
            return flash_attention(q_THd, k_TKd, v_TKd, cu, cu, scale, causal=True, chunk_size=chunk_size,
                                   max_seqlen_q=longest, max_seqlen_k=longest)
        if len(self.seq_lens) == 1 and self.caches is None:
            pos = self.positions
            return attend_dense(q_THd, k_TKd, v_TKd, pos, pos, chunk_size, scale)
        out = torch.empty_like(q_THd)
        start = 0
        for s, n in enumerate(self.seq_lens):
            sl = slice(start, start + n)
            start += n
            q_pos = self.positions[sl]
            if self.caches is None:
                k, v, k_pos = k_TKd[sl], v_TKd[sl], q_pos
            else:
                cache = self.caches[s]
                end = cache.write(layer, q_pos, k_TKd[sl], v_TKd[sl])
                k, v = cache.k[layer, :end], cache.v[layer, :end]
                k_pos = torch.arange(end, device=q_pos.device)
            out[sl] = attend_dense(q_THd[sl], k, v, q_pos, k_pos, chunk_size, scale)
        return out
