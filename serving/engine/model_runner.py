"""Executes one scheduled step: owns the KV tensors, builds the flat batch, runs the model,
samples. Knows nothing of queues or policy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.llama4.model import Llama4Model
from serving.engine.outputs import PositionLogprobs
from serving.engine.paged_attention import PagedAttention, SeqSlice
from serving.engine.sampler import Sample, SampleRow, prompt_logprobs, sample
from serving.engine.scheduler import SchedulerOutput


@dataclass
class StepResult:
    samples: dict[int, Sample]  # seq_id -> the token sampled for it
    prompt_logprobs: dict[int, list[PositionLogprobs]]  # seq_id -> entries for this chunk


def kv_block_bytes(model: Llama4Model, block_size: int, dtype: torch.dtype) -> int:
    c = model.config
    return 2 * c.num_hidden_layers * block_size * c.num_key_value_heads * c.head_dim * dtype.itemsize


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros; on CPU from calloc (numpy), so pages are only backed once written and a large
    KV cache costs no start-up time or memory until used."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    same_size_int = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}[dtype.itemsize]
    return torch.from_numpy(np.zeros(shape, dtype=same_size_int)).view(dtype)


class ModelRunner:
    def __init__(self, model: Llama4Model, num_blocks: int, block_size: int,
                 stop_ids_for, decode_token=lambda t: None, compile: bool = False) -> None:
        self.model = model
        # torch.compile fuses what lies between attention calls (norms, RoPE, SwiGLU, dtype
        # casts) and drops most per-op dispatch; attention itself stays eager (a graph break).
        self.forward = model.forward
        if compile:
            # Layer indices are ints on modules; left specialised, each layer would be its own
            # graph (and past 8, eager again).
            torch._dynamo.config.allow_unspec_int_on_nn_module = True
            self.forward = torch.compile(model.forward, dynamic=True)
        self.block_size = block_size
        self.num_blocks = num_blocks
        c = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        # One extra block pads gathers. Every slot must hold a finite value: attention reads
        # whole blocks and masks the unwritten tail, and 0 * NaN would still be NaN.
        shape = (num_blocks + 1, block_size, c.num_key_value_heads, c.head_dim)
        self.k_caches = [_zeros(shape, self.dtype, self.device) for _ in range(c.num_hidden_layers)]
        self.v_caches = [_zeros(shape, self.dtype, self.device) for _ in range(c.num_hidden_layers)]
        self.pad_block = num_blocks
        self.stop_ids_for = stop_ids_for  # seq -> ids that may not be sampled yet (min_tokens)
        self.decode_token = decode_token

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> StepResult:
        ids: list[int] = []
        positions: list[int] = []
        slices: list[SeqSlice] = []
        for item in sched.scheduled:
            seq = item.seq
            end = item.start + item.num_tokens
            slices.append(SeqSlice(len(ids), item.num_tokens, end, seq.blocks))
            ids.extend(seq.token_ids[item.start:end])
            positions.extend(range(item.start, end))
        dev = self.device
        positions_T = torch.tensor(positions, device=dev)
        attn = PagedAttention(self.k_caches, self.v_caches, self.block_size, slices, positions_T,
                              self.pad_block)
        hidden_TD = self.forward(torch.tensor(ids, device=dev), positions_T, attn)

        sampling = [(i, s) for i, s in enumerate(sched.scheduled) if s.samples]
        samples: dict[int, Sample] = {}
        if sampling:
            rows = torch.tensor([slices[i].q_start + slices[i].q_len - 1 for i, _ in sampling], device=dev)
            logits = self.model.compute_logits(hidden_TD[rows])
            sample_rows = [SampleRow(s.seq.request.params, s.seq.request.prompt_token_ids, s.seq.output_ids,
                                     self.stop_ids_for(s.seq), s.seq.generator) for _, s in sampling]
            for (_, s), out in zip(sampling, sample(logits, sample_rows, self.decode_token)):
                samples[s.seq.seq_id] = out
        return StepResult(samples, self._prompt_logprobs(sched, slices, hidden_TD))

    def _prompt_logprobs(self, sched, slices, hidden_TD) -> dict[int, list[PositionLogprobs]]:
        out = {}
        for item, sl in zip(sched.scheduled, slices):
            seq = item.seq
            req = seq.request
            if seq.index != 0 or not req.wants_prompt_logprobs:
                continue
            # Row p predicts token p + 1; keep the rows whose target is still in the prompt.
            first = len(req.prompt_logprobs) - 1
            last = min(item.start + item.num_tokens, seq.num_prompt_tokens - 1)
            if last <= first or first < item.start:
                continue
            rows = slice(sl.q_start + first - item.start, sl.q_start + last - item.start)
            logits = self.model.compute_logits(hidden_TD[rows])
            targets = seq.token_ids[first + 1:last + 1]
            out[seq.seq_id] = prompt_logprobs(logits, targets, req.params.prompt_logprobs, self.decode_token)
        return out
