"""Executes one scheduled step: owns the KV tensors, builds the flat batch, runs the model,
samples. Knows nothing of queues or policy."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from kernels.dispatch import use_triton
from models.llama4.model import Llama4Model
from serving.engine.cuda_graphs import DecodeGraphs
from serving.engine.native_decode import NativeDecode, shares_prefix, unsupported_reason
from serving.engine.outputs import PositionLogprobs
from serving.engine.paged_attention import PagedAttention, SeqSlice
from serving.engine.sampler import Sample, SampleRow, prompt_logprobs, sample
from serving.engine.scheduler import SchedulerOutput

log = logging.getLogger(__name__)


@dataclass
class StepInputs:
    """What every rank needs to run a step: the flat batch and which rows become logits."""
    ids: list[int]
    positions: list[int]
    slices: list[SeqSlice]
    logit_rows: list[int]  # the sampled rows (in scheduled order), then prompt-logprob rows


@dataclass
class StepResult:
    samples: dict[int, Sample]  # seq_id -> the token sampled for it
    prompt_logprobs: dict[int, list[PositionLogprobs]]  # seq_id -> entries for this chunk


def kv_heads(model: Llama4Model) -> int:
    """KV heads this process stores: all of them, or a tensor-parallel rank's share."""
    return model.layers[0].self_attn.n_kv


def kv_cache_dtype(model: Llama4Model, setting: str = "auto") -> torch.dtype:
    """What the KV cache holds: the model's activation dtype ("auto"), or the one named
    (config.KV_CACHE_DTYPES)."""
    return model.embed_tokens.weight.dtype if setting == "auto" else getattr(torch, setting)


def kv_block_bytes(model: Llama4Model, block_size: int, dtype: torch.dtype) -> int:
    c = model.config
    return 2 * c.num_hidden_layers * block_size * kv_heads(model) * c.head_dim * dtype.itemsize


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros; on CPU from calloc (numpy), so pages are only backed once written and a large
    KV cache costs no start-up time or memory until used."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    same_size_int = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}[dtype.itemsize]
    return torch.from_numpy(np.zeros(shape, dtype=same_size_int)).view(dtype)


