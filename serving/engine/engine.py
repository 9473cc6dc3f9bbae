"""The engine loop: requests in; each step schedule -> run -> update; delta outputs out."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

from models.errors import CheckpointError
from models.llama4 import LoadedModel, load_model
from serving.engine import cpu_gemm
from serving.engine.block_manager import BlockManager
from serving.engine.config import EngineConfig
from serving.engine.memory import plan_kv_blocks
from serving.engine.model_runner import ModelRunner, kv_cache_dtype
from serving.engine.output_processor import OutputProcessor
from serving.engine.outputs import RequestOutput
from serving.engine.sampling_params import ParamError, SamplingParams
from serving.engine.scheduler import Scheduler
from serving.engine.sequence import Request, Sequence
from serving.engine.stats import EngineStats
from serving.engine.structured import Grammars

log = logging.getLogger("herd.engine")

PromptInput = str | list[int] | dict[str, Any]


def tokenize_prompt(tokenizer, prompt: PromptInput) -> tuple[list[int], str | None]:
    """(token ids, text or None) of a prompt in any of the offline API's shapes."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt), prompt
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"]), prompt.get("prompt")
        if "prompt" in prompt:
            return tokenizer.encode(prompt["prompt"]), prompt["prompt"]
        raise ParamError("prompt", "a dict prompt needs 'prompt' or 'prompt_token_ids'")
    return list(prompt), None


def resolve_model(config: EngineConfig) -> None:
    """No model named: the built-in default, served under its own name."""
    if config.model is None:
        from models.default import DEFAULT_MODEL_NAME, default_model_path

        config.model = str(default_model_path())
        config.served_model_name = config.served_model_name or DEFAULT_MODEL_NAME


def effective_max_model_len(config: EngineConfig, model_config) -> int:
    """The context the engine serves: the config's, never past the model's positions."""
    limit = model_config.max_position_embeddings
    return min(config.max_model_len or limit, limit)


class LLMEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig,
                 runner_factory: Callable[..., ModelRunner] = ModelRunner) -> None:
        """`runner_factory` builds the step executor (ModelRunner's arguments); a tensor-parallel
        replica passes one whose steps also reach the other ranks."""
        if loaded.tokenizer is None:
            raise CheckpointError(f"{loaded.path}: the engine needs the model's tokenizer")
        self.config = config
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.model_config = loaded.config
        self.grammars = Grammars(self.tokenizer, loaded.config.vocab_size)  # structured outputs
        self.model_name = config.served_model_name or loaded.path.stem
        self.max_model_len = effective_max_model_len(config, loaded.config)
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens: {config.max_num_batched_tokens} is below max_model_len "
                             f"{self.max_model_len}; without chunked prefill a long prompt could never run")
        if cpu_gemm.wanted(self.model, config.float32_gemms):  # before memory is planned
            log.info("float32 copies of the weights for GEMMs of %d rows or more: %d layers "
                     "(float32_gemms=False turns them off)", cpu_gemm.MIN_ROWS, cpu_gemm.use_float32_gemms(self.model))
        num_blocks = plan_kv_blocks(self.model, config, self.max_model_len)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.enable_chunked_prefill)
        eos = frozenset(self.tokenizer.stop_token_ids) | frozenset(loaded.config.eos_token_ids)
        self.outputs = OutputProcessor(self.tokenizer, eos, self.max_model_len)
        t0 = time.perf_counter()
        if config.compile:
            log.info("compiling the decode step (herd's C++ step: a minute the first time; torch.compile: "
                     "a minute or two on a small CPU; --enforce-eager or LLM(enforce_eager=True) skips it)")
        self.runner = runner_factory(self.model, num_blocks, config.block_size, self.outputs.banned_ids,
                                     self.tokenizer.token_to_str, compile=config.compile,
                                     native_decode=config.native_decode, max_model_len=self.max_model_len,
                                     max_num_seqs=config.max_num_seqs,
                                     kv_cache_dtype=kv_cache_dtype(self.model, config.kv_cache_dtype))
        self.runner.warm_up()
        if config.compile:
            log.info("decode step compiled in %.1fs", time.perf_counter() - t0)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self.stats = EngineStats(num_kv_blocks=num_blocks)

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        resolve_model(config)
        return cls(load_model(config.model, dtype=config.dtype, device=config.device,
                              quantization=config.quantization), config)

    # -- requests -------------------------------------------------------------------------

    def tokenize(self, prompt: PromptInput) -> tuple[list[int], str | None]:
        return tokenize_prompt(self.tokenizer, prompt)

    def add_request(self, request_id: str, prompt: PromptInput, params: SamplingParams,
                    arrival_time: float | None = None) -> Request:
        if request_id in self.requests:
            raise ParamError("request_id", f"{request_id!r} is already running")
        ids, text = self.tokenize(prompt)
        self.check_prompt(ids, params)
        req = Request(request_id, ids, params, text, next(self._seq_ids), arrival_time)
        for _ in range(params.best_of - 1):
            next(self._seq_ids)
        self.requests[request_id] = req
        for seq in req.seqs:
            if params.structured is not None:
                seq.matcher = self.grammars.matcher(params.structured)
            self.scheduler.add(seq)
        self.stats.prompt_tokens += len(ids)
        return req

    def check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ParamError("prompt", "the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ParamError("prompt", f"token id {bad} is outside the vocabulary of {vocab}")
        params.validate_for(vocab)
        if params.structured is not None:
            self.grammars.check(params.structured)
        limit = self.max_model_len
        if len(ids) >= limit:
            raise ParamError("prompt", f"the prompt has {len(ids)} tokens; this model's maximum "
                             f"context length is {limit} tokens, including at least one generated")
        if params.max_tokens is not None and len(ids) + params.max_tokens > limit:
            raise ParamError("max_tokens", f"the prompt ({len(ids)} tokens) plus max_tokens "
                             f"({params.max_tokens}) exceeds this model's maximum context length "
                             f"of {limit} tokens")

    def abort(self, request_id: str) -> bool:
        """Stops a request and frees its blocks at once; False if it is unknown or done."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        for seq in req.seqs:
            if not seq.finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        self._count_finished(req, "abort")
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- the loop -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return []
        now = time.time()
        for item in sched.scheduled:
            m = item.seq.request.metrics
            m.first_scheduled_time = m.first_scheduled_time or now
        result = self.runner.execute(sched)
        now = time.time()
        touched: dict[str, Request] = {}
        for item in sched.scheduled:
            seq = item.seq
            self.scheduler.computed(item)
            req = seq.request
            if seq.seq_id in result.prompt_logprobs:
                req.prompt_logprobs.extend(result.prompt_logprobs[seq.seq_id])
            sample = result.samples.get(seq.seq_id)
            if sample is None:
                continue
            touched[req.request_id] = req
            seq.append(sample.token_id, sample.logprob, sample.top)
            self._time_token(req, seq, now)
            reason = self.outputs.on_token(seq, sample.token_id)
            if seq.matcher is not None:
                seq.next_mask = None
                seq.matcher.consume_token(sample.token_id)
                if reason is None and seq.matcher.is_stopped():  # the structure is complete
                    reason = "stop"
            if reason is not None:
                self.outputs.finish(seq, reason)
                self.scheduler.finish(seq)
        self.stats.num_preemptions = self.scheduler.num_preemptions
        self._prefetch_masks(sched)
        return [out for req in touched.values() if (out := self._output(req)) is not None]

    def _prefetch_masks(self, sched) -> None:
        """Next-token masks of the constrained sequences that just sampled, computed while the
        next step runs the model."""
        seqs = [item.seq for item in sched.scheduled
                if item.seq.matcher is not None and not item.seq.finished and item.seq.next_mask is None]
        if seqs:
            mask = self.grammars.prefetch([s.matcher for s in seqs])
            for k, s in enumerate(seqs):
                s.next_mask = lambda k=k: mask(k)

    def _time_token(self, req: Request, seq: Sequence, now: float) -> None:
        self.stats.generation_tokens += 1
        m = req.metrics
        if seq.index == 0:
            if m.first_token_time is None:
                m.first_token_time = now
                self.stats.ttft.observe(now - m.arrival_time)
            else:
                req.itl.append(now - m.last_token_time)
                self.stats.itl.observe(now - m.last_token_time)
            m.last_token_time = now

    def _output(self, req: Request) -> RequestOutput | None:
        params = req.params
        finished = req.finished
        if params.best_of > params.n and not finished:
            return None  # the best n are known only at the end
        seqs = req.seqs
        if params.best_of > params.n:
            seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)[:params.n]
        outs = []
        for i, seq in enumerate(seqs):
            delta = self.outputs.delta(seq)
            if delta is not None:
                delta.index = i
                outs.append(delta)
        prompt_lp = None
        if req.prompt_logprobs is not None and not req.prompt_logprobs_sent:
            prompt_lp, req.prompt_logprobs_sent = req.prompt_logprobs, True
        if finished:
            req.metrics.finished_time = time.time()
            self.requests.pop(req.request_id, None)
            self.stats.e2e.observe(req.metrics.finished_time - req.metrics.arrival_time)
            self._count_finished(req, req.seqs[0].finish_reason or "stop")
        if not outs and not finished:
            return None
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, finished,
                             prompt_lp, req.num_cached_tokens, req.metrics, delta=True)

    def _count_finished(self, req: Request, reason: str) -> None:
        self.stats.requests_finished[reason] = self.stats.requests_finished.get(reason, 0) + 1

    def get_stats(self) -> EngineStats:
        s = self.stats
        s.num_running = len(self.scheduler.running)
        s.num_waiting = len(self.scheduler.waiting)
        s.kv_usage = self.blocks.usage
        s.num_free_kv_blocks = self.blocks.num_free_blocks
        s.prefix_queried_tokens = self.blocks.stats.queried_tokens
        s.prefix_hit_tokens = self.blocks.stats.hit_tokens
        return s
