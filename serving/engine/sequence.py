"""A request and its sequences (one per sample): tokens, KV blocks, progress and results."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

import torch

from serving.engine.outputs import Logprob, PositionLogprobs, RequestMetrics
from serving.engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One sample of a request. KV for tokens [0, num_computed) is in `blocks`."""

    def __init__(self, seq_id: int, request: Request, index: int) -> None:
        self.seq_id = seq_id
        self.request = request
        self.index = index
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed = 0
        self.blocks: list[int] = []
        self.block_hashes: list[int] = []  # of the full, computed blocks registered so far
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: list[PositionLogprobs] | None = [] if request.params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.num_preemptions = 0
        self.prefix_checked = False
        self.matcher = None  # llguidance matcher of a structured-output request (engine-owned)
        self.next_mask: Callable[[], torch.Tensor] | None = None  # its next-token mask, computing ahead
        params = request.params
        self.generator: torch.Generator | None = None
        if params.seed is not None and not params.greedy:
            # Each sample's stream depends only on (seed, index), never on batch mates.
            self.generator = torch.Generator().manual_seed(params.seed * 1_000_003 + index)
        # Filled by the output processor: detokenizer state and text not yet handed out.
        self.detok = None
        self.text = ""
        self.sent_text_len = 0
        self.sent_tokens = 0
        self.sent_logprobs = 0

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def append(self, token_id: int, logprob: float, top: PositionLogprobs | None) -> None:
        self.token_ids.append(token_id)
        self.cumulative_logprob += logprob
        if self.logprobs is not None:
            self.logprobs.append(top if top is not None else {token_id: Logprob(logprob)})


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 prompt: str | None, first_seq_id: int, arrival_time: float | None = None) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.metrics = RequestMetrics(arrival_time=arrival_time or time.time())
        self.seqs = [Sequence(first_seq_id + i, self, i) for i in range(params.best_of)]
        self.prompt_logprobs: list[PositionLogprobs | None] | None = (
            [None] if params.prompt_logprobs is not None else None)  # no logprob for token 0
        self.prompt_logprobs_sent = False
        self.num_cached_tokens = 0
        self.itl: list[float] = []  # inter-token latencies, seconds

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return (self.prompt_logprobs is not None
                and len(self.prompt_logprobs) < len(self.prompt_token_ids))
