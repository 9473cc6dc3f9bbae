"""CUDA graphs for the decode step where the Triton kernels run: a step of one-token decodes
replays a graph captured once per padded batch size, one launch instead of hundreds from Python.

The captured forward reads only static tensors (token ids, positions, KV slots, block tables,
context lengths), filled before each replay. Rows past the real batch are padding: token 0 at
position 0, its k/v written to the pad block (which no block table names), context length 0 (the
paged decode kernel gives such rows zeros without reading the cache). Nothing in the forward may
read a value back to the host or build a tensor from Python data; the kernels of kernels/ are
written so (their shapes alone decide every launch).

Without CUDA (Triton's interpreter, in tests) there is nothing to capture: the same buffers and
forward run eagerly at the padded size, so all but the capture itself is checked on a CPU.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from kernels.paged_attention import paged_decode_attention
from models.llama4.attention import AttentionContext
from models.llama4.model import Llama4Model
from serving.engine.paged_attention import SeqSlice

log = logging.getLogger(__name__)

# vLLM-like padding: small batches exactly, then every 16 (decode reads the weights once per step,
# so a few padded rows cost little next to a graph per size).
BATCH_SIZES = (1, 2, 4, 8, *range(16, 257, 16))


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Captured sizes: the standard ones up to max_num_seqs (at most 256), and that bound itself."""
    cap = min(max_num_seqs, BATCH_SIZES[-1])
    sizes = [b for b in BATCH_SIZES if b < cap]
    return sizes + [cap]


class StaticDecodeAttention(AttentionContext):
    """Decode attention over fixed tensors: row b writes its k/v at slots_B[b] and attends over
    block_tables_BM[b]'s first context_lens_B[b] tokens."""

    def __init__(self, k_caches, v_caches, slots_B, block_tables_BM, context_lens_B) -> None:
        self.k_caches, self.v_caches = k_caches, v_caches
        self.slots_B, self.block_tables_BM, self.context_lens_B = slots_B, block_tables_BM, context_lens_B

    def attend(self, layer, q_BHd, k_BKd, v_BKd, chunk_size, scale):
        K, d = k_BKd.shape[1:]
        kc, vc = self.k_caches[layer], self.v_caches[layer]
        kc.view(-1, K, d)[self.slots_B] = k_BKd
        vc.view(-1, K, d)[self.slots_B] = v_BKd
        return paged_decode_attention(q_BHd, kc, vc, self.block_tables_BM, self.context_lens_B, scale,
                                      chunk_size=chunk_size)


class DecodeGraphs:
    """Call with a step of decodes (at most max_batch of them) -> their final hidden states."""

    def __init__(self, model: Llama4Model, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                 block_size: int, max_model_len: int, max_num_seqs: int, pad_block: int) -> None:
        self.model, self.k_caches, self.v_caches = model, k_caches, v_caches
        self.block_size = block_size
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.max_batch = self.sizes[-1]
        self.device = k_caches[0].device
        B, M = self.max_batch, -(-max_model_len // block_size)
        self.pad_slot = pad_block * block_size
        self.ids_B = torch.zeros(B, dtype=torch.long, device=self.device)
        self.positions_B = torch.zeros(B, dtype=torch.long, device=self.device)
        self.slots_B = torch.full((B,), self.pad_slot, dtype=torch.long, device=self.device)
        self.block_tables_BM = torch.full((B, M), -1, dtype=torch.int32, device=self.device)
        self.context_lens_B = torch.zeros(B, dtype=torch.int32, device=self.device)
        self.outputs: dict[int, torch.Tensor] = {}  # padded size -> its hidden states (B, D)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.replays = self.padded_rows = 0

    def _forward(self, b: int) -> torch.Tensor:
        attn = StaticDecodeAttention(self.k_caches, self.v_caches, self.slots_B[:b], self.block_tables_BM[:b],
                                     self.context_lens_B[:b])
        return self.model(self.ids_B[:b], self.positions_B[:b], attn)

    @torch.inference_mode()
    def capture(self) -> None:
        """One graph per size, largest first so the smaller ones fit in its memory pool. Every row
        is padding while capturing: nothing real is read or written."""
        if self.device.type != "cuda":
            return
        pool = None
        for b in reversed(self.sizes):
            self._forward(b)  # eager first: Triton compiles its kernels, lazy state settles
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[b] = self._forward(b)
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize(self.device)
        log.info("captured CUDA graphs of the decode step for batch sizes %s", self.sizes)

    def fits(self, slices: list[SeqSlice]) -> bool:
        return 0 < len(slices) <= self.max_batch

    @torch.inference_mode()
    def __call__(self, ids: list[int], positions: list[int], slices: list[SeqSlice]) -> torch.Tensor:
        n = len(ids)
        b = next(s for s in self.sizes if s >= n)
        bs = self.block_size
        pad = b - n
        slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(slices, positions)]
        self._fill(self.ids_B, ids + [0] * pad)
        self._fill(self.positions_B, positions + [0] * pad)
        self._fill(self.slots_B, slots + [self.pad_slot] * pad)
        self._fill(self.context_lens_B, [s.context_len for s in slices] + [0] * pad)
        # Only the columns this batch uses: the kernel never reads past a row's context.
        width = max(-(-s.context_len // bs) for s in slices)
        table = np.full((n, width), -1, dtype=np.int32)
        for row, s in enumerate(slices):
            used = s.block_table[:width]
            table[row, :len(used)] = used
        self.block_tables_BM[:n, :width].copy_(torch.from_numpy(table))
        self.replays += 1
        self.padded_rows += pad
        if b in self.graphs:
            self.graphs[b].replay()
            return self.outputs[b][:n]
        return self._forward(b)[:n]

    @staticmethod
    def _fill(dst: torch.Tensor, values: list[int]) -> None:
        dst[:len(values)].copy_(torch.tensor(values, dtype=dst.dtype))
