"""Attention over the paged KV cache: the engine's AttentionContext (CPU/PyTorch path).

Each layer's cache is (num_blocks, block_size, K, d); token p of a sequence lives in slot
block_table[p // block_size] * block_size + p % block_size. Everything that does not depend
on the layer (slots, gather indices, masks) is built once per step and shared by all layers.
Decodes (one query each) attend in one padded batch; prefill chunks attend one by one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.llama4.attention import AttentionContext, attend_dense


@dataclass
class SeqSlice:
    q_start: int  # row of its first token in the flat batch
    q_len: int
    context_len: int  # tokens in the cache after this step's are written
    block_table: list[int]


class PagedAttention(AttentionContext):
    def __init__(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], block_size: int,
                 seqs: list[SeqSlice], positions_T: torch.Tensor, pad_block: int) -> None:
        self.k_caches, self.v_caches = k_caches, v_caches
        self.seqs = seqs
        self.positions = positions_T
        dev = positions_T.device
        bs = block_size

        def slots(table: list[int], n: int) -> torch.Tensor:
            pos = torch.arange(n, device=dev)
            return torch.tensor(table, dtype=torch.long, device=dev)[pos // bs] * bs + pos % bs

        self.slot_mapping = torch.cat([slots(s.block_table, s.context_len)[s.context_len - s.q_len:]
                                       for s in seqs])
        self.decodes = [s for s in seqs if s.q_len == 1]
        self.prefills = [(s, slots(s.block_table, s.context_len)) for s in seqs if s.q_len > 1]
        self._masks: dict[int | None, torch.Tensor] = {}
        if self.decodes:
            lens = torch.tensor([s.context_len for s in self.decodes], device=dev)
            L = int(lens.max())
            self.decode_rows = torch.tensor([s.q_start for s in self.decodes], device=dev)
            # Padding reads the all-zero pad block (finite values, masked out anyway).
            self.decode_slots = torch.stack([F.pad(slots(s.block_table, s.context_len),
                                                   (0, L - s.context_len), value=pad_block * bs)
                                             for s in self.decodes])
            self.decode_k_pos = torch.arange(L, device=dev)
            self.decode_valid = self.decode_k_pos[None, :] < lens[:, None]  # (B, L)

    def _decode_mask(self, chunk_size: int | None) -> torch.Tensor | None:
        if chunk_size not in self._masks:
            q_pos = self.positions[self.decode_rows]
            mask = self.decode_valid & (self.decode_k_pos[None, :] <= q_pos[:, None])
            if chunk_size is not None:
                mask &= (self.decode_k_pos[None, :] // chunk_size) == (q_pos[:, None] // chunk_size)
            self._masks[chunk_size] = None if bool(mask.all()) else mask[:, None, None, :]
        return self._masks[chunk_size]

    def attend(self, layer, q_THd, k_TKd, v_TKd, chunk_size, scale):
        kc = self.k_caches[layer].view(-1, *k_TKd.shape[1:])
        vc = self.v_caches[layer].view(-1, *v_TKd.shape[1:])
        kc[self.slot_mapping] = k_TKd
        vc[self.slot_mapping] = v_TKd
        if len(self.seqs) == 1 and self.prefills:  # one prompt: write, then attend in place
            s, slot = self.prefills[0]
            return attend_dense(q_THd, kc[slot], vc[slot], self.positions,
                                torch.arange(s.context_len, device=q_THd.device), chunk_size, scale)
        out = torch.empty_like(q_THd)
        if self.decodes:
            q_BH1d = q_THd[self.decode_rows][:, :, None, :]
            k_BKLd = kc[self.decode_slots].transpose(1, 2)
            v_BKLd = vc[self.decode_slots].transpose(1, 2)
            o = F.scaled_dot_product_attention(q_BH1d, k_BKLd, v_BKLd, attn_mask=self._decode_mask(chunk_size),
                                               scale=scale, enable_gqa=q_THd.shape[1] != k_TKd.shape[1])
            out[self.decode_rows] = o[:, :, 0, :]
        for s, slot in self.prefills:
            rows = slice(s.q_start, s.q_start + s.q_len)
            out[rows] = attend_dense(q_THd[rows], kc[slot], vc[slot], self.positions[rows],
                                     torch.arange(s.context_len, device=q_THd.device), chunk_size, scale)
        return out