class ModelRunner:
    def __init__(self, model: Llama4Model, num_blocks: int, block_size: int,
                 stop_ids_for, decode_token=lambda t: None, compile: bool = False,
                 native_decode: bool = True, max_model_len: int | None = None, max_num_seqs: int = 256,
                 kv_cache_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.chunk_sizes = {layer.self_attn.chunk_size for layer in model.layers}
        self.block_size = block_size
        self.num_blocks = num_blocks
        c = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        # One extra block pads gathers. Every slot must hold a finite value: attention reads
        # whole blocks and masks the unwritten tail, and 0 * NaN would still be NaN.
        shape = (num_blocks + 1, block_size, kv_heads(model), c.head_dim)
        kv_dtype = kv_cache_dtype or self.dtype
        if kv_dtype != self.dtype and use_triton(model.embed_tokens.weight):
            raise ValueError(f"kv_cache_dtype: the Triton kernels read the KV cache in the model's dtype "
                             f"({self.dtype}), not {kv_dtype}")
        self.k_caches = [_zeros(shape, kv_dtype, self.device) for _ in range(c.num_hidden_layers)]
        self.v_caches = [_zeros(shape, kv_dtype, self.device) for _ in range(c.num_hidden_layers)]
        self.pad_block = num_blocks
        # A compiled decode step. Where the Triton kernels run (CUDA): CUDA graphs of steps of
        # plain decodes (cuda_graphs.py), on one process (a tensor-parallel step's collectives would
        # have to be captured too). Elsewhere herd's C++ step where the model allows
        # (native_decode.py), else torch.compile over steps of plain decodes (DecodeOnlyAttention):
        # the whole forward is one graph. Steps with prefills stay eager: their attention
        # bookkeeping varies per step, and a graph break inside the layer loop would make dynamo
        # give up on the whole forward.
        self.decode_forward = model.forward
        self.native: NativeDecode | None = None
        self.graphs: DecodeGraphs | None = None
        if compile and use_triton(model.embed_tokens.weight):  # CUDA, or HERD_KERNELS=triton
            if dist.is_initialized() and dist.get_world_size() > 1:
                log.info("decode step: eager (CUDA graphs are not captured under tensor parallelism)")
            else:
                self.graphs = DecodeGraphs(model, self.k_caches, self.v_caches, block_size,
                                           max_model_len or num_blocks * block_size, max_num_seqs, self.pad_block)
        elif compile:
            reason = unsupported_reason(model) if native_decode else "native_decode is off"
            if reason is None:
                self.native = NativeDecode(model, self.k_caches, self.v_caches, block_size)
            else:
                log.info("decode step: torch.compile, not herd's C++ step (%s)", reason)
                self.decode_forward = torch.compile(model.forward, dynamic=True, fullgraph=True)
        self.stop_ids_for = stop_ids_for  # seq -> ids that may not be sampled yet (min_tokens)
        self.decode_token = decode_token

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compiles the decode graphs now rather than in the first requests (batch of 1, and
        of several), with decodes whose keys all live in the zero padding block; or captures the
        CUDA graphs."""
        if self.graphs is not None:
            self.graphs.capture()
            for cache in self.k_caches + self.v_caches:  # capturing wrote padding rows' k/v there
                cache[self.pad_block].zero_()
            return
        if self.decode_forward is self.model.forward:  # eager, or the C++ step (nothing to compile)
            return
        bs, pad = self.block_size, self.pad_block
        for batch in (1, 2):
            self.run_model(StepInputs([0] * batch, [bs] * batch, [SeqSlice(i, 1, bs + 1, [pad, pad])
                                                                  for i in range(batch)], []))
        for cache in self.k_caches + self.v_caches:  # the warm-up wrote its k/v there
            cache[pad].zero_()

    @staticmethod
    def prepare(sched: SchedulerOutput) -> StepInputs:
        ids: list[int] = []
        positions: list[int] = []
        slices: list[SeqSlice] = []
        rows: list[int] = []
        for item in sched.scheduled:
            seq = item.seq
            end = item.start + item.num_tokens
            slices.append(SeqSlice(len(ids), item.num_tokens, end, seq.blocks))
            ids.extend(seq.token_ids[item.start:end])
            positions.extend(range(item.start, end))
        for item, sl in zip(sched.scheduled, slices):
            if item.samples:
                rows.append(sl.q_start + sl.q_len - 1)
        for item, sl in zip(sched.scheduled, slices):
            span = _prompt_logprob_rows(item)
            if span is not None:
                rows.extend(range(sl.q_start + span[0] - item.start, sl.q_start + span[1] - item.start))
        return StepInputs(ids, positions, slices, rows)

    @torch.inference_mode()
    def run_model(self, step: StepInputs) -> torch.Tensor:
        """The forward pass over the step's tokens -> logits of step.logit_rows. Under tensor
        parallelism every rank runs this with the same step (it holds the collectives)."""
        dev = self.device
        # The Triton kernels of kernels/ (CUDA, or HERD_KERNELS=triton: interpreted in tests)?
        kernels = use_triton(self.model.embed_tokens.weight)
        decodes = all(s.q_len == 1 for s in step.slices)
        if (self.native is not None and decodes and not kernels
                and not shares_prefix(step.slices, self.block_size)):
            return self._logits(self.native(step.ids, step.slices), step.logit_rows)
        if self.graphs is not None and decodes and kernels and self.graphs.fits(step.slices):
            return self._logits(self.graphs(step.ids, step.positions, step.slices), step.logit_rows)
        positions_T = torch.tensor(step.positions, device=dev)
        if kernels:
            from serving.engine.kernel_attention import KernelPagedAttention

            attn, decode = KernelPagedAttention(self.k_caches, self.v_caches, self.block_size, step.slices,
                                                positions_T), None
        else:
            attn = PagedAttention(self.k_caches, self.v_caches, self.block_size, step.slices, positions_T,
                                  self.pad_block)
            decode = attn.decode_only(self.chunk_sizes, self.dtype)
        forward = self.model.forward if decode is None else self.decode_forward
        hidden_TD = forward(torch.tensor(step.ids, device=dev), positions_T, decode or attn)
        return self._logits(hidden_TD, step.logit_rows)

    def _logits(self, hidden_TD: torch.Tensor, rows: list[int]) -> torch.Tensor:
        if not rows:
            return hidden_TD.new_empty(0, self.model.config.vocab_size)
        if rows == list(range(hidden_TD.shape[0])):
            return self.model.compute_logits(hidden_TD)
        return self.model.compute_logits(hidden_TD[torch.tensor(rows, device=self.device)])

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> StepResult:
        step = self.prepare(sched)
        logits = self.run_model(step)
        sampling = [s for s in sched.scheduled if s.samples]
        samples: dict[int, Sample] = {}
        if sampling:
            sample_rows = [SampleRow(s.seq.request.params, s.seq.request.prompt_token_ids, s.seq.output_ids,
                                     self.stop_ids_for(s.seq), s.seq.generator, s.seq.matcher,
                                     s.seq.next_mask)
                           for s in sampling]
            for s, out in zip(sampling, sample(logits[:len(sampling)], sample_rows, self.decode_token)):
                samples[s.seq.seq_id] = out
        return StepResult(samples, self._prompt_logprobs(sched, logits[len(sampling):]))

    def _prompt_logprobs(self, sched, logits) -> dict[int, list[PositionLogprobs]]:
        out, at = {}, 0
        for item in sched.scheduled:
            span = _prompt_logprob_rows(item)
            if span is None:
                continue
            first, last = span
            seq = item.seq
            targets = seq.token_ids[first + 1:last + 1]
            out[seq.seq_id] = prompt_logprobs(logits[at:at + last - first], targets,
                                              seq.request.params.prompt_logprobs, self.decode_token)
            at += last - first
        return out


def _prompt_logprob_rows(item) -> tuple[int, int] | None:
    """Prompt positions [first, last) of this chunk whose next-token logprobs are still owed
    (row p predicts token p + 1; only targets inside the prompt), or None."""
    seq = item.seq
    req = seq.request
    if seq.index != 0 or not req.wants_prompt_logprobs:
        return None
    first = len(req.prompt_logprobs) - 1
    last = min(item.start + item.num_tokens, seq.num_prompt_tokens - 1)
    if last <= first or first < item.start:
        return None
    return first, last
