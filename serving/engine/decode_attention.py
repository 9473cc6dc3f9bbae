"""Decode attention over the paged KV cache: one query per sequence, many sequences per step.

Sequences are attended in groups. Those that begin with the same cached blocks (a shared system
prompt, agent instructions) form a cascade group: the shared prefix is read once for the whole
group and merged with each sequence's own tail by log-sum-exp. The rest share one padded SDPA
over their gathered blocks. Either way the GQA group of query heads that share a KV head is
folded into the query axis (head h = kv * G + g), so each KV row is read once, not G times.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from models.llama4.attention import AttentionContext

if TYPE_CHECKING:
    from serving.engine.paged_attention import SeqSlice

CASCADE_MIN_TOKENS = 128  # a shared prefix shorter than this is not worth a second pass


def shared_prefix_blocks(seqs: list[SeqSlice], block_size: int) -> int:
    """Leading blocks every sequence shares, leaving each at least its newest token's block."""
    if len(seqs) < 2:
        return 0
    first = seqs[0].block_table
    limit = min((s.context_len - 1) // block_size for s in seqs)
    n = 0
    while n < limit and all(s.block_table[n] == first[n] for s in seqs[1:]):
        n += 1
    return n


def store_kv(kc: torch.Tensor, vc: torch.Tensor, slots_T: torch.Tensor, k_TKd: torch.Tensor,
             v_TKd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Writes this step's k/v at their cache slots; returns them as the cache holds them (rounded to
    its dtype, in theirs), so that every attention sees the keys a later step will read back."""
    K, d = k_TKd.shape[1:]
    k_stored, v_stored = k_TKd.to(kc.dtype), v_TKd.to(vc.dtype)  # no copies when the dtypes agree
    kc.view(-1, K, d).index_copy_(0, slots_T, k_stored)
    vc.view(-1, K, d).index_copy_(0, slots_T, v_stored)
    return k_stored.to(k_TKd.dtype), v_stored.to(v_TKd.dtype)


def _softmax_attend(q, k, v, mask, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + mask) v and its log-sum-exp over the keys, batched on leading dims."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - m)
    total = p.sum(-1, keepdim=True)
    return torch.matmul(p, v) / total, m + total.log()


class DecodeGroup:
    def __init__(self, seqs: list[SeqSlice], shared: int, block_size: int, pad_block: int,
                 positions_T: torch.Tensor) -> None:
        dev = positions_T.device
        bs = block_size
        self.shared, self.block_size = shared, bs
        used = [-(-s.context_len // bs) for s in seqs]
        nb = max(used)
        self.rows = torch.tensor([s.q_start for s in seqs], device=dev)
        self.blocks = torch.tensor([s.block_table[:n] + [pad_block] * (nb - n) for s, n in zip(seqs, used)],
                                   dtype=torch.long, device=dev)
        self.shared_ids = self.blocks[0, :shared]
        lens = torch.tensor([s.context_len for s in seqs], device=dev)
        self.k_pos = torch.arange(nb * bs, device=dev)
        self.valid = self.k_pos[None, :] < lens[:, None]
        self.q_pos = positions_T[self.rows]
        self._masks: dict[tuple[int | None, torch.dtype], torch.Tensor] = {}

    def mask(self, chunk_size: int | None, dtype: torch.dtype) -> torch.Tensor:
        """Additive (B, 1, 1, L) mask, built once per step for all layers of a kind."""
        if (chunk_size, dtype) not in self._masks:
            keep = self.valid & (self.k_pos[None, :] <= self.q_pos[:, None])
            if chunk_size is not None:
                keep &= (self.k_pos[None, :] // chunk_size) == (self.q_pos[:, None] // chunk_size)
            mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))
            self._masks[chunk_size, dtype] = mask[:, None, None, :]
        return self._masks[chunk_size, dtype]

    def attend(self, q_THd, kc, vc, chunk_size, scale, out) -> None:
        q_BHd = q_THd[self.rows]
        if self.shared and chunk_size is None:
            out[self.rows] = self._cascade(q_BHd, kc, vc, scale)
            return
        B, H, d = q_BHd.shape
        K = kc.shape[2]
        k_BLKd = kc.index_select(0, self.blocks.flatten()).view(B, -1, K, d).to(q_BHd.dtype)
        v_BLKd = vc.index_select(0, self.blocks.flatten()).view(B, -1, K, d).to(q_BHd.dtype)
        o = F.scaled_dot_product_attention(q_BHd.view(B, K, -1, d), k_BLKd.transpose(1, 2),
                                           v_BLKd.transpose(1, 2), attn_mask=self.mask(chunk_size, q_THd.dtype),
                                           scale=scale)
        out[self.rows] = o.reshape(B, H, d)

    def _cascade(self, q_BHd, kc, vc, scale) -> torch.Tensor:
        """(shared prefix, own tail), both in float32, merged by log-sum-exp."""
        B, H, d = q_BHd.shape
        K = kc.shape[2]
        n = self.shared * self.block_size
        q_BKGd = q_BHd.view(B, K, H // K, d).float()
        # Prefix: the whole group's queries against one copy of the shared keys.
        k_KPd = kc.index_select(0, self.shared_ids).view(n, K, d).transpose(0, 1).float()
        v_KPd = vc.index_select(0, self.shared_ids).view(n, K, d).transpose(0, 1).float()
        o_pre, lse_pre = _softmax_attend(q_BKGd.transpose(0, 1).reshape(K, -1, d), k_KPd, v_KPd, None, scale)
        o_pre = o_pre.view(K, B, -1, d).transpose(0, 1)
        lse_pre = lse_pre.view(K, B, -1, 1).transpose(0, 1)
        # Tail: each sequence's own blocks, masked past its length.
        tail = self.blocks[:, self.shared:].flatten()
        k_BKTd = kc.index_select(0, tail).view(B, -1, K, d).transpose(1, 2).float()
        v_BKTd = vc.index_select(0, tail).view(B, -1, K, d).transpose(1, 2).float()
        o_own, lse_own = _softmax_attend(q_BKGd, k_BKTd, v_BKTd, self.mask(None, torch.float32)[..., n:], scale)
        lse = torch.logaddexp(lse_pre, lse_own)
        o = o_pre * torch.exp(lse_pre - lse) + o_own * torch.exp(lse_own - lse)
        return o.reshape(B, H, d).to(q_BHd.dtype)


def decode_groups(seqs: list[SeqSlice], block_size: int, pad_block: int,
                  positions_T: torch.Tensor) -> list[DecodeGroup]:
    """Cascade groups (same first block and a long enough shared prefix), then one plain group
    of the rest in the step's order (a step of plain decodes then maps row i to sequence i)."""
    by_first: dict[int, list[SeqSlice]] = defaultdict(list)
    for s in seqs:
        by_first[s.block_table[0]].append(s)
    groups, cascaded = [], set()
    for members in by_first.values():
        shared = shared_prefix_blocks(members, block_size)
        if shared * block_size >= CASCADE_MIN_TOKENS:
            groups.append(DecodeGroup(members, shared, block_size, pad_block, positions_T))
            cascaded.update(id(s) for s in members)
    plain = [s for s in seqs if id(s) not in cascaded]
    if plain:
        groups.append(DecodeGroup(plain, 0, block_size, pad_block, positions_T))
    return groups


class DecodeOnlyAttention(AttentionContext):
    """A step of decodes only, no cascade: everything per-step is a tensor built here, and
    attend() has no Python branching that varies between steps, so torch.compile traces the
    whole model forward into one graph (the batch-1 latency path: no per-op dispatch)."""

    def __init__(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], group: DecodeGroup,
                 slot_mapping: torch.Tensor, chunk_sizes: set[int | None], dtype: torch.dtype) -> None:
        self.k_caches, self.v_caches = k_caches, v_caches
        self.slot_mapping = slot_mapping
        self.blocks = group.blocks.flatten()
        self.masks = {c: group.mask(c, dtype) for c in chunk_sizes}
        # Batch size and context length vary every step: one compiled graph for all of them
        # (batch size 1 is still its own graph: torch specialises sizes 0 and 1).
        for t in (self.slot_mapping, self.blocks):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        for m in self.masks.values():
            torch._dynamo.maybe_mark_dynamic(m, 0)
            torch._dynamo.maybe_mark_dynamic(m, 3)

    def attend(self, layer, q_THd, k_TKd, v_TKd, chunk_size, scale):
        B, H, d = q_THd.shape
        K = k_TKd.shape[1]
        kc, vc = self.k_caches[layer], self.v_caches[layer]
        store_kv(kc, vc, self.slot_mapping, k_TKd, v_TKd)
        k_BLKd = kc.index_select(0, self.blocks).view(B, -1, K, d).to(q_THd.dtype)
        v_BLKd = vc.index_select(0, self.blocks).view(B, -1, K, d).to(q_THd.dtype)
        o = F.scaled_dot_product_attention(q_THd.reshape(B, K, H // K, d), k_BLKd.transpose(1, 2),
                                           v_BLKd.transpose(1, 2), attn_mask=self.masks[chunk_size], scale=scale)
        return o.reshape(B, H, d)
