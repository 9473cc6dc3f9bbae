"""Attention over the paged KV cache through kernels/ (Triton on CUDA): the engine's
AttentionContext where the kernels run.

Two launches per layer whatever the mix: every one-token sequence goes to the paged decode
kernel, which reads K/V straight from the blocks; every prefill chunk goes to one varlen flash
attention launch, its context (cached tokens + this chunk) gathered from the cache first.
"""

from __future__ import annotations

import torch

from kernels.flash_attention import flash_attention
from kernels.paged_attention import paged_decode_attention
from models.llama4.attention import AttentionContext
from serving.engine.paged_attention import SeqSlice, cache_slots


def _cu_seqlens(lens: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


class KernelPagedAttention(AttentionContext):
    def __init__(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], block_size: int,
                 seqs: list[SeqSlice], positions_T: torch.Tensor) -> None:
        dev = positions_T.device
        self.k_caches, self.v_caches = k_caches, v_caches
        self.slot_mapping = torch.cat([cache_slots(s, s.context_len - s.q_len, block_size, dev) for s in seqs])
        decodes = [s for s in seqs if s.q_len == 1]
        prefills = [s for s in seqs if s.q_len > 1]
        self.decode_rows = torch.tensor([s.q_start for s in decodes], dtype=torch.long, device=dev)
        if decodes:
            width = max(len(s.block_table) for s in decodes)
            tables = [s.block_table + [-1] * (width - len(s.block_table)) for s in decodes]
            self.block_tables = torch.tensor(tables, dtype=torch.int32, device=dev)
            self.context_lens = torch.tensor([s.context_len for s in decodes], dtype=torch.int32, device=dev)
        self.prefill_rows = torch.cat([torch.arange(s.q_start, s.q_start + s.q_len, device=dev)
                                       for s in prefills]) if prefills else None
        if prefills:
            self.context_slots = torch.cat([cache_slots(s, 0, block_size, dev) for s in prefills])
            self.cu_q = _cu_seqlens([s.q_len for s in prefills], dev)
            self.cu_k = _cu_seqlens([s.context_len for s in prefills], dev)
            self.max_q = max(s.q_len for s in prefills)  # known here: the kernel needn't read cu_* back
            self.max_k = max(s.context_len for s in prefills)

    @torch.compiler.disable
    def attend(self, layer, q_THd, k_TKd, v_TKd, chunk_size, scale):
        K, d = k_TKd.shape[1:]
        kc, vc = self.k_caches[layer], self.v_caches[layer]
        kc.view(-1, K, d)[self.slot_mapping] = k_TKd
        vc.view(-1, K, d)[self.slot_mapping] = v_TKd
        out = torch.empty_like(q_THd)
        if self.decode_rows.numel():
            out[self.decode_rows] = paged_decode_attention(
                q_THd[self.decode_rows], kc, vc, self.block_tables, self.context_lens, scale, chunk_size=chunk_size)
        if self.prefill_rows is not None:
            k_ctx = kc.view(-1, K, d)[self.context_slots]
            v_ctx = vc.view(-1, K, d)[self.context_slots]
            out[self.prefill_rows] = flash_attention(q_THd[self.prefill_rows], k_ctx, v_ctx, self.cu_q, self.cu_k,
                                                     scale, causal=True, chunk_size=chunk_size,
                                                     max_seqlen_q=self.max_q, max_seqlen_k=self.max_k)
        return out
