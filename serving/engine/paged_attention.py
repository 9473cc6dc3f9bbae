"""Attention over the paged KV cache: the engine's AttentionContext (CPU/PyTorch path).

Each layer's cache is (num_blocks + 1, block_size, K, d); token p of a sequence lives in block
block_table[p // block_size] at offset p % block_size; the extra last block is all zeros and
pads gathers. What does not depend on the layer (slots, gather indices, masks) is built once
per step and shared by all layers. Three kinds of work, each batched its own way:
- decodes (one query each): grouped, see decode_attention.py (cascade over shared prefixes,
  one padded SDPA for the rest);
- fresh prefills (a prompt from position 0): one padded causal SDPA on this step's k/v, no
  gather (padding sits after each prompt, so causality already hides it);
- continued prefills (a chunk after cached tokens): one masked SDPA each over its gathered context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.llama4.attention import AttentionContext, attend_dense
from serving.engine.decode_attention import DecodeOnlyAttention, decode_groups, store_kv


@dataclass
class SeqSlice:
    q_start: int  # row of its first token in the flat batch
    q_len: int
    context_len: int  # tokens in the cache after this step's are written
    block_table: list[int]


def cache_slots(s: SeqSlice, start: int, block_size: int, device: torch.device) -> torch.Tensor:
    """Flat cache slots (block * block_size + offset) of the sequence's positions start..context_len-1."""
    pos = torch.arange(start, s.context_len, device=device)
    table = torch.tensor(s.block_table, dtype=torch.long, device=device)
    return table[pos // block_size] * block_size + pos % block_size


class PagedAttention(AttentionContext):
    def __init__(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], block_size: int,
                 seqs: list[SeqSlice], positions_T: torch.Tensor, pad_block: int) -> None:
        self.k_caches, self.v_caches = k_caches, v_caches
        self.positions = positions_T
        dev = positions_T.device
        bs = block_size
        self.block_size = block_size

        def slots(s: SeqSlice, start: int) -> torch.Tensor:
            return cache_slots(s, start, bs, dev)

        self.slot_mapping = torch.cat([slots(s, s.context_len - s.q_len) for s in seqs])
        decodes = [s for s in seqs if s.q_len == 1 and s.context_len > 1]
        self.fresh = [s for s in seqs if s.q_len == s.context_len]
        self.continued = [(s, slots(s, 0)) for s in seqs if s.q_len < s.context_len and s.q_len > 1]
        self.decode_groups = decode_groups(decodes, bs, pad_block, positions_T) if decodes else []
        if len(self.fresh) > 1:
            longest = max(s.q_len for s in self.fresh)
            offsets = torch.arange(longest, device=dev)
            starts = torch.tensor([s.q_start for s in self.fresh], device=dev)
            lens = torch.tensor([s.q_len for s in self.fresh], device=dev)
            self.fresh_valid = offsets[None, :] < lens[:, None]  # (F, longest)
            # Padding rows read row 0 of the batch: finite, and causally after every real key.
            self.fresh_index = torch.where(self.fresh_valid, starts[:, None] + offsets[None, :], 0)
            self.fresh_rows = self.fresh_index[self.fresh_valid]
            self.fresh_longest = longest

    def decode_only(self, chunk_sizes: set[int | None], dtype: torch.dtype) -> DecodeOnlyAttention | None:
        """The same step as a DecodeOnlyAttention when it is one plain group of decodes."""
        groups = self.decode_groups
        if self.fresh or self.continued or len(groups) != 1 or groups[0].shared:
            return None
        return DecodeOnlyAttention(self.k_caches, self.v_caches, groups[0], self.slot_mapping, chunk_sizes, dtype)

    @torch.compiler.disable  # eager under a compiled model: its Python bookkeeping varies per step
    def attend(self, layer, q_THd, k_TKd, v_TKd, chunk_size, scale):
        K, d = k_TKd.shape[1:]
        kc, vc = self.k_caches[layer], self.v_caches[layer]
        k_TKd, v_TKd = store_kv(kc, vc, self.slot_mapping, k_TKd, v_TKd)
        out = torch.empty_like(q_THd)
        gqa = q_THd.shape[1] != K
        for group in self.decode_groups:
            group.attend(q_THd, kc, vc, chunk_size, scale, out)
        if len(self.fresh) > 1 and (chunk_size is None or chunk_size >= self.fresh_longest):
            idx = self.fresh_index
            o = F.scaled_dot_product_attention(q_THd[idx].transpose(1, 2), k_TKd[idx].transpose(1, 2),
                                               v_TKd[idx].transpose(1, 2), is_causal=True, scale=scale,
                                               enable_gqa=gqa)
            out[self.fresh_rows] = o.transpose(1, 2)[self.fresh_valid]
        else:
            for s in self.fresh:
                rows = slice(s.q_start, s.q_start + s.q_len)
                out[rows] = attend_dense(q_THd[rows], k_TKd[rows], v_TKd[rows], self.positions[rows],
                                         self.positions[rows], chunk_size, scale)
        for s, slot in self.continued:
            rows = slice(s.q_start, s.q_start + s.q_len)
            out[rows] = attend_dense(q_THd[rows], kc.view(-1, K, d)[slot].to(q_THd.dtype),
                                     vc.view(-1, K, d)[slot].to(q_THd.dtype),
                                     self.positions[rows], torch.arange(s.context_len, device=q_THd.device),
                                     chunk_size, scale)
        return out
